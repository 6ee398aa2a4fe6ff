"""Two `curate run` processes on one output folder: the second refuses with one line; the first is unharmed."""
from __future__ import annotations

import pytest

from tests.resilience.scenarios import two_runs


def test_a_second_run_on_a_live_folder_is_refused_cleanly(tmp_path):
    outcomes = two_runs(tmp_path, repeats=1)
    assert len(outcomes) == 1 and outcomes[0].ok, outcomes


@pytest.mark.resilience_full
def test_a_second_run_is_refused_every_time(tmp_path):
    outcomes = two_runs(tmp_path, repeats=10)
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
