"""How hard are HH-RLHF pairs for DPO to rank? Ranking accuracy and difficulty (METHODS.md §8.6) with SmolLM2 as reference.

1. Read a seeded sample of the HH-RLHF harmless-base test pairs (`benchmarks/hh_data.py`,
   `--pairs`, default 100).
2. Score both replies of every pair with the reference model (default SmolLM2-135M-Instruct,
   fp32, transformers: the defaults of `filters.ranking_difficulty`) through
   `curate.filters.difficulty_scores`.
3. Print how many pairs the reference already misranks (`ref_rank_correct` false: LP_ref(y_w) <
   LP_ref(y_l)), the same per token (`ref_rank_correct_norm`), the distribution of `difficulty_c`
   (quantiles; c > 0 = misranked), how many pairs even the idealized DPO optimum misranks
   (`ideal_correct` false) at each β of the paper's sweep with α = 0.999 (App. C.4) and with
   α = 0.75, and `flip_loss_threshold` at β = 0.1.

Example: OMP_NUM_THREADS=1 python benchmarks/eval_ranking_difficulty_hh.py --pairs 100 --threads 1
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hh_data import hh_arguments, hh_pairs, use_threads  # noqa: E402

from curate.filters.margins import as_float  # noqa: E402
from curate.filters.ranking_difficulty import ALPHA, difficulty_scores, ideal_log_margin  # noqa: E402

BETAS = (0.01, 0.1, 1.0, 5.0, 10.0)  # the paper's sweep (calculate_upper_bound_rlhf.py)


def summarize(table, seconds: float) -> dict:
    """The figures of the module docstring from a scored table. Example: summarize(scored, 12.0)["misranked"]"""
    c = as_float(table.column("difficulty_c"))
    scored = ~np.isnan(c)
    c_ok = c[scored]
    ratio = -c_ok
    rank = np.array(table.column("ref_rank_correct").to_pylist(), dtype=object)[scored]
    rank_norm = np.array(table.column("ref_rank_correct_norm").to_pylist(), dtype=object)[scored]
    quantiles = {f"q{int(q * 100):02d}": float(np.quantile(c_ok, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)} if len(c_ok) else {}
    ideal = {}
    for alpha in (ALPHA, 0.75):
        ideal[f"alpha={alpha}"] = {f"beta={b}": int((np.asarray(ideal_log_margin(ratio, alpha, b)) <= 0).sum()) for b in BETAS}
    threshold = as_float(table.column("flip_loss_threshold"))[scored]
    return {
        "pairs": table.num_rows, "scored": int(scored.sum()),
        "misranked": int((rank == False).sum()),  # noqa: E712
        "misranked_per_token": int((rank_norm == False).sum()),  # noqa: E712
        "difficulty_c": {"min": float(c_ok.min()), **quantiles, "max": float(c_ok.max()), "mean": float(c_ok.mean()),
                         "share_above_0": float((c_ok > 0).mean()), "share_above_10": float((c_ok > 10).mean()),
                         "share_above_50": float((c_ok > 50).mean())},
        "ideal_incorrect": ideal,
        "flip_loss_threshold_beta_0.1": {"median": float(np.median(threshold)), "min": float(threshold.min()),
                                         "max": float(threshold.max())},
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = hh_arguments(__doc__)
    parser.add_argument("--pairs", type=int, default=100, help="pairs in the seeded sample")
    parser.add_argument("--reference", default="smollm2-135m-instruct", help="the reference model")
    args = parser.parse_args()
    use_threads(args)
    pairs = hh_pairs(args.pairs, seed=args.seed, path=args.data)
    started = time.perf_counter()
    options = {"max_model_len": 8192} if args.backend == "vllm" else {}
    scored = difficulty_scores(pairs, args.reference, backend=args.backend, **options)
    result = {"reference": args.reference, "backend": args.backend, "seed": args.seed,
              **summarize(scored, time.perf_counter() - started)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
