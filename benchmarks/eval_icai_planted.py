"""Does ICAI find a planted rule? Pairs labelled "prefer the shorter response", mined end to end on a real model.

1. Prompts: the first user turn of a seeded sample of HH-RLHF harmless-base test pairs
   (../shared/data; only the questions are used).
2. Replies: `--reply-model` (default: `--model`) answers each prompt twice (vLLM, T=0.7, top-p
   0.95), once told to be brief and once told to answer in detail (system prompts), so most
   pairs differ clearly in length.
3. The planted rule labels the pair: the shorter reply (characters) is chosen; pairs whose
   lengths differ by less than `--min-ratio` are left out, so length is a clear signal.
4. `mine_principles` with its defaults (METHODS §4 (d); `--clusters`, `--max-principles` as
   given) on the pairs, `--holdout` of them held out; the held-out rows are annotated with the
   mined constitution, without one, and (diagnostic) with the true rule written by hand, so we
   can tell "the annotator cannot apply a length rule" apart from "ICAI did not find it".
Prints the constitution, whether it holds a length principle (a regex over short / concise /
brief / length / long / verbose / wordy / succinct / fewer words), the three agreements with 95%
intervals, and the time of each step; `--out` writes them as JSON.

Example: python benchmarks/eval_icai_planted.py --pairs 120 --model smollm2-135m-instruct
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import time

import pyarrow as pa

from curate.backends.base import ChatRequest, GenerationParams
from curate.backends.params import LoadedModels, ModelParams
from curate.contract import MESSAGES
from curate.judges.constitution import evaluate_constitution
from curate.judges.icai import heldout
from curate.judges.icai_library import mine_principles

from hh_data import hh_pairs  # benchmarks/ is on sys.path when run as a script

LENGTH_RULE = re.compile(r"short|concise|brief|length|long|verbose|wordy|succinct|fewer words|less text|to the point",
                         re.IGNORECASE)
TRUE_RULE = ["Select the response that is shorter."]


SYSTEMS = ("Answer in one short sentence.", "Answer in detail, with several sentences and examples.")


def planted_pairs(n_prompts: int, model: str, max_tokens: int, min_ratio: float, seed: int, **options) -> pa.Table:
    """A brief and a detailed reply per prompt from `model`; the shorter one is chosen (the planted rule)."""
    prompts = [[m for m in msgs if m["role"] == "user"][:1] for msgs in hh_pairs(n_prompts, seed=seed).column("prompt").to_pylist()]
    backend = LoadedModels(ModelParams(**options), seed).get(model)
    requests = [ChatRequest([{"role": "system", "content": system}] + p,
                            GenerationParams(max_tokens=max_tokens, temperature=0.7, top_p=0.95), seed=i)
                for i, p in enumerate(prompts) for system in SYSTEMS]
    answers = backend.generate(requests)
    rows = []
    for i, prompt in enumerate(prompts):
        texts = sorted((a[0].text.strip() for a in answers[2 * i:2 * i + 2] if a[0].error is None and (a[0].text or "").strip()),
                       key=len)
        if len(texts) == 2 and len(texts[1]) >= min_ratio * len(texts[0]):
            rows.append({"id": f"planted-{i}", "prompt": prompt, "chosen": texts[0], "rejected": texts[1]})
    return pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("prompt", MESSAGES), ("chosen", pa.string()),
                                                        ("rejected", pa.string())]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=120, help="prompts to answer (pairs kept: those with a clear length gap)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reply-model", default=None, help="model that writes the replies (default: --model)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--min-ratio", type=float, default=1.5)
    parser.add_argument("--holdout", type=float, default=0.3)
    parser.add_argument("--clusters", type=int, default=40)
    parser.add_argument("--max-principles", type=int, default=5)
    parser.add_argument("--combine", default="unanimous", choices=["unanimous", "majority"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    options = {"dtype": args.dtype, "max_model_len": 4096}
    started = time.perf_counter()
    pairs = planted_pairs(args.pairs, args.reply_model or args.model, args.max_tokens, args.min_ratio, args.seed, **options)
    generated = time.perf_counter()
    print(f"{pairs.num_rows} planted pairs from {args.pairs} prompts ({generated - started:.0f} s)", flush=True)
    constitution = mine_principles(pairs, model=args.model, clusters=args.clusters, max_principles=args.max_principles,
                                   combine=args.combine, holdout=args.holdout, seed=args.seed, **options)
    mined = time.perf_counter()
    test = pairs.filter(pa.array([heldout(i, args.holdout, args.seed) for i in pairs.column("id").to_pylist()]))
    oracle = evaluate_constitution(test, TRUE_RULE, args.model, seed=args.seed, **options)
    found = [p for p in constitution.principles if LENGTH_RULE.search(p)]
    candidates = constitution.clusters.column("candidate").to_pylist()
    result = {"pairs": pairs.num_rows, "heldout": test.num_rows, "model": args.model,
              "reply_model": args.reply_model or args.model, "constitution": constitution.principles,
              "length_principles": found, "length_candidates": sum(bool(LENGTH_RULE.search(c)) for c in candidates),
              "candidates": len(candidates), "metrics": constitution.metrics.to_pylist(),
              "evaluation": constitution.evaluation, "true_rule_evaluation": oracle,
              "seconds": {"generate": generated - started, "mine_and_evaluate": mined - generated,
                          "true_rule": time.perf_counter() - mined}}
    print("constitution:\n" + (str(constitution) or "(empty: no principle passed the filter)"))
    print(f"length principle in the constitution: {bool(found)} {found}; length-related candidates "
          f"{result['length_candidates']}/{len(candidates)}")
    for name, figures in (("constitution", constitution.evaluation["constitution"]),
                          ("no constitution", constitution.evaluation["no_constitution"]),
                          ("true rule, hand-written", oracle["constitution"])):
        low, high = figures["ci95"] or (float("nan"), float("nan"))
        print(f"  {name}: agrees on {figures['agree']}/{figures['rows']} = {figures['share']:.1%} (95% CI {low:.1%}-{high:.1%})")
    print(f"annotators picked (a) on {constitution.evaluation['constitution']['picked_a']} (constitution), "
          f"{constitution.evaluation['no_constitution']['picked_a']} (none), {oracle['constitution']['picked_a']} (true rule) "
          f"of {test.num_rows} held-out rows")
    print(f"time: generate {result['seconds']['generate']:.0f} s, mine + evaluate {result['seconds']['mine_and_evaluate']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
