"""The CHES distribution on real preference pairs: a seeded HH-RLHF harmless-base subset, SmolLM2 as the model.

Scores the pairs with `ches_scores` (METHODS.md §5, fp32, 512-token budget), prints the
quantiles of `ln_ches` (and of raw `ches`, which grows with |y|², §5 (c)), how strongly each
follows the reply lengths, and examples of what the two selection modes remove:
the pairs just above the keep_lowest cut (the paper's 5%, [code README]) and the highest pairs,
which drop_highest removes first. Texts are cut when printed. Leaves out: training, so whether
the selection helps DPO on this model is not measured here.

Example: python benchmarks/eval_ches_hh.py --rows 150 --seed 0
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import pyarrow as pa

from curate.filters.ches import ches_scores, ches_select
from curate.sources import SourceSpec, ingest

HH = "/work/shared/data/hh-rlhf-harmless-test/test.jsonl.gz"
QUANTILES = (0.0, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 1.0)


def short(text: str, width: int = 110) -> str:
    """One line of at most `width` characters. Example: short("a\\nb") -> 'a / b'"""
    flat = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def show(table: pa.Table, title: str) -> None:
    """Print a few scored pairs: last user turn, chosen, rejected, scores and span lengths."""
    print(f"\n{title}")
    for row in table.to_pylist():
        user = next((m["content"] for m in reversed(row["prompt"]) if m["role"] == "user"), "")
        print(f"  [{row['id'][:10]}] ln_ches={row['ln_ches']:+.3f} ches={row['ches']:+.4g} "
              f"|y+|={row['ches_len_chosen']} |y-|={row['ches_len_rejected']}")
        print(f"      user:     {short(user)}")
        print(f"      chosen:   {short(row['chosen'])}")
        print(f"      rejected: {short(row['rejected'])}")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties broken by position; fine for a summary). Example: spearman(x, x) -> 1.0"""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=HH)
    parser.add_argument("--rows", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--keep-lowest", type=float, default=0.05)
    parser.add_argument("--drop-highest", type=float, default=0.10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the cores really free)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)

    table = ingest(SourceSpec(path=args.data, parse="hh"), ".").table
    picked = np.sort(np.random.default_rng(args.seed).choice(table.num_rows, size=args.rows, replace=False))
    table = table.take(pa.array(picked))
    started = time.perf_counter()
    scored = ches_scores(table, model=args.model, max_length=args.max_length)
    seconds = time.perf_counter() - started
    skipped = [r for r in scored.column("ches_skip_reason").to_pylist() if r]
    ok = scored.filter(scored.column("ches_skip_reason").is_null())
    ln = np.array(ok.column("ln_ches").to_pylist())
    raw = np.array(ok.column("ches").to_pylist())
    len_pos, len_neg = (np.array(ok.column(c).to_pylist()) for c in ("ches_len_chosen", "ches_len_rejected"))

    print(f"HH harmless-base test, {args.rows} pairs (seed {args.seed}), {args.model} fp32, "
          f"max_length {args.max_length}: {ok.num_rows} scored, {len(skipped)} skipped {sorted(set(skipped))}, "
          f"{seconds:.1f} s ({args.rows / seconds:.2f} rows/s)")
    print("quantile   " + " ".join(f"{q:>9.2f}" for q in QUANTILES))
    print("ln_ches    " + " ".join(f"{v:>+9.3f}" for v in np.quantile(ln, QUANTILES)))
    print("ches       " + " ".join(f"{v:>+9.3g}" for v in np.quantile(raw, QUANTILES)))
    print("|y+|       " + " ".join(f"{v:>9.0f}" for v in np.quantile(len_pos, QUANTILES)))
    print(f"mean ln_ches {ln.mean():+.3f}, sd {ln.std():.3f}; share > 0: {np.mean(ln > 0):.2f}")
    product = len_pos * len_neg
    print(f"spearman with |y+|·|y-|: ln_ches {spearman(ln, product):+.2f}, ches {spearman(raw, product):+.2f}; "
          f"ln_ches with |y+| {spearman(ln, len_pos):+.2f}, with |y-| {spearman(ln, len_neg):+.2f}")

    ordered = ok.take(pa.array(np.argsort(ln, kind="stable")))
    keep = ches_select(ok, "keep_lowest", args.keep_lowest)
    n_keep = sum(keep.column("ches_keep").to_pylist())
    drop = ches_select(ok, "drop_highest", args.drop_highest)
    n_drop = ok.num_rows - sum(drop.column("ches_keep").to_pylist())
    print(f"\nkeep_lowest {args.keep_lowest}: keeps {n_keep} of {ok.num_rows}; "
          f"drop_highest {args.drop_highest}: drops {n_drop}")
    show(ordered.slice(0, 3), f"lowest ln_ches (kept by keep_lowest {args.keep_lowest}):")
    show(ordered.slice(n_keep, 3), f"just above the keep_lowest cut (the first keep_lowest {args.keep_lowest} removes):")
    show(ordered.slice(ok.num_rows - 3, 3).take(pa.array([2, 1, 0])),
         f"highest ln_ches (removed by drop_highest {args.drop_highest}, and by keep_lowest):")


if __name__ == "__main__":
    main()
