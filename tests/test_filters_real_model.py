"""Every filter end to end on a real model (issue 14, item 5): CHES, DONOD, SPA and EM on SmolLM2-135M-Instruct.

Each test runs the filter's pipeline stages on a handful of hand-built rows with the stage
defaults (transformers backend, fp32; SPA explicitly `reference: none`, and again with the
DPO-trained SmolLM2 of benchmarks/train_dpo_pair.py over the untouched one when that cached
model exists) and checks the values against a by-hand computation on
the raw transformers model, one row at a time, or against what the method implies (METHODS §5-§7).
Torch runs on one thread (a shared 2-core machine, ENVIRONMENT.md).
"""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.config import parse_pipeline
from curate.record import load_run
from curate.runner import run_pipeline

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    """The raw SmolLM2 (fp32, eval) and its tokenizer, for the by-hand computations."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from curate.models import resolve_model

    path = resolve_model(MODEL).path
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    yield model, AutoTokenizer.from_pretrained(path)
    torch.set_num_threads(threads)


def _run(tmp_path, rows, stages: str, name: str = "out"):
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = f"source: {{path: x.jsonl, part_rows: 2}}\nstages:\n{stages}"
    run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / name))
    return load_run(str(tmp_path / name)), {r["id"]: r for r in pq.read_table(tmp_path / name / "data").to_pylist()}


def _forward(smollm2, prompt, reply: str):
    """(ids, start, final-norm hidden states, logits) of `prompt + reply + end of turn` (METHODS §0 layout)."""
    import torch

    from curate.backends.base import encode_pair
    from curate.backends.scoring import as_messages

    model, tokenizer = smollm2
    ids, start = encode_pair(tokenizer, as_messages(prompt), reply)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return ids, start, out.hidden_states[-1][0].double(), out.logits[0].double()


def _logprob(smollm2, prompt, reply: str) -> float:
    """Summed log-prob of the reply tokens (end of turn included) by hand: log_softmax at positions start-1 .. L-2."""
    import torch

    ids, start, _, logits = _forward(smollm2, prompt, reply)
    logp = torch.log_softmax(logits[start - 1:len(ids) - 1], dim=-1)
    return float(logp.gather(1, torch.tensor(ids[start:])[:, None]).sum())


# CHES (METHODS §5) -----------------------------------------------------------------------------------

CHES_ROWS = [
    # chosen and rejected share their first tokens: the likelihood-displacement case CHES flags
    {"id": "shared", "prompt": "What is the capital of France?",
     "chosen": "The capital of France is Paris, a city on the Seine.",
     "rejected": "The capital of France is Lyon, a city on the Rhone."},
    # unrelated answers
    {"id": "unrelated", "prompt": "What is the capital of France?",
     "chosen": "The capital of France is Paris, a city on the Seine.",
     "rejected": "Bananas grow in warm climates and are rich in potassium."},
    {"id": "unrelated2", "prompt": "Name a primary colour.",
     "chosen": "Red is a primary colour.",
     "rejected": "I would rather talk about football results from last weekend."},
]


def test_ches_ranks_a_shared_prefix_pair_above_unrelated_pairs_on_smollm2(tmp_path, smollm2):
    _, rows = _run(tmp_path, CHES_ROWS, f"""  - {{stage: filters.ches_score, id: score, params: {{model: {MODEL}}}}}
  - {{stage: filters.ches, id: ches, params: {{mode: drop_highest, fraction: 0.3}}}}
""")
    # the highest-ln_ches third (one row of three) is dropped: it must be the shared-prefix pair
    assert set(rows) == {"unrelated", "unrelated2"}
    rejects = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "rejects" / "ches").to_pylist()}
    assert set(rejects) == {"shared"} and rejects["shared"]["reason"] == "ches_high"
    shared = rejects["shared"]
    for other in rows.values():
        assert shared["ln_ches"] > other["ln_ches"]  # the length-normalised score the filter ranks by
    # by hand on the raw model for every row: S± = sums of the final-norm hidden states at the
    # positions P-1 .. L-2 that predict each response token (end of turn included)
    for row in [shared, *rows.values()]:
        sums, lengths = [], []
        for side in ("chosen", "rejected"):
            ids, start, hidden, _ = _forward(smollm2, row["prompt"], row[side])
            sums.append(hidden[start - 1:len(ids) - 1].sum(0).numpy())
            lengths.append(len(ids) - start)
        (sp, sn), (lp, ln) = sums, lengths
        assert (row["ches_len_chosen"], row["ches_len_rejected"]) == (lp, ln)
        assert row["ches"] == pytest.approx(float(sp @ sn - sp @ sp), rel=1e-3)
        assert row["ln_ches"] == pytest.approx(float((sp / lp) @ (sn / ln) - (sp / lp) @ (sp / lp)), rel=1e-3)
        assert row["ches_model"] == MODEL and row["ches_skip_reason"] is None


# DONOD (METHODS §7) ----------------------------------------------------------------------------------

DONOD_ROWS = [
    {"id": f"d{i}", "prompt": p, "chosen": c, "rejected": "no"} for i, (p, c) in enumerate([
        ("What is the capital of France?", "Paris."),
        ("Say hello.", "Hello! How can I help you today?"),
        ("Name a primary colour.", "Blue."),
        ("What is 2 + 2?", "2 + 2 = 4."),
    ])
]


def _don_nod_by_autograd(W, H, targets, lr: float) -> tuple[float, float]:
    """G = ∇_W of the mean token cross-entropy by autograd; DON = ||W − ηG|| − ||W|| written as
    (||W−ηG||² − ||W||²) / (||W−ηG|| + ||W||) = (η²||G||² − 2η<W,G>) / (...), since the literal
    difference of two norms of a 49152x576 matrix loses ~2% of a 3e-7 DON to float64 rounding."""
    import torch

    weight = W.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(H @ weight.T, targets)
        (G,) = torch.autograd.grad(loss, weight)
    with torch.no_grad():
        change = float(lr * lr * (G * G).sum() - 2 * lr * (W * G).sum())
        old = float(W.norm())
        new = math.sqrt(old * old + change)
        return change / (old + new), lr * float(G.norm())


def test_donod_on_smollm2_runs_the_output_layer_closed_form_and_says_so(tmp_path, smollm2, caplog):
    import torch

    from curate.filters.donod import OutputLayer, keep_count

    model, _ = smollm2
    layer = OutputLayer.of(model)
    assert layer.tied  # SmolLM2 ties lm_head to the input embeddings
    with caplog.at_level(logging.WARNING):
        run, rows = _run(tmp_path, DONOD_ROWS, f"""  - {{stage: filters.donod_score, id: score, params: {{model: {MODEL}}}}}
  - {{stage: filters.donod, id: donod, params: {{action: mark}}}}
""")
    # the form that ran is said: output-layer use only (tied=closed_form, the default)
    assert any("ties its input and output embeddings" in r.getMessage() and "tied=closed_form" in r.getMessage()
               for r in caplog.records)
    assert run.stats.stage("score").counters["rows_scored"] == 4
    # closed form == an autograd SGD step on W alone (the untied output-layer use), per row, on the raw model
    for row in rows.values():
        ids, start, hidden, _ = _forward(smollm2, row["prompt"], row["chosen"])
        don, nod = _don_nod_by_autograd(layer.weight, hidden[start - 1:len(ids) - 1], torch.tensor(ids[start:]), 1e-4)
        assert row["donod_n_tokens"] == len(ids) - start and row["donod_skip_reason"] is None
        assert row["donod_don"] == pytest.approx(don, rel=1e-3)
        assert row["donod_nod"] == pytest.approx(nod, rel=1e-3)
        assert row["donod_nod"] > 0  # NOD = η·||G||_F > 0 for a real gradient
    # TOPSIS keeps ceil(30%) of 4 rows, those of highest closeness
    kept = [r for r in rows.values() if r["donod_keep"]]
    assert len(kept) == keep_count(4, 0.3) == 2
    assert min(r["donod_topsis"] for r in kept) >= max(r["donod_topsis"] for r in rows.values() if not r["donod_keep"])
    assert all(0.0 <= r["donod_topsis"] <= 1.0 for r in rows.values())


# SPA and EM (METHODS §6), reference-free --------------------------------------------------------------

SPA_PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "Purple elephants compute the tide."),
    ("Say hello.", "Hello! How can I help you today?", "Banana window seventeen."),
    ("What is 2 + 2?", "2 + 2 = 4.", "Under the rug, maybe, who knows."),
]


def _spa_rows():
    rows = []
    for i, (p, good, bad) in enumerate(SPA_PAIRS):
        rows.append({"id": f"s{i}", "prompt": p, "chosen": good, "rejected": bad})
        rows.append({"id": f"s{i}_flipped", "prompt": p, "chosen": bad, "rejected": good})  # its flipped twin
    return rows


def test_spa_and_em_on_smollm2_reference_free_match_a_hand_computation(tmp_path, smollm2, caplog):
    from curate.filters.noise import flip_posterior
    from curate.filters.spa import spa_threshold

    beta = 0.1
    with caplog.at_level(logging.WARNING):
        run, rows = _run(tmp_path, _spa_rows(), f"""  - {{stage: filters.spa_score, id: score, params: {{policy: {MODEL}, reference: none, backend: transformers, beta: {beta}}}}}
  - {{stage: filters.spa, id: spa, params: {{quantile: 0.4}}}}
  - {{stage: filters.noise_em, id: em, params: {{action: weight}}}}
""")
    assert any("reference: none" in r.getMessage() for r in caplog.records)
    assert run.stats.stage("score").counters["reference_free_rows"] == 6
    # SPA margin = β·(LP(chosen) − LP(rejected)) under the policy alone, by hand on the raw model
    for i, (p, good, bad) in enumerate(SPA_PAIRS):
        lp_good, lp_bad = _logprob(smollm2, p, good), _logprob(smollm2, p, bad)
        row, twin = rows[f"s{i}"], rows[f"s{i}_flipped"]
        assert row["spa_lp_policy_chosen"] == pytest.approx(lp_good, abs=2e-3)
        assert row["spa_lp_policy_rejected"] == pytest.approx(lp_bad, abs=2e-3)
        assert row["spa_margin"] == pytest.approx(beta * (lp_good - lp_bad), abs=2e-4)
        assert twin["spa_margin"] == pytest.approx(-row["spa_margin"], abs=2e-4)
        assert row["spa_conf"] == pytest.approx(1 / (1 + math.exp(-row["spa_margin"])))
        assert row["spa_ref_model"] == "none" and row["spa_lp_ref_chosen"] is None and row["score_error"] is None
        # the model prefers the sensible answer to the word salad by a clear margin
        assert row["spa_margin"] > 0.5
    # SPA: τ = the mean of the 3rd and 4th of the six sorted margins (q = 0.4); z ≤ τ are the noisy
    # rows, i.e. the three flipped twins
    margins = np.array([rows[k]["spa_margin"] for k in sorted(rows)])
    assert run.stats.stage("spa").fit["tau"] == pytest.approx(spa_threshold(margins, 0.4))
    assert {k for k, r in rows.items() if r["spa_noisy"]} == {f"s{i}_flipped" for i in range(3)}
    # EM: ε̂ in its clip range, pref_conf = the posterior of the fitted ε̂, in [0, 1], and every
    # flipped twin less trusted than its unflipped pair
    fit = run.stats.stage("em").fit
    eps = fit["eps_hat"]
    assert 0.0 < eps < 0.5 and fit["n"] == 6
    expected = flip_posterior(margins, eps)
    for k, w in zip(sorted(rows), expected):
        assert 0.0 <= rows[k]["pref_conf"] <= 1.0
        assert rows[k]["pref_conf"] == pytest.approx(float(w), abs=1e-9)
    for i in range(3):
        assert rows[f"s{i}_flipped"]["pref_conf"] < rows[f"s{i}"]["pref_conf"]


# SPA and EM with a real reference: the DPO-trained SmolLM2 over the untouched one -----------------

def _trained_policy() -> str:
    """The policy benchmarks/train_dpo_pair.py saves (a cached artefact, never downloaded)."""
    import os

    from curate.models import cache_dir

    path = os.path.join(cache_dir(), "trained", "smollm2-135m-dpo-hh")
    if not os.path.exists(os.path.join(path, "config.json")):
        pytest.skip(f"no DPO-trained policy at {path}: run `python benchmarks/train_dpo_pair.py` once to make it")
    return path


def test_spa_and_em_on_the_dpo_trained_pair_match_a_hand_computation(tmp_path, smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    policy_path = _trained_policy()
    beta = 0.1
    run, rows = _run(tmp_path, _spa_rows(), f"""  - {{stage: filters.spa_score, id: score, params: {{policy: {policy_path}, reference: {MODEL}, backend: transformers, beta: {beta}}}}}
  - {{stage: filters.noise_em, id: em, params: {{action: weight}}}}
""")
    assert run.stats.stage("score").counters.get("reference_free_rows", 0) == 0
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).eval()
    trained = (policy, smollm2[1])
    for i, (p, good, bad) in enumerate(SPA_PAIRS):
        # the implicit DPO reward of each reply: LP under the trained policy minus LP under its reference
        r_good = _logprob(trained, p, good) - _logprob(smollm2, p, good)
        r_bad = _logprob(trained, p, bad) - _logprob(smollm2, p, bad)
        row, twin = rows[f"s{i}"], rows[f"s{i}_flipped"]
        assert row["spa_lp_ref_chosen"] == pytest.approx(_logprob(smollm2, p, good), abs=2e-3)
        assert row["spa_margin"] == pytest.approx(beta * (r_good - r_bad), abs=2e-4)
        assert twin["spa_margin"] == pytest.approx(-row["spa_margin"], abs=2e-4)
        assert row["spa_ref_model"] != "none" and row["score_error"] is None
    # the training moved the policy: its implicit rewards are not all zero
    assert max(abs(rows[f"s{i}"]["spa_margin"]) for i in range(3)) > 1e-3
    # EM on those margins: pref_conf is the posterior of the fitted ε̂, each flipped twin less trusted
    from curate.filters.noise import flip_posterior

    margins = np.array([rows[k]["spa_margin"] for k in sorted(rows)])
    for k, w in zip(sorted(rows), flip_posterior(margins, run.stats.stage("em").fit["eps_hat"])):
        assert rows[k]["pref_conf"] == pytest.approx(float(w), abs=1e-9)
