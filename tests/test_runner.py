"""End-to-end runs of the local executor: output layout, resume, edits, refresh, HH counts."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from curate.config import load_pipeline
from curate.runner import run_pipeline


def _run(path: Path, *overrides: str, refresh: list[str] | None = None, out: str | None = None) -> dict:
    return run_pipeline(load_pipeline(str(path), list(overrides)), out=out, refresh=refresh)


def _computed(stats: dict) -> dict[str, int]:
    return {s["stage_id"]: s["parts_computed"] for s in stats["stages"] if s["kind"] != "source"}


def test_scored_output_is_a_trl_dataset_in_hub_layout(scored):
    stats = _run(scored)
    out = scored.parent / "out"
    files = sorted(p.name for p in (out / "data").iterdir())
    assert files == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    schemas = {str(pq.read_schema(out / "data" / f)) for f in files}
    assert len(schemas) == 1
    ds = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
    assert ds.num_rows == stats["rows_out"] == 19
    assert ds.column_names[:4] == ["id", "prompt", "chosen", "rejected"]
    row = ds[0]
    assert row["chosen"][0]["role"] == "assistant" and row["prompt"][-1]["role"] == "user"
    assert stats["rows_in"] - sum(stats["dropped"].values()) == stats["rows_out"]
    assert stats["dropped"] == {"duplicate_prompt": 1, "empty_prompt": 1, "fewer_than_2_scores": 1,
                                "margin_below_min": 1, "tie": 1}
    rejects = pq.read_table(out / "rejects" / "pairs").to_pylist()
    assert sorted(r["reason"] for r in rejects) == ["fewer_than_2_scores", "tie"]
    assert json.loads((out / "stats.json").read_text())["rows_out"] == 19
    assert json.loads((out / "plan.json").read_text())["stages"][0]["id"] == "nonempty"


def test_second_run_computes_nothing(scored):
    first = _run(scored)
    assert all(n == 3 for n in _computed(first).values())
    second = _run(scored)
    assert all(n == 0 for n in _computed(second).values())
    assert all(s.get("fit_computed", False) is False for s in second["stages"])
    assert second["rows_out"] == first["rows_out"] and second["dropped"] == first["dropped"]


def test_editing_the_last_filter_recomputes_only_it_and_what_follows(scored):
    _run(scored)
    stats = _run(scored, "stages.6.params.min=3.25")
    assert _computed(stats) == {"nonempty": 0, "length": 0, "dedup_prompts": 0, "pairs": 0, "reply_length": 0,
                                "dedup_pairs": 0, "min_margin": 3, "trl": 3}
    assert stats["stages"][-2]["stage_id"] == "min_margin"
    assert stats["dropped"]["margin_below_min"] > 1


def test_execution_knobs_and_ids_do_not_change_keys_but_params_do(scored):
    _run(scored)
    stats = _run(scored, "stages.0.id=not_blank")
    assert sum(_computed(stats).values()) == 0
    stats = _run(scored, "stages.1.params.max_chars=1999")
    assert _computed(stats)["length"] == 3 and _computed(stats)["nonempty"] == 3  # fused with the edited stage


def test_refresh_recomputes_a_stage_and_what_follows(scored):
    _run(scored)
    stats = _run(scored, refresh=["pairs"])
    computed = _computed(stats)
    assert computed["dedup_prompts"] == 0 and computed["pairs"] == 3 and computed["trl"] == 3
    assert all(s.get("fit_computed") is not True for s in stats["stages"] if s["stage_id"] == "dedup_prompts")


def test_a_shard_where_every_row_is_dropped_keeps_the_schema(scored):
    stats = _run(scored, "stages.6.params.min=100")
    assert stats["rows_out"] == 0
    data = scored.parent / "out" / "data"
    tables = [pq.read_table(p) for p in sorted(data.iterdir())]
    assert len(tables) == 3 and all(t.num_rows == 0 for t in tables)
    assert tables[0].schema.names[:4] == ["id", "prompt", "chosen", "rejected"]
    assert len({str(t.schema) for t in tables}) == 1


def test_out_flag_overrides_the_yaml_output(scored, tmp_path):
    stats = _run(scored, out=str(tmp_path / "elsewhere"))
    assert (tmp_path / "elsewhere" / "data").is_dir() and stats["rows_out"] == 19


@pytest.mark.slow
def test_hh_pipeline_on_the_shared_file(hh_file, tmp_path):
    repo_yaml = Path(__file__).resolve().parent.parent / "pipelines" / "hh.yaml"
    stats = _run(repo_yaml, f"source.path={hh_file}", out=str(tmp_path / "hh"))
    explicit = sum(stats["dropped"].values())
    assert stats["rows_in"] == 2312
    assert stats["rows_out"] == 2312 - explicit
    assert stats["dropped"]["hh_prompt_mismatch"] == 5
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "hh" / "data"), split="train")
    assert ds.num_rows == stats["rows_out"]
    rejected_rows = sum(pq.read_table(p).num_rows for p in (tmp_path / "hh" / "rejects").rglob("*.parquet"))
    assert rejected_rows == explicit
