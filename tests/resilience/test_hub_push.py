"""A loopback Hub refusing one push step: the push stops with one line; pushing again completes and sends nothing twice."""
from __future__ import annotations

from pathlib import Path

import pytest

from curate.config import load_pipeline
from curate.runner import run_pipeline
from tests.resilience.scenarios import HUB_FAILURES, hub_push


@pytest.fixture
def run_dir(scored: Path) -> Path:
    run_pipeline(load_pipeline(str(scored)))
    return scored.parent / "out"


def test_a_push_stopped_mid_way_completes_on_the_next_push(tmp_path, run_dir):
    outcomes = hub_push(tmp_path, run_dir, HUB_FAILURES[1:2] + HUB_FAILURES[4:5])
    assert len(outcomes) == 2 and all(o.ok for o in outcomes), outcomes


@pytest.mark.resilience_full
def test_a_push_stopped_at_any_step_completes_on_the_next_push(tmp_path, run_dir):
    outcomes = hub_push(tmp_path, run_dir)
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
