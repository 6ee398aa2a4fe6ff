"""SIGKILL at seeded random moments of a CPU-only run, then resume: the uninterrupted run's rows, none lost or doubled.

(tests/test_crash_safety.py kills one folder again and again; this kills fresh runs once each and times the recovery.)
"""
from __future__ import annotations

import pytest

from tests.resilience.scenarios import sigkill


def test_sigkill_at_two_moments_then_resume(tmp_path):
    outcomes = sigkill(tmp_path, kills=2, rows=6000)
    assert len(outcomes) >= 1 and all(o.ok for o in outcomes), outcomes


@pytest.mark.resilience_full
def test_sigkill_at_twenty_moments_then_resume(tmp_path):
    outcomes = sigkill(tmp_path, kills=20)
    assert len(outcomes) >= 15 and all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
