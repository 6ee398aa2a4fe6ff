"""RSO (METHODS.md §8.4) on real rewards: what `pairs.rso` accepts from SmolLM2 candidates scored by CDR.

1. Run `pipelines/rso.yaml` (SmolLM2-135M-Instruct writes N=8 candidates per prompt, CDR of
   SmolLM2 over Gemma 3 270M scores them, `pairs.rso` accepts m=4 with β=0.5, best vs worst of the
   accepted), or read a finished run of it (`--run`).
2. From the published pairs (each keeps the full `cdr_rewards` list and `rso_accepted`), print:
   the spread of the rewards within a prompt, the rounds the acceptance took, how often the best
   candidate is accepted, and where the accepted candidates sit in their prompt's ranking
   (0 = worst, 1 = best; m of N drawn uniformly give 0.5 on average, the top m give
   (N − (m+1)/2)/(N − 1)).
3. Re-draw the acceptance on the same rewards with `--draws` seeds for several β (the stage's own
   `accepted_lists`, seeds 0..draws−1): how the accepted set moves from the top m (small β) to a
   uniform draw (large β), relative to the rewards' scale.

Example: OMP_NUM_THREADS=1 python benchmarks/eval_rso.py --out /tmp/rso
Example: python benchmarks/eval_rso.py --run /tmp/rso/out --draws 200
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy.stats import rankdata

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from curate.config import load_pipeline  # noqa: E402
from curate.generators.rso import accepted_lists  # noqa: E402
from curate.runner import run_pipeline  # noqa: E402

BETAS = (0.1, 0.5, 2.0, 10.0, 50.0, 1000.0)


def rank_percentiles(rewards: list[float], indices: list[int]) -> list[float]:
    """Where each index sits in its row's ranking, 0 = worst, 1 = best (ties share their mean rank).

    Example: rank_percentiles([3.0, 1.0, 2.0], [0]) -> [1.0]
    """
    order = rankdata(rewards, method="average") - 1  # 0-based; ties share their mean rank
    return [float(order[i]) / (len(rewards) - 1) for i in indices]


def describe(rows: list[dict], m: int) -> list[str]:
    """The figures of step 2 on the published pairs."""
    n = len(rows[0]["cdr_rewards"])
    spreads = [max(r["cdr_rewards"]) - min(r["cdr_rewards"]) for r in rows]
    gaps = [sorted(r["cdr_rewards"])[-1] - sorted(r["cdr_rewards"])[-2] for r in rows]
    rounds = [max(r["rso_round"]) for r in rows]
    best = [int(np.argmax(r["cdr_rewards"])) in r["rso_accepted"] for r in rows]
    pct = [statistics.mean(rank_percentiles(r["cdr_rewards"], r["rso_accepted"])) for r in rows]
    margin = [r["chosen_score"] - r["rejected_score"] for r in rows]
    return [
        f"prompts with a pair: {len(rows)}; N = {n} candidates, m = {m} accepted each",
        f"reward spread within a prompt (max - min, nats): median {statistics.median(spreads):.1f}, "
        f"min {min(spreads):.1f}, max {max(spreads):.1f}; best minus second best: median {statistics.median(gaps):.2f}",
        f"rounds to accept m: median {statistics.median(rounds)}, max {max(rounds)} (m rounds = one per round)",
        f"best candidate accepted: {sum(best)}/{len(rows)}",
        f"mean rank percentile of the accepted: {statistics.mean(pct):.3f} (uniform draw 0.5, top {m} "
        f"{(n - (m + 1) / 2) / (n - 1):.3f})",
        f"chosen - rejected reward of the published pair: median {statistics.median(margin):.1f} nats "
        f"(best - worst of all N: median {statistics.median(spreads):.1f})",
    ]


def sweep(rows: list[dict], m: int, draws: int, scope: str) -> list[str]:
    """Step 3: the accepted set's mean rank percentile and best-accepted rate over β, `draws` seeds each."""
    rewards = [r["cdr_rewards"] for r in rows]
    ids = [r["prompt_id"] for r in rows]
    lines = ["| β | mean rank percentile of the accepted | best accepted | accepted in round 1 |", "|---|---|---|---|"]
    for beta in BETAS:
        pct, best, first = [], 0, 0
        for seed in range(draws):
            accepted, rounds = accepted_lists(rewards, ids, m, beta, scope, seed)
            for row, acc, rnd in zip(rewards, accepted, rounds):
                pct.append(statistics.mean(rank_percentiles(row, acc)))
                best += int(np.argmax(row)) in acc
                first += sum(1 for k in rnd if k == 1)
        total = draws * len(rows)
        lines.append(f"| {beta:g} | {statistics.mean(pct):.3f} | {best / total:.2f} | {first / (total * m):.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished run of pipelines/rso.yaml (skip step 1)")
    parser.add_argument("--out", default="out/rso", help="where step 1 writes its run")
    parser.add_argument("--draws", type=int, default=500, help="seeds per β in step 3")
    args = parser.parse_args()
    spec = load_pipeline(str(REPO / "pipelines" / "rso.yaml"))
    rso = next(b for b in spec.stages if b.stage.name == "pairs.rso")
    m, scope = rso.stage.params.m, f"{rso.id}:accept"
    out = args.run
    if out is None:
        started = time.perf_counter()
        run_pipeline(spec, out=args.out)
        print(f"pipelines/rso.yaml: {time.perf_counter() - started:.0f} s")
        out = args.out
    rows = pq.read_table(Path(out) / "data").to_pylist()
    print("\n".join(describe(rows, m)))
    again, _ = accepted_lists([r["cdr_rewards"] for r in rows], [r["prompt_id"] for r in rows], m, rso.stage.params.beta,
                              scope, spec.spec.seed)
    print(f"acceptance re-drawn with the run's seed equals the published one: {again == [r['rso_accepted'] for r in rows]}")
    print(f"\nthe acceptance re-drawn on these rewards, {args.draws} seeds per β:")
    print("\n".join(sweep(rows, m, args.draws, scope)))


if __name__ == "__main__":
    main()
