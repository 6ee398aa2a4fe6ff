"""Judge throughput against the raw engine, measured in one run on the same engine and inputs.

HH-RLHF pairs from ../shared/data (seeded sample) go through each judge stage, timed around
`stage.apply` (Arrow part in, judge columns out: prompt rendering, requests, parsing, columns),
and through a raw `vllm.LLM.generate` call on the same token ids with the same sampling params
and per-request seeds (built by the stage's own request methods, so both sides do the same
engine work; the generated token counts are equal and checked):
- `self_reward` (§1A): chosen and rejected as two candidates, k samples each, constrained output;
- `pairwise` (§8.1): both orders, k samples each, constrained output;
- `cdr` (§2): prefill-only prompt log-prob requests on the strong and the weak engine;
- `rationale` (§3): one rationale per pair (T=0.7, top-p 0.9, seeded per row), role rewrite,
  x_rat and the edit-distance leakage guard.
Prints rows/s, tok/s (generated tokens for the generative judges, scored prompt+response tokens
for CDR) and the ratio curate / raw (1.0 = no overhead). Median of `--repeats` after a warm-up.

Example: python benchmarks/bench_judges.py --pairs 8 --samples 2 --max-tokens 96
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Callable

import pyarrow as pa

from curate.backends.base import encode_item, encode_prompt

from hh_data import hh_pairs  # benchmarks/ is on sys.path when run as a script

MODEL = "smollm2-135m-instruct"


def timed(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Median seconds of `repeats` calls after one warm-up, and the work count of the last call."""
    fn()
    times, work = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        work = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), work


def report(name: str, rows: int, raw: tuple[float, int], cur_s: float, unit: str) -> None:
    """Rows/s and tok/s of both sides (the same token work: equal seeds and params) and the ratio."""
    raw_s, tokens = raw
    print(f"{name} ({rows} rows, {tokens} {unit}s):")
    print(f"  raw engine:   {rows / raw_s:7.2f} rows/s  {tokens / raw_s:8.1f} {unit}/s")
    print(f"  curate stage: {rows / cur_s:7.2f} rows/s  {tokens / cur_s:8.1f} {unit}/s")
    print(f"  ratio curate/raw: {raw_s / cur_s:.3f}", flush=True)


def raw_generate(backend, requests) -> Callable[[], int]:
    """The engine call alone: token prompts and SamplingParams prepared beforehand."""
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=encode_prompt(backend.tokenizer, r.messages)) for r in requests]
    params = [backend._sampling(r) for r in requests]
    return lambda: sum(len(c.token_ids) for o in backend.llm.generate(prompts, params, use_tqdm=False) for c in o.outputs)


def bench_self_reward(pairs: pa.Table, args: argparse.Namespace) -> None:
    from eval_judges_hh import as_candidates  # benchmarks/ is on sys.path when run as a script
    from curate.judges.self_reward import SelfRewardJudge, SelfRewardParams

    stage = SelfRewardJudge(SelfRewardParams(model=MODEL, dtype=args.dtype, samples=args.samples,
                                             generation={"max_tokens": args.max_tokens, "temperature": 0.7, "top_p": 0.9}))
    table = as_candidates(pairs)
    requests = [r for row_id, msgs, cands in zip(table.column("id").to_pylist(), table.column("prompt").to_pylist(),
                                                 table.column("responses").to_pylist())
                for r in stage.requests(row_id, msgs, cands)]
    raw = timed(raw_generate(stage.models.get(MODEL), requests), args.repeats)
    cur_s, tokens = timed(lambda: stage.apply(table).counters["tokens_generated"], args.repeats)
    assert tokens == raw[1], f"the stage generated {tokens} tokens, the raw engine {raw[1]}: not the same work"
    report(f"self_reward (k={args.samples}, 2 candidates per row, max {args.max_tokens} tokens)", table.num_rows, raw, cur_s,
           "generated tok")


def bench_pairwise(pairs: pa.Table, args: argparse.Namespace) -> None:
    from curate.judges.pairwise import PairwiseJudge, PairwiseParams

    stage = PairwiseJudge(PairwiseParams(model=MODEL, dtype=args.dtype, samples=args.samples,
                                         generation={"max_tokens": args.max_tokens, "temperature": 1.0}))
    requests = []
    for row_id, msgs, a, b in zip(pairs.column("id").to_pylist(), pairs.column("prompt").to_pylist(),
                                  pairs.column("chosen").to_pylist(), pairs.column("rejected").to_pylist()):
        requests += [stage._request(row_id, "ab", msgs, a, b), stage._request(row_id, "ba", msgs, b, a)]
    raw = timed(raw_generate(stage.models.get(MODEL), requests), args.repeats)
    cur_s, _ = timed(lambda: stage.apply(pairs).table.num_rows, args.repeats)
    report(f"pairwise (k={args.samples} per order, both orders, max {args.max_tokens} tokens)", pairs.num_rows, raw, cur_s,
           "generated tok")


def bench_cdr(pairs: pa.Table, args: argparse.Namespace) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from curate.backends.base import ScoreItem, render_prompt
    from curate.backends.scoring import as_messages
    from curate.judges.cdr import CDRJudge, CDRParams

    stage = CDRJudge(CDRParams(strong=MODEL, weak=args.weak, dtype="float32", max_model_len=4096))
    strong, weak = stage.models.get(MODEL), stage.models.get(args.weak)
    items = []
    for msgs, a, b in zip(pairs.column("prompt").to_pylist(), pairs.column("chosen").to_pylist(),
                          pairs.column("rejected").to_pylist()):
        text = render_prompt(strong.tokenizer, as_messages(msgs))
        items += [ScoreItem(as_messages(msgs), a, prompt_text=text), ScoreItem(as_messages(msgs), b, prompt_text=text)]
    encoded = {m: [TokensPrompt(prompt_token_ids=encode_item(e.tokenizer, it)[0]) for it in items] for m, e in
               ((MODEL, strong), (args.weak, weak))}
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    n_tokens = sum(len(p["prompt_token_ids"]) for ps in encoded.values() for p in ps)

    def raw() -> int:
        for model, engine in ((MODEL, strong), (args.weak, weak)):
            engine.llm.generate(encoded[model], params, use_tqdm=False)
        return n_tokens

    def curate() -> int:
        out = stage.apply(pairs)
        assert out.counters["row_errors"] == 0, out.counters
        return n_tokens

    report(f"cdr ({MODEL} over {args.weak}, prompt log-probs, fp32)", pairs.num_rows, timed(raw, args.repeats),
           timed(curate, args.repeats)[0], "scored tok")


def bench_rationale(pairs: pa.Table, args: argparse.Namespace) -> None:
    from curate.judges.rationale import RationaleJudge, RationaleParams

    stage = RationaleJudge(RationaleParams(model=MODEL, dtype=args.dtype,
                                           generation={"max_tokens": args.max_tokens, "temperature": 0.7, "top_p": 0.9}))
    requests = [stage.request(row_id, msgs, a, b) for row_id, msgs, a, b in zip(
        pairs.column("id").to_pylist(), pairs.column("prompt").to_pylist(), pairs.column("chosen").to_pylist(),
        pairs.column("rejected").to_pylist())]
    raw = timed(raw_generate(stage.models.get(MODEL), requests), args.repeats)
    cur_s, tokens = timed(lambda: stage.apply(pairs).counters["tokens_generated"], args.repeats)
    assert tokens == raw[1], f"the stage generated {tokens} tokens, the raw engine {raw[1]}: not the same work"
    report(f"rationale (general, max {args.max_tokens} tokens)", pairs.num_rows, raw, cur_s, "generated tok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--weak", default="gemma3-270m")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-prompt-chars", type=int, default=1500, help="keep HH pairs with shorter conversations")
    parser.add_argument("--judges", default="self_reward,pairwise,cdr,rationale")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    pairs = hh_pairs(args.pairs, seed=1)
    short = [sum(len(m["content"]) for m in msgs) < args.max_prompt_chars for msgs in pairs.column("prompt").to_pylist()]
    pairs = pairs.filter(pa.array(short))
    for name in args.judges.split(","):
        {"self_reward": bench_self_reward, "pairwise": bench_pairwise, "cdr": bench_cdr,
         "rationale": bench_rationale}[name](pairs, args)


if __name__ == "__main__":
    main()
