"""Noise-aware filters: SPA threshold and smoothing (METHODS.md §6A), EM flip rate, rDPO / cDPO (§6B).

The hand-checkable cases of §6A (f) and §6B (f), EM on synthetic Bradley-Terry labels, the
implicit margin of a tiny random Llama policy against a second tiny random Llama reference
(checked against HFBackend.logprobs by hand), the global stages in a pipeline (fit over every
part, the same result for any split, ε̂ and τ in stats.json), the three EM actions, and the
frame adapters.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from curate.config import parse_pipeline
from curate.contract import MESSAGES, Verdict
from curate.filters.noise import (
    NoiseEM,
    NoiseEMParams,
    cdpo_loss,
    dpo_loss,
    em_flip_rate,
    flip_posterior,
    noise_filter,
    pref_conf,
    rdpo_loss,
    sigmoid,
)
from curate.filters.spa import implicit_margins, spa_filter, spa_label_smoothing, spa_threshold
from curate.runner import run_pipeline


def _pairs(margins, **extra) -> pa.Table:
    n = len(margins)
    columns = {
        "id": [f"r{i:03d}" for i in range(n)],
        "prompt": pa.array([[{"role": "user", "content": f"q{i}"}] for i in range(n)], MESSAGES),
        "chosen": [f"good {i}" for i in range(n)],
        "rejected": [f"bad {i}" for i in range(n)],
        "spa_margin": pa.array(margins, pa.float64()),
    }
    columns.update(extra)
    return pa.table(columns)


# §6A (f) -----------------------------------------------------------------------------------------------


def test_spa_threshold_of_margins_0_to_49_is_5_5():
    assert spa_threshold(np.arange(50.0), 0.1) == 5.5
    assert spa_threshold(np.random.default_rng(0).permutation(50).astype(float)) == 5.5  # order does not matter
    assert spa_threshold(list(range(50)), window=50) == 5.5  # the trainer's rolling buffer
    assert spa_threshold(range(60), window=50) == 15.5  # only the last 50 count: 10..59
    assert spa_threshold(range(49), window=50) is None  # buffer not full yet
    assert spa_threshold(pa.array([None, 1.0, float("nan")])) == 1.0 and spa_threshold([]) is None


def test_z5_gets_alpha_and_z6_gets_zero():
    assert spa_label_smoothing([5.0, 6.0], 5.5, alpha=0.1).tolist() == [0.1, 0.0]
    out = spa_filter(_pairs(np.arange(50.0)), quantile=0.1, action="smooth", alpha=0.1)
    rows = {r["spa_margin"]: r for r in out.select(["spa_margin", "spa_noisy", "label_smoothing"]).to_pylist()}
    assert (rows[5.0]["label_smoothing"], rows[5.0]["spa_noisy"]) == (0.1, True)
    assert (rows[6.0]["label_smoothing"], rows[6.0]["spa_noisy"]) == (0.0, False)
    assert sum(r["spa_noisy"] for r in rows.values()) == 6  # z = 0..5
    assert float(out.schema.metadata[b"curate.spa_tau"]) == 5.5


def test_no_smoothing_in_the_first_20_percent_of_steps():
    assert spa_label_smoothing(5.0, 5.5, 0.1, step=19, max_steps=100) == 0.0
    assert spa_label_smoothing(5.0, 5.5, 0.1, step=20, max_steps=100) == 0.1


def test_spa_refined_loss_is_0_4133():
    # (1−α)ℓ(βh) + αℓ(−βh) with α = 0.1, βh = 1 = 0.9·0.3133 + 0.1·1.3133
    alpha = spa_label_smoothing(5.0, 5.5, 0.1)
    assert dpo_loss(1.0) == pytest.approx(0.31326, abs=1e-5) and dpo_loss(-1.0) == pytest.approx(1.31326, abs=1e-5)
    assert cdpo_loss(1.0, alpha) == pytest.approx(0.4133, abs=5e-5)
    assert cdpo_loss(1.0, spa_label_smoothing(6.0, 5.5, 0.1)) == pytest.approx(dpo_loss(1.0))  # clean row: plain DPO


# §6B (f) -----------------------------------------------------------------------------------------------


def test_rdpo_and_cdpo_hand_values():
    assert rdpo_loss(0.0, 0.1) == pytest.approx(math.log(2), abs=1e-12)
    assert cdpo_loss(0.0, 0.1) == pytest.approx(math.log(2), abs=1e-12)
    assert round(math.log(2), 4) == 0.6931
    assert rdpo_loss(1.0, 0.1) == pytest.approx(0.18826, abs=5e-6)
    assert cdpo_loss(1.0, 0.1) == pytest.approx(0.41326, abs=5e-6)
    assert np.allclose(rdpo_loss(np.array([0.0, 1.0]), 0.1), [math.log(2), 0.188262], atol=1e-6)
    with pytest.raises(ValueError):
        rdpo_loss(1.0, 0.5)


def test_posterior_with_eps_0_2():
    w = flip_posterior([2.0, 0.0, -2.0], 0.2)
    assert np.round(w, 4).tolist() == [0.9673, 0.8000, 0.3512]
    m = np.array([2.0, 0.0, -2.0])  # the E-step as written in §6B (c)
    by_hand = 0.8 * sigmoid(m) / (0.8 * sigmoid(m) + 0.2 * sigmoid(-m))
    assert np.allclose(w, by_hand, atol=1e-12)
    assert flip_posterior([1.0, None], 0.0)[0] == 1.0 and np.isnan(flip_posterior([1.0, None], 0.2)[1])


def _synthetic(n=20_000, flip_rate=0.2, seed=0):
    """Clean Bradley-Terry labels with known margins, then `flip_rate` of them flipped."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0.0, 2.0, n)  # reward difference of the two responses, in logits
    clean = np.where(rng.random(n) < sigmoid(d), d, -d)  # margin oriented as the clean label: P = σ(d)
    flipped = rng.random(n) < flip_rate
    return np.where(flipped, -clean, clean), flipped


def test_em_recovers_the_flip_rate_within_0_03():
    margins, flipped = _synthetic()
    eps, w = em_flip_rate(margins)
    assert abs(eps - 0.2) <= 0.03, eps
    assert w.shape == margins.shape and np.all((w > 0) & (w < 1))
    assert w[flipped].mean() < w[~flipped].mean()  # the posterior points at the flipped rows
    assert abs(1 - w.mean() - eps) < 1e-6  # the fixed point of the M-step
    clean, _ = _synthetic(flip_rate=0.0)
    assert em_flip_rate(clean)[0] < 0.03  # no flips: ε̂ near the lower clip
    assert em_flip_rate([-5.0] * 100)[0] == 0.49  # clipped below ½


# The EM actions ----------------------------------------------------------------------------------------


def test_noise_em_actions_drop_flip_weight():
    margins = [3.0, 0.5, -0.5, -4.0, None]
    t = _pairs(margins, chosen_score=[5.0, 4.0, 3.0, 1.0, 2.0], rejected_score=[1.0, 2.0, 4.0, 5.0, 2.0],
               margin=[4.0, 2.0, -1.0, -4.0, 0.0])
    state = pa.table({"eps_hat": [0.2]})
    w = flip_posterior(margins, 0.2)  # [0.988, 0.868, 0.704, 0.0644, nan]

    dropped = NoiseEM(NoiseEMParams(action="drop")).apply(t, state)
    assert isinstance(dropped, Verdict)
    assert dropped.keep.to_pylist() == [True, True, True, False, True]
    assert dropped.reason.to_pylist() == [None, None, None, "likely_flipped", None]
    assert np.allclose(dropped.table.column("pref_conf").to_pylist()[:4], w[:4]) and dropped.table.column("pref_conf")[4].as_py() is None

    flipped = NoiseEM(NoiseEMParams(action="flip")).apply(t, state)
    rows = flipped.table.to_pylist()
    assert [r["noise_flipped"] for r in rows] == [False, False, False, True, False]
    assert (rows[3]["chosen"], rows[3]["rejected"]) == ("bad 3", "good 3")
    assert (rows[3]["chosen_score"], rows[3]["rejected_score"]) == (5.0, 1.0)
    assert rows[3]["spa_margin"] == 4.0 and rows[3]["margin"] == 4.0  # signed differences follow the swap
    assert rows[3]["pref_conf"] == pytest.approx(1 - w[3])  # P(the label as now written is right)
    assert rows[0]["chosen"] == "good 0" and rows[0]["pref_conf"] == pytest.approx(w[0])
    assert flipped.counters == {"margin_missing": 1, "flipped": 1, "likely_flipped": 1}

    weighted = NoiseEM(NoiseEMParams(action="weight")).apply(t, state)
    assert weighted.table.drop_columns(["pref_conf"]).equals(t)  # nothing else changes
    assert np.allclose(weighted.table.column("pref_conf").to_pylist()[:4], w[:4])
    assert weighted.counters == {"margin_missing": 1, "likely_flipped": 1}


def test_library_functions_fit_eps_and_store_it():
    margins, _ = _synthetic(n=2000, seed=1)
    t = _pairs(margins)
    scored, eps = pref_conf(t, "spa_margin")
    assert eps == pytest.approx(em_flip_rate(margins)[0]) and float(scored.schema.metadata[b"curate.eps_hat"]) == eps
    assert np.allclose(scored.column("pref_conf").to_numpy(), flip_posterior(margins, eps))
    kept = noise_filter(t, "spa_margin", action="drop")
    assert kept.num_rows == int((flip_posterior(margins, eps) >= 0.5).sum()) < t.num_rows
    assert noise_filter(t, "spa_margin", action="weight", eps=0.3).column("pref_conf").to_pylist() == pytest.approx(
        flip_posterior(margins, 0.3).tolist())
    spa_dropped = spa_filter(t, action="drop")
    tau = spa_threshold(margins)
    assert spa_dropped.num_rows == int((margins > tau).sum())


def test_frame_adapters_give_the_same_type_back():
    pl = pytest.importorskip("polars")
    pd = pytest.importorskip("pandas")
    datasets = pytest.importorskip("datasets")
    margins, _ = _synthetic(n=500, seed=2)
    t = _pairs(margins)
    want, eps = pref_conf(t)
    for frame, kind in ((pl.from_arrow(t), pl.DataFrame), (t.to_pandas(), pd.DataFrame),
                        (datasets.Dataset(t), datasets.Dataset)):
        got, got_eps = pref_conf(frame, "spa_margin")
        assert isinstance(got, kind) and got_eps == pytest.approx(eps)
        assert np.allclose(np.asarray(got["pref_conf"], dtype=float), want.column("pref_conf").to_numpy())
        smoothed = spa_filter(frame, action="smooth")
        assert isinstance(smoothed, kind) and sum(smoothed["spa_noisy"]) == 51  # indices 0..⌊500·0.1⌋
        assert isinstance(noise_filter(frame, "spa_margin", action="flip"), kind)


# Global stages in a pipeline: split-independence and stats.json -------------------------------------


def _margin_source(tmp_path, n=60, seed=3):
    margins, _ = _synthetic(n=n, seed=seed)
    margins[7] = np.nan  # one pair without a margin
    rows = [{"id": f"r{i:03d}", "prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}",
             "spa_margin": None if np.isnan(m) else float(m)} for i, m in enumerate(margins)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return margins


def _noise_run(tmp_path, part_rows, out, spa="smooth", em="weight"):
    text = f"""source: {{path: m.jsonl, part_rows: {part_rows}}}
stages:
  - stage: filters.spa
    params: {{action: {spa}, quantile: 0.1, alpha: 0.1}}
  - stage: filters.noise_em
    params: {{margin_column: spa_margin, action: {em}}}
"""
    stats = run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / out))
    import pyarrow.parquet as pq

    return stats, pq.read_table(tmp_path / out / "data").sort_by("id")


def test_global_threshold_and_eps_do_not_depend_on_the_split(tmp_path):
    margins = _margin_source(tmp_path)
    one, t1 = _noise_run(tmp_path, 1000, "one")
    many, t7 = _noise_run(tmp_path, 7, "seven")
    assert one["parts"] == 1 and many["parts"] == 9
    assert t1.equals(t7)
    valid = margins[~np.isnan(margins)]
    tau = spa_threshold(valid)
    eps = em_flip_rate(valid)[0]
    for stats in (one, many):
        spa, em = stats["stages"][1], stats["stages"][2]
        assert spa["fit"] == {"tau": tau, "n": 59}
        assert em["fit"]["eps_hat"] == pytest.approx(eps, abs=1e-12) and em["fit"]["n"] == 59 and em["fit"]["converged"]
        assert spa["counters"] == {"noisy": int((valid <= tau).sum()), "margin_missing": 1}
    assert json.loads((tmp_path / "seven" / "stats.json").read_text())["stages"][2]["fit"]["eps_hat"] == em["fit"]["eps_hat"]
    # per-part thresholds would differ: the 9 parts' own τ are not all equal to the global one
    assert any(spa_threshold(margins[i:i + 7]) != tau for i in range(0, 60, 7))
    rows = t7.to_pylist()
    assert all(r["label_smoothing"] == (0.1 if r["spa_noisy"] else 0.0) for r in rows)
    assert next(r for r in rows if r["id"] == "r007")["spa_noisy"] is None


def test_drop_actions_in_a_pipeline_keep_rejects_with_reasons(tmp_path):
    _margin_source(tmp_path)
    stats, table = _noise_run(tmp_path, 7, "drop", spa="drop", em="drop")
    import pyarrow.parquet as pq

    assert stats["dropped"]["spa_noisy"] == 6
    assert stats["rows_out"] + sum(stats["dropped"].values()) == 60
    rejects = pq.read_table(tmp_path / "drop" / "rejects" / "spa")
    assert set(rejects.column("reason").to_pylist()) == {"spa_noisy"} and all(rejects.column("spa_noisy").to_pylist())
    if stats["dropped"].get("likely_flipped"):
        em_rejects = pq.read_table(tmp_path / "drop" / "rejects" / "noise_em").to_pylist()
        assert all(r["reason"] == "likely_flipped" and r["pref_conf"] < 0.5 for r in em_rejects)
    assert all(c >= 0.5 for c in table.column("pref_conf").to_pylist() if c is not None)


# Implicit margins on two tiny random Llamas --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two 2-layer random Llamas (seeds 0 and 1) sharing SmolLM2's tokenizer: policy and reference.

    Torch runs on one thread here: on a 2-core machine with anything else running, two torch
    threads were 20x slower on these tiny forwards (ENVIRONMENT.md: oversubscription).
    """
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from curate.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight.mul_(4.0)  # spread the logits so the two models disagree visibly
        path = tmp_path_factory.mktemp(f"tiny-llama-{seed}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    yield paths
    from curate.backends.base import close_backends

    close_backends()
    torch.set_num_threads(threads)


PAIRS = [
    ("What is the capital of France?", "Paris.", "Bananas are yellow."),
    ("Say hi.", "Hi! How can I help?", "no"),
    ("Name a colour.", "Blue", "I cannot answer that question, sorry."),
]


def _text_pairs(rows=PAIRS) -> pa.Table:
    return pa.table({
        "id": [f"t{i}" for i in range(len(rows))],
        "prompt": pa.array([[{"role": "user", "content": p}] for p, _, _ in rows], MESSAGES),
        "chosen": [c for _, c, _ in rows],
        "rejected": [r for _, _, r in rows],
    })


def test_implicit_margins_match_a_hand_computation(tiny_pair):
    from curate.backends.base import ScoreItem
    from curate.backends.hf import HFBackend

    policy, reference = tiny_pair
    t = _text_pairs()
    out = implicit_margins(t, policy=policy, reference=reference, beta=0.1, backend="transformers")
    by_hand = []
    with HFBackend(policy, dtype="float32") as pol, HFBackend(reference, dtype="float32") as ref:
        for prompt, good, bad in PAIRS:  # one row at a time: no batching shared with the library call
            items = [ScoreItem([{"role": "user", "content": prompt}], text) for text in (good, bad)]
            (pw, pl), (rw, rl) = ([float(x.sum()) for x in b.logprobs(items)] for b in (pol, ref))
            lp = {"pw": pw, "pl": pl, "rw": rw, "rl": rl}
            by_hand.append((lp, 0.1 * ((pw - rw) - (pl - rl))))
    rows = out.to_pylist()
    for row, (lp, z) in zip(rows, by_hand):
        assert row["spa_margin"] == pytest.approx(z, abs=1e-5)
        assert row["spa_lp_policy_chosen"] == pytest.approx(lp["pw"], abs=1e-4)
        assert row["spa_lp_ref_rejected"] == pytest.approx(lp["rl"], abs=1e-4)
        assert row["spa_conf"] == pytest.approx(1 / (1 + math.exp(-row["spa_margin"])))
        assert row["spa_error"] is None and row["spa_tokens_chosen"] >= 2
        assert (row["spa_model"], row["spa_ref_model"]) == (policy, reference)
    assert len({round(r["spa_margin"], 6) for r in rows}) == 3 and any(abs(r["spa_margin"]) > 1e-3 for r in rows)
    # no reference: β·(LP(y_w) − LP(y_l)) of the policy alone; the ref columns stay null. Through
    # polars, with a row whose rejected reply is null (a row error, not an exception)
    pl = pytest.importorskip("polars")
    with_null = pa.concat_tables([t, _text_pairs([("q", "a", "b")]).set_column(3, "rejected", pa.array([None], pa.string()))])
    alone = implicit_margins(pl.from_arrow(with_null), policy, None, beta=0.5, backend="transformers")
    assert isinstance(alone, pl.DataFrame)
    alone = alone.to_arrow().to_pylist()
    for row, (lp, _) in zip(alone, by_hand):
        assert row["spa_margin"] == pytest.approx(0.5 * (lp["pw"] - lp["pl"]), abs=1e-5)
        assert row["spa_lp_ref_chosen"] is None and row["spa_ref_model"] == "none" and row["spa_error"] is None
    assert alone[3]["spa_error"] == "null rejected" and alone[3]["spa_margin"] is None
    mean = implicit_margins(t, policy, None, beta=1.0, backend="transformers", normalize="mean").to_pylist()
    assert mean[0]["spa_margin"] == pytest.approx(
        mean[0]["spa_lp_policy_chosen"] - mean[0]["spa_lp_policy_rejected"])
    assert mean[0]["spa_lp_policy_chosen"] == pytest.approx(by_hand[0][0]["pw"] / rows[0]["spa_tokens_chosen"], abs=1e-5)


def test_spa_score_stage_then_filters_end_to_end(tiny_pair, tmp_path):
    policy, reference = tiny_pair
    rows = [{"id": f"t{i}", "prompt": p, "chosen": c, "rejected": r} for i, (p, c, r) in enumerate(PAIRS * 4)]
    rows[5]["rejected"] = "word " * 600  # longer than the tiny model's 512 positions: a row error, not a failed run
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = f"""source: {{path: x.jsonl, part_rows: 5}}
stages:
  - stage: filters.spa_score
    params: {{policy: {policy}, reference: {reference}, backend: transformers, beta: 0.1}}
  - stage: filters.spa
  - stage: filters.noise_em
    params: {{action: weight}}
"""
    stats = run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / "out"))
    import pyarrow.parquet as pq

    out = pq.read_table(tmp_path / "out" / "data").sort_by("id").to_pylist()
    assert len(out) == 12 and stats["stages"][1]["counters"]["row_errors"] == 1
    bad = next(r for r in out if r["id"] == "t5")
    assert "tokens, limit 512" in bad["spa_score_error"] and bad["spa_margin"] is None and bad["pref_conf"] is None
    same = [r["spa_margin"] for r in out if r["id"] in ("t0", "t3", "t6", "t9")]  # the same pair four times
    assert max(same) - min(same) < 1e-5
    assert stats["stages"][2]["fit"]["n"] == 11 and 0.0 <= stats["stages"][3]["fit"]["eps_hat"] <= 0.49
