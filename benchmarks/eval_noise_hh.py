"""Can the noise filters find flipped labels in real preference data? HH-RLHF harmless, 20% flipped.

1. Read the HH-RLHF harmless-base test file (`parse: hh`: conversational prompt, final chosen
   and rejected replies), draw a seeded random subset (`--rows`, default 200).
2. Flip `--flip-rate` (default 20%) of the pairs, chosen <-> rejected, drawn with a fixed seed.
3. Score every pair with SmolLM2-135M-Instruct (fp32, `implicit_margins`).
4. Print the AUC at finding the flipped rows of
   (a) `pref_conf` from EM (`pref_conf`, METHODS.md §6B) on a margin column (score: 1 − pref_conf),
   (b) the SPA margin itself (score: −spa_margin; SPA calls the lowest 10% noisy, §6A),
   plus ε̂, and the precision / recall of the two rules: `w < 0.5` (noise_em drop) and
   `z ≤ Q_0.10(z)` (filters.spa).

Which policy / reference. `--reference none` (the default, as first measured): the policy is
SmolLM2-135M-Instruct alone and the margin is its own log-likelihood margin,
`β·(LP(y_w) − LP(y_l))`, *not* an implicit DPO reward. With `--model` the DPO-trained SmolLM2 of
benchmarks/train_dpo_pair.py and `--reference smollm2-135m-instruct` (its SFT starting point)
the margin is SPA's implicit DPO margin. Two forms are reported, from one scoring pass: the
summed one (β = 0.1, SPA's default) and the length-normalised one (per response token, β = 1).
Each AUC comes with a 95% bootstrap interval (2,000 seeded resamples of the rows). Because `pref_conf` is a
monotone function of the margin for a fixed ε̂, its AUC equals the AUC of the margin it was
fitted on; what EM adds is ε̂ and a calibrated 0.5 cut, which are only as good as the
margin's calibration as a logit (β is not tuned here).

Example: python benchmarks/eval_noise_hh.py --rows 200
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.filters.noise import pref_conf
from curate.filters.spa import implicit_margins, spa_filter
from curate.pairing import swap_pairs
from curate.sources import SourceSpec, ingest

REPO = Path(__file__).resolve().parent.parent
HH_FILE = os.environ.get("CURATE_HH_FILE", str(REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test" / "test.jsonl.gz"))


def auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Rank-based ROC AUC (Mann-Whitney U), ties counted one half; NaN scores left out.

    Example: auc(np.array([0.9, 0.1, 0.5]), np.array([True, False, False])) -> 1.0
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives, dtype=bool)
    ok = ~np.isnan(s)
    s, y = s[ok], y[ok]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average 1-based rank of tied values
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def precision_recall(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float, int]:
    predicted = np.asarray(predicted, dtype=bool)
    hits = int((predicted & truth).sum())
    return (hits / predicted.sum() if predicted.sum() else float("nan")), hits / truth.sum(), int(predicted.sum())


def load_subset(path: str, rows: int, seed: int, flip_rate: float) -> tuple[pa.Table, np.ndarray]:
    """A seeded subset of the HH pairs with `flip_rate` of them flipped; returns (table, flipped mask)."""
    table = ingest(SourceSpec(path=path, parse="hh"), ".").table
    rng = np.random.default_rng(seed)
    rows = min(rows, table.num_rows)
    subset = table.take(np.sort(rng.choice(table.num_rows, rows, replace=False)))
    flipped = np.zeros(rows, dtype=bool)
    flipped[rng.choice(rows, int(round(flip_rate * rows)), replace=False)] = True
    return swap_pairs(subset, pa.array(flipped)), flipped


def auc_interval(scores: np.ndarray, positives: np.ndarray, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of `auc` over rows. Example: auc_interval(s, y) -> [0.61, 0.78]"""
    rng = np.random.default_rng(seed)
    n = len(scores)
    draws = [auc(scores[idx], positives[idx]) for idx in (rng.integers(0, n, n) for _ in range(resamples))]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return [float(low), float(high)]


def evaluate(margin: np.ndarray, flipped: np.ndarray, table: pa.Table, column: str) -> dict:
    """AUCs, ε̂ and the two rules' precision / recall for one margin column."""
    t = table.append_column(column, pa.array(margin, pa.float64(), mask=np.isnan(margin)))
    with_conf, eps_hat = pref_conf(t, column)
    w = with_conf.column("pref_conf").to_numpy(zero_copy_only=False)
    noisy = spa_filter(t, quantile=0.1, action="smooth", margin_column=column).column("spa_noisy")
    noisy = pc.fill_null(noisy, False).to_numpy(zero_copy_only=False)
    p_em, r_em, n_em = precision_recall(w < 0.5, flipped)
    p_spa, r_spa, n_spa = precision_recall(noisy, flipped)
    return {
        "auc_em_pref_conf": auc(1.0 - w, flipped),
        "auc_margin": auc(-margin, flipped),
        "auc_margin_ci95": auc_interval(-margin, flipped),
        "eps_hat": eps_hat,
        "em_drop_w_lt_0_5": {"flagged": n_em, "precision": p_em, "recall": r_em},
        "spa_bottom_10pct": {"flagged": n_spa, "precision": p_spa, "recall": r_spa},
        "label_agreement_unflipped": float(np.mean(margin[~flipped] > 0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=HH_FILE, help="HH-RLHF jsonl(.gz) file")
    parser.add_argument("--rows", type=int, default=200, help="pairs in the seeded subset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the flips")
    parser.add_argument("--flip-rate", type=float, default=0.2, help="share of pairs flipped")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="policy (scorer)")
    parser.add_argument("--reference", default="none", help="reference model ('none': the policy's own margin)")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    table, flipped = load_subset(args.data, args.rows, args.seed, args.flip_rate)
    options = {"max_model_len": 8192} if args.backend == "vllm" else {}
    load_started = time.perf_counter()
    reference = None if args.reference == "none" else args.reference
    scored = implicit_margins(table, policy=args.model, reference=reference, beta=0.1, backend=args.backend, **options)
    score_seconds = time.perf_counter() - load_started
    lp_w = scored.column("spa_lp_policy_chosen").to_numpy(zero_copy_only=False)
    lp_l = scored.column("spa_lp_policy_rejected").to_numpy(zero_copy_only=False)
    n_w = scored.column("spa_tokens_chosen").to_numpy(zero_copy_only=False).astype(float)
    n_l = scored.column("spa_tokens_rejected").to_numpy(zero_copy_only=False).astype(float)
    if reference is not None:
        lp_w = lp_w - scored.column("spa_lp_ref_chosen").to_numpy(zero_copy_only=False)
        lp_l = lp_l - scored.column("spa_lp_ref_rejected").to_numpy(zero_copy_only=False)
    kind = "logprob" if reference is None else "logratio"
    margins = {
        f"sum_{kind}_beta_0.1 (spa_margin)": scored.column("spa_margin").to_numpy(zero_copy_only=False),
        f"mean_{kind}_per_token_beta_1": lp_w / n_w - lp_l / n_l,
    }
    errors = [e for e in scored.column("spa_error").to_pylist() if e is not None]
    results = {name: evaluate(m, flipped, scored, "m") for name, m in margins.items()}
    report = {
        "data": args.data, "rows": table.num_rows, "flipped": int(flipped.sum()), "seed": args.seed,
        "policy": args.model, "reference": args.reference, "backend": args.backend, "dtype": "float32",
        "margin_note": ("policy-only log-likelihood margin, beta*(LP(y_w)-LP(y_l)); not an implicit DPO reward"
                        if reference is None else "implicit DPO margin of the policy over the reference"),
        "row_errors": len(errors), "tokens_scored": int(np.nansum(n_w) + np.nansum(n_l)),
        "scoring_seconds": round(score_seconds, 1), "total_seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    print(f"data: {args.data}\nsubset: {table.num_rows} pairs (seed {args.seed}), {int(flipped.sum())} flipped "
          f"(chosen <-> rejected)\npolicy: {args.model} ({args.backend}, fp32); reference: {args.reference} -> "
          f"{report['margin_note']}\nrow errors: {len(errors)}; "
          f"scored {report['tokens_scored']} response tokens in {score_seconds:.1f} s (model load included)")
    print(f"{'margin':36s} {'AUC (a) EM pref_conf':>21s} {'AUC (b) margin [95% CI]':>24s} {'eps_hat':>8s} "
          f"{'w<0.5 P/R (n)':>18s} {'SPA 10% P/R (n)':>18s} {'clean agree':>11s}")
    for name, r in results.items():
        em, spa = r["em_drop_w_lt_0_5"], r["spa_bottom_10pct"]
        low, high = r["auc_margin_ci95"]
        print(f"{name:36s} {r['auc_em_pref_conf']:21.3f} {r['auc_margin']:9.3f} [{low:.3f}-{high:.3f}] {r['eps_hat']:8.3f} "
              f"{em['precision']:8.2f}/{em['recall']:.2f} ({em['flagged']:3d}) "
              f"{spa['precision']:8.2f}/{spa['recall']:.2f} ({spa['flagged']:3d}) {r['label_agreement_unflipped']:11.3f}")
    print(f"total {report['total_seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
