"""Parse-failure rate of the judges on SmolLM2-135M-Instruct, with and without constrained output.

Self-reward judge on candidates generated in the run (`--prompts` hand-written prompts x n=2),
and the pairwise judge on HH-RLHF pairs from ../shared/data (`--pairs`), each run twice: vLLM
structured outputs on and off. Prints judgments, parse failures and their share.

Example: python benchmarks/eval_judge_parse.py --prompts 6 --pairs 6
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import pyarrow as pa

from curate.contract import MESSAGES
from curate.generators.responses import Responses, ResponsesParams
from curate.judges.pairwise import PairwiseJudge, PairwiseParams
from curate.judges.self_reward import SelfRewardJudge, SelfRewardParams

from hh_data import hh_pairs  # benchmarks/ is on sys.path when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "smollm2-135m-instruct"


def rate(counters: dict) -> str:
    return f"{counters['parse_failures']}/{counters['judgments']} = {counters['parse_failures'] / counters['judgments']:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with open(os.path.join(HERE, "..", "pipelines", "data", "prompts.jsonl")) as f:
        prompts = [json.loads(line)["prompt"] for line in f][: args.prompts]
    table = pa.table({"id": [f"q{i}" for i in range(len(prompts))],
                      "prompt": pa.array([[{"role": "user", "content": p}] for p in prompts], MESSAGES)})
    gen = Responses(ResponsesParams(model=MODEL, dtype="bfloat16", generation={"max_tokens": 128, "n": 2, "temperature": 0.7, "top_p": 0.9}))
    candidates = gen.apply(table).table
    for constrained in (True, False):
        judge = SelfRewardJudge(SelfRewardParams(model=MODEL, dtype="bfloat16", constrained=constrained,
                                                 generation={"max_tokens": 300, "temperature": 0.7, "top_p": 0.9}))
        out = judge.apply(candidates)
        print(f"self_reward constrained={constrained}: parse failures {rate(out.counters)}")
    pairs = hh_pairs(args.pairs, seed=0)
    for constrained in (True, False):
        judge = PairwiseJudge(PairwiseParams(model=MODEL, dtype="bfloat16", constrained=constrained, max_model_len=4096,
                                             generation={"max_tokens": 300, "temperature": 1.0}))
        out = judge.apply(pairs)
        c = out.counters
        print(f"pairwise constrained={constrained}: parse failures {rate(c)}; swap-consistent "
              f"{c['swap_consistent']}/{c['pairs_with_both_orders']}; verdicts win/tie/lose "
              f"{c['verdict_win']}/{c['verdict_tie']}/{c['verdict_lose']}")


if __name__ == "__main__":
    main()
