"""The typed run record: load_run reads back what a run wrote, and says clearly what is missing."""
from __future__ import annotations

import pytest

from curate.config import load_pipeline
from curate.errors import ConfigError
from curate.record import load_run
from curate.runner import run_pipeline


def test_load_run_reads_back_stats_plan_pipeline_and_states(scored):
    out = str(scored.parent / "out")
    raw = run_pipeline(load_pipeline(str(scored), ["stages.min_margin.params.min=1.5"]), out=out)
    run = load_run(out)
    assert run.stats.to_json() == raw
    assert run.stats.rows_out == raw["rows_out"] and run.stats.curate_version
    dedup = run.stats.stage("dedup_prompts")
    assert dedup.kind == "global" and dedup.fit_computed is True and dedup.dropped == {"duplicate_prompt": 1}
    assert run.plan.stage("pairs").params["mode"] == "best_worst"
    assert run.plan.overrides == ["stages.min_margin.params.min=1.5"]
    assert [s.index for s in run.plan.stages] == list(range(len(run.plan.stages)))
    assert run.pipeline_yaml == scored.read_text()
    assert run.state_path("dedup_prompts") is not None and run.state_path("pairs") is None
    assert len(run.data_files) == run.stats.parts
    # A second run computes nothing: this run's seconds are near zero, the compute time is kept.
    again = load_run(out) if run_pipeline(load_pipeline(str(scored), ["stages.min_margin.params.min=1.5"]), out=out) else None
    pairs = again.stats.stage("pairs")
    assert pairs.parts_computed == 0 and pairs.run_seconds == 0 and pairs.compute_seconds > 0


def test_load_run_names_the_missing_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_run(str(tmp_path))
    assert "stats.json" in err.value.where
