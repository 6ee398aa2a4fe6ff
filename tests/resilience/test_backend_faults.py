"""A loopback backend answering 429, 500, timeouts, truncated bodies, malformed JSON and null content.

Every row comes back with its responses (retried) or with a row error (`generate_error`, for the
prompts that fail on every attempt); the run exits 0; no response is a silent null.
"""
from __future__ import annotations

import pytest

from tests.resilience.scenarios import FAULTS, _fault_plan, backend_faults


def test_the_fault_plan_covers_every_fault_and_some_lasting_failures():
    prompts = [f"{'doomed ' if i % 8 == 5 else ''}prompt 0-{i}" for i in range(24)]
    plan = _fault_plan(0, prompts)
    assert {fault for fault, _ in plan.values()} >= set(FAULTS)
    assert sum(lasts > 100 for _, lasts in plan.values()) == 3


def test_a_flaky_backend_gives_responses_or_row_errors_never_an_abort_or_a_null(tmp_path):
    outcomes = backend_faults(tmp_path, repeats=1)
    assert len(outcomes) == 1 and outcomes[0].ok, outcomes


@pytest.mark.resilience_full
def test_a_flaky_backend_over_many_seeds(tmp_path):
    outcomes = backend_faults(tmp_path, repeats=10, prompts=48)
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
