"""The disk fills during a write (ENOSPC injected at chosen write moments of a real `curate run`), then space is freed.

The failed run ends with one `error:` line, publishes nothing half-written, and the resumed run
gives the uninterrupted run's rows, none lost or duplicated (tests/resilience/scenarios.py).
"""
from __future__ import annotations

import pytest

from tests.resilience.scenarios import disk_full


def _check(outcomes):
    assert outcomes
    for outcome in outcomes:
        assert outcome.ok, outcome


def test_disk_full_at_four_moments_then_resume_loses_nothing(tmp_path):
    _check(disk_full(tmp_path, moments=4))  # the first write, two in the middle, the last


@pytest.mark.resilience_full
def test_disk_full_at_every_write_moment_then_resume_loses_nothing(tmp_path):
    _check(disk_full(tmp_path, moments=None))
