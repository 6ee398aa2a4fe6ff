"""CREAM (METHODS.md §1C) end to end: the DPO-trained SmolLM2 against its reference and the untouched model, on HH prompts.

1. Take a seeded sample of HH-RLHF harmless-base test prompts (`--prompts`, default 12; the
   replies are dropped).
2. `generators.responses`: the current model M_t (default: the DPO-trained SmolLM2 at
   `$CURATE_CACHE/trained/smollm2-135m-dpo-hh`, written by `benchmarks/train_dpo_pair.py`)
   writes N candidates per prompt (§1C (d): N=5, T=0.8, top-p 0.95; `--max-tokens` caps the
   length, 768 in the paper).
3. `judges.cream`: M_t against its reference (SmolLM2-135M-Instruct, the model it was trained
   from) and the previous iteration M_{t−1} (SmolLM2-135M-Instruct, untouched), Kendall τ; then
   `judges.cream_avg` for the dataset mean.
4. Print the distribution of `cream_consistency`, the mean C (the `consistency_avg` weight), how
   many rows both models agree on the top / bottom candidate, pairs kept and dropped.

Example: OMP_NUM_THREADS=1 python benchmarks/eval_cream_hh.py --prompts 12 --threads 1
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hh_data import hh_arguments, hh_pairs, use_threads  # noqa: E402
from train_dpo_pair import DEFAULT_OUT as TRAINED  # noqa: E402  (where the trained policy is cached)

from curate.config import parse_pipeline  # noqa: E402
from curate.judges.cream import rank_consistency  # noqa: E402
from curate.record import load_run  # noqa: E402
from curate.runner import run_pipeline  # noqa: E402

REFERENCE = "smollm2-135m-instruct"


def pipeline_text(source: str, current: str, reference: str, previous: str, n: int, max_tokens: int) -> str:
    """The CREAM round as a pipeline. Example: pipeline_text("p.parquet", "dpo", "sft", "sft", 5, 128)"""
    return f"""
source: {{path: {source}, part_rows: 64}}
seed: 0
stages:
  - stage: generators.responses
    id: policy
    params: {{model: {current}, backend: transformers,
             generation: {{max_tokens: {max_tokens}, n: {n}, temperature: 0.8, top_p: 0.95}}}}
  - {{stage: judges.cream, id: cream, params: {{policy: {current}, reference: {reference}, previous: {previous}, backend: transformers}}}}
  - {{stage: judges.cream_avg, id: avg}}
"""


def main() -> None:
    parser = hh_arguments(__doc__)
    parser.add_argument("--prompts", type=int, default=12, help="HH prompts in the seeded sample")
    parser.add_argument("--current", default=TRAINED, help="M_t (default: the DPO-trained SmolLM2)")
    parser.add_argument("--reference", default=REFERENCE, help="M_t's reference")
    parser.add_argument("--previous", default=REFERENCE, help="M_{t-1}")
    parser.add_argument("-n", type=int, default=5, help="candidates per prompt (§1C: 5)")
    parser.add_argument("--max-tokens", type=int, default=96, help="longest candidate")
    args = parser.parse_args()
    use_threads(args)
    if not os.path.exists(os.path.join(args.current, "config.json")) and args.current == TRAINED:
        raise SystemExit(f"no trained policy at {TRAINED}: run benchmarks/train_dpo_pair.py first, or pass --current")
    prompts = hh_pairs(args.prompts, seed=args.seed, path=args.data).select(["id", "prompt"])
    with tempfile.TemporaryDirectory() as work:
        pq.write_table(prompts, os.path.join(work, "prompts.parquet"))
        started = time.perf_counter()
        text = pipeline_text("prompts.parquet", args.current, args.reference, args.previous, args.n, args.max_tokens)
        run_pipeline(parse_pipeline(text, os.path.join(work, "p.yaml")), out=os.path.join(work, "out"))
        seconds = time.perf_counter() - started
        run = load_run(os.path.join(work, "out"))
        rows = pq.read_table(os.path.join(work, "out", "data")).to_pylist()
        counters, fit = run.stats.stage("cream").counters, run.stats.stage("avg").fit
    c = np.array([r["cream_consistency"] for r in rows if r["cream_consistency"] is not None], dtype=np.float64)
    top = [rank_consistency(r["cream_reward_cur"], r["cream_reward_prev"], "toporder") for r in rows]
    result = {
        "current": args.current, "reference": args.reference, "previous": args.previous, "prompts": prompts.num_rows,
        "candidates_per_prompt": args.n, "max_tokens": args.max_tokens, "pairs": len(rows),
        "dropped": counters["rows"] - counters["pairs"], "row_errors": counters["row_errors"],
        "mean_consistency_all_rows": fit["mean_consistency"],
        "consistency_of_pairs": {"mean": float(c.mean()), "min": float(c.min()), "median": float(np.median(c)),
                                 "max": float(c.max()), "share_at_least_0.5": float((c >= 0.5).mean())} if len(c) else {},
        "top_and_bottom_agree": int(sum(t == 1.0 for t in top)),
        "current_reward_spread": float(np.mean([np.nanmax(np.array(r["cream_reward_cur"], float))
                                                - np.nanmin(np.array(r["cream_reward_cur"], float)) for r in rows]))
        if rows else None,
        "seconds": round(seconds, 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
