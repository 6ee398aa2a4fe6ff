"""CREAM, RSO and ranking difficulty end to end on real models (issue 17, item 4).

- Ranking difficulty: `filters.ranking_difficulty` on HH pairs with SmolLM2-135M-Instruct as the
  reference, its log-probs checked against a by-hand computation on the raw model.
- CREAM: the stage's two reward lists checked by hand on real transformers models (a tiny random
  Llama with SmolLM2's tokenizer as the "current" model, SmolLM2 as reference and previous); and
  the real recipe, the DPO-trained SmolLM2 as the current model, SmolLM2-135M-Instruct as its
  reference and as the previous iteration, which runs when that trained model is in the cache
  (`$CURATE_CACHE/trained/smollm2-135m-dpo-hh`, written by `benchmarks/train_dpo_pair.py`) and
  skips with the reason otherwise: it is a cached training artefact, not shipped.
- RSO: `pipelines/rso.yaml` on two prompts: SmolLM2 candidates, CDR rewards, `pairs.rso`.
Torch runs on one thread (a shared 2-core machine).
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.filters.ranking_difficulty import flip_loss_threshold
from curate.judges.cream import rank_consistency
from tests.conftest import REPO
from tests.test_filters_real_model import MODEL, _logprob, _run, _trained_policy, smollm2  # noqa: F401  (smollm2: a fixture)


def _raw(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _tokens(model_and_tokenizer, prompt: str, reply: str) -> int:
    from curate.backends.base import encode_pair
    from curate.backends.scoring import as_messages

    ids, start = encode_pair(model_and_tokenizer[1], as_messages(prompt), reply)
    return len(ids) - start


def test_ranking_difficulty_on_hh_pairs_with_smollm2_matches_a_hand_computation(hh_file, tmp_path, smollm2):
    from curate.config import parse_pipeline
    from curate.record import load_run
    from curate.runner import run_pipeline

    text = f"""
source: {{path: {hh_file}, parse: hh, limit: 4, part_rows: 2}}
stages:
  - {{stage: filters.ranking_difficulty, id: rd, params: {{reference: {MODEL}, backend: transformers, beta: 0.1}}}}
"""
    run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / "out"))
    counters = load_run(str(tmp_path / "out")).stats.stage("rd").counters
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert len(rows) == 4 and counters["scored"] == 4 and counters["row_errors"] == 0
    misranked = 0
    for row in rows:
        lp_w, lp_l = _logprob(smollm2, row["prompt"], row["chosen"]), _logprob(smollm2, row["prompt"], row["rejected"])
        assert row["ref_lp_chosen"] == pytest.approx(lp_w, abs=2e-3)
        assert row["ref_lp_rejected"] == pytest.approx(lp_l, abs=2e-3)
        assert row["difficulty_c"] == pytest.approx(lp_l - lp_w, abs=4e-3)
        assert row["flip_loss_threshold"] == pytest.approx(float(flip_loss_threshold(lp_l - lp_w, 0.1)), abs=1e-3)
        assert row["ref_rank_correct"] == (lp_w >= lp_l) and row["rd_ref_model"] == MODEL
        per_token = lp_w / _tokens(smollm2, row["prompt"], row["chosen"]) >= lp_l / _tokens(smollm2, row["prompt"], row["rejected"])
        assert row["ref_rank_correct_norm"] == per_token
        # α = 0.999 at β = 0.1: the optimum ranks correctly iff ref_logratio + 10·ln(999) > 0
        assert row["ideal_correct"] == (lp_w - lp_l + 10 * math.log(999) > 0)
        misranked += lp_w < lp_l
    assert counters["ref_misranked"] == misranked


CREAM_ROWS = [
    {"id": "c0", "prompt": "What is the capital of France?",
     "responses": ["The capital of France is Paris.", "Paris.", "I think it might be Lyon, but I am not sure.",
                   "Bananas are yellow."]},
    {"id": "c1", "prompt": "Give me one tip for sleeping better.",
     "responses": ["Keep a regular bedtime, even at weekends.", "Sleep.", "Drink three coffees after dinner."]},
]


def test_cream_rewards_on_real_models_match_a_hand_computation(tmp_path, smollm2, tiny_llama):
    """cream_reward_cur = LP(current) − LP(reference) (sums), cream_reward_prev = LPn(previous), by hand."""
    current = _raw(tiny_llama)
    run, rows = _run(tmp_path, CREAM_ROWS, f"""  - {{stage: judges.cream, id: cream, params: {{policy: {tiny_llama}, reference: {MODEL}, previous: {MODEL}, backend: transformers}}}}
""")
    assert {r["prompt_id"] for r in rows.values()} == {"c0", "c1"}
    for row in rows.values():
        source = next(r for r in CREAM_ROWS if r["id"] == row["prompt_id"])
        prompt, texts = source["prompt"], source["responses"]
        cur = [_logprob(current, prompt, t) - _logprob(smollm2, prompt, t) for t in texts]
        prev = [_logprob(smollm2, prompt, t) / _tokens(smollm2, prompt, t) for t in texts]
        assert row["cream_reward_cur"] == pytest.approx(cur, abs=4e-3)
        assert row["cream_reward_prev"] == pytest.approx(prev, abs=1e-3)
        assert row["cream_consistency"] == pytest.approx(rank_consistency(cur, prev))
        assert row["cream_weight"] == row["cream_consistency"] and row["label_smoothing"] == pytest.approx(1 - row["cream_weight"])
        assert (row["chosen_index"], row["rejected_index"]) == (int(np.argmax(cur)), int(np.argmin(cur)))
        assert row["chosen"] == texts[row["chosen_index"]] and row["cream_error"] is None
    assert run.stats.stage("cream").counters["pairs"] == 2


def test_cream_with_the_dpo_trained_smollm2_against_the_untouched_model(tmp_path):
    """§1C as meant: current = DPO-trained SmolLM2, reference = SmolLM2-135M-Instruct, previous = SmolLM2-135M-Instruct.

    Skips, saying why, when the cached trained policy is absent (`_trained_policy`)."""
    trained = _trained_policy()
    run, rows = _run(tmp_path, CREAM_ROWS, f"""  - {{stage: judges.cream, id: cream, params: {{policy: {trained}, reference: {MODEL}, previous: {MODEL}, backend: transformers}}}}
  - {{stage: judges.cream_avg, id: avg}}
""")
    counters, fit = run.stats.stage("cream").counters, run.stats.stage("avg").fit
    assert counters["consistency_rows"] == 2 and counters["row_errors"] == 0
    cs = []
    for row in rows.values():
        cur = row["cream_reward_cur"]
        assert all(math.isfinite(v) for v in cur + row["cream_reward_prev"])
        assert any(abs(v) > 1e-3 for v in cur)  # the trained policy differs from its reference
        assert (row["chosen_index"], row["rejected_index"]) == (int(np.argmax(cur)), int(np.argmin(cur)))
        assert 0.0 <= row["cream_consistency"] <= 1.0
        cs.append(row["cream_consistency"])
    assert fit["mean_consistency"] == pytest.approx(float(np.mean(cs)))
    assert all(row["cream_weight"] == pytest.approx(fit["mean_consistency"]) for row in rows.values())


def test_rso_pipeline_on_smollm2_candidates_scored_by_cdr(tmp_path):
    """pipelines/rso.yaml on 2 prompts (8 candidates each, 48 tokens): every pair is best vs worst of the accepted."""
    from curate.config import load_pipeline
    from curate.generators.rso import accepted_lists
    from curate.record import load_run
    from curate.runner import run_pipeline

    spec = load_pipeline(str(REPO / "pipelines" / "rso.yaml"),
                         overrides=["source.limit=2", "stages.policy.params.generation.max_tokens=48"])
    run_pipeline(spec, out=str(tmp_path / "out"))
    run = load_run(str(tmp_path / "out"))
    counters = run.stats.stage("rso").counters
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert counters["rows"] == 2 and counters["accepted"] == 8 and len(rows) == counters["pairs"] >= 1
    for row in rows:
        rewards = row["cdr_rewards"]
        assert len(rewards) == 8 and all(math.isfinite(r) for r in rewards) and len(set(rewards)) > 1
        accepted = row["rso_accepted"]
        assert len(accepted) == 4 and len(set(accepted)) == 4
        # the acceptance is seeded per row: recomputed from the prompt's id it is the same
        assert accepted_lists([rewards], [row["prompt_id"]], 4, 0.5, "rso:accept", 0) == ([accepted], [row["rso_round"]])
        assert row["rso_round"] == sorted(row["rso_round"]) and row["rso_round"][0] == 1
        assert row["rso_scores"] == [r if i in accepted else None for i, r in enumerate(rewards)]
        # best vs worst among the accepted only
        assert row["chosen_score"] == max(rewards[i] for i in accepted)
        assert row["rejected_score"] == min(rewards[i] for i in accepted)
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
