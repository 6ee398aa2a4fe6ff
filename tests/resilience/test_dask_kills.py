"""A Dask worker SIGKILLed at chosen moments of a real `curate run --executor dask` (LocalCluster, 2 workers).

Each run must finish by itself, with every part committed once and the uninterrupted run's rows,
none lost or doubled, nothing temporary left behind (tests/resilience/dask_kills.py).
"""
from __future__ import annotations

import pytest

pytest.importorskip("distributed")

from tests.resilience.dask_kills import PHASES, choose_moments, dask_worker_kills  # noqa: E402


def test_moments_cover_every_phase_and_spread_over_the_run():
    counts = {"compute": 24, "write": 24, "done": 24, "summarize": 12}
    chosen = choose_moments(counts, 20)
    assert {phase for phase, _ in chosen} == set(PHASES)
    assert [n for phase, n in chosen if phase == "compute"] == [1, 7, 13, 18, 24]  # first to last, evenly
    assert [n for phase, n in chosen if phase == "summarize"] == [1, 4, 7, 9, 12]
    assert choose_moments(counts, 4) == [("compute", 13), ("write", 13), ("done", 13), ("summarize", 7)]


def test_a_worker_killed_mid_part_and_mid_write_the_run_finishes_and_loses_nothing(tmp_path):
    # two moments keep the default suite short (each is a whole Dask run); the four phases at
    # twenty moments are the resilience_full test below and benchmarks/resilience.py's table
    outcomes = dask_worker_kills(tmp_path, moments=2, rows=1500)
    assert len(outcomes) == 2  # (compute, 13), (write, 13): choose_moments, tested above
    for outcome in outcomes:
        assert outcome.ok, outcome
        assert outcome.recover_seconds is not None


@pytest.mark.resilience_full
def test_a_worker_killed_at_twenty_moments_the_run_finishes_and_loses_nothing(tmp_path):
    outcomes = dask_worker_kills(tmp_path, moments=20)
    assert len(outcomes) == 20 and all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
