"""Generation and scoring overhead, measured in one run on the same engine and inputs.

1. Generation: the `generators.responses` stage (Arrow part in, wide `responses` column out)
   against a raw `vllm.LLM.generate` call on the same token prompts and sampling params (same
   engine object, same per-row seeds). Prints generated tok/s of each and the ratio (goal >= 0.97).
2. Scoring: the transformers scoring interface (`HFBackend.logprobs`, length-bucketed batches,
   span extraction) against a raw padded batched forward pass with log-softmax over the same
   token ids. Prints scored tok/s and the ratio (goal >= 0.9).
3. Small parts: the same stage through whole runs with `part_rows: 16` (and `executor:
   {overlap_parts: true}`, which computes them at once on the engine) against one part of all
   prompts (`--part-prompts`), same engine; prints `small parts vs one part` (goal >= 0.95).

Example: python benchmarks/bench_generate.py --prompts 16 --n 4 --max-tokens 64
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import pyarrow as pa

from curate.backends.base import ScoreItem, encode_pair, encode_prompt, open_backend
from curate.contract import MESSAGES
from curate.generators.responses import Responses, ResponsesParams

TOPICS = ["rivers", "bread", "compilers", "gardens", "trains", "music", "tides", "bridges", "bees", "clocks",
          "maps", "glass", "paper", "salt", "wind", "stars"]


def prompts(count: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (#{i})."}]
            for i in range(count)]


def bench_generation(args: argparse.Namespace) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    generation = {"max_tokens": args.max_tokens, "n": args.n, "temperature": 0.7, "top_p": 0.9}
    stage = Responses(ResponsesParams(model=args.model, dtype=args.dtype, generation=generation), seed=0)
    msgs = prompts(args.prompts)
    table = pa.table({"id": [f"b{i}" for i in range(len(msgs))], "prompt": pa.array(msgs, MESSAGES)})
    backend = stage.models.get(args.model)  # the engine both sides use
    seeds = [_row_seed(stage, f"b{i}") for i in range(len(msgs))]  # the seeds the stage uses
    token_prompts = [TokensPrompt(prompt_token_ids=encode_prompt(backend.tokenizer, m)) for m in msgs]
    params = [SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=0.7, top_p=0.9, seed=s) for s in seeds]

    def raw() -> tuple[float, int]:
        started = time.perf_counter()
        outputs = backend.llm.generate(token_prompts, params, use_tqdm=False)
        return time.perf_counter() - started, sum(len(c.token_ids) for o in outputs for c in o.outputs)

    def curate() -> tuple[float, int]:
        started = time.perf_counter()
        out = stage.apply(table)
        return time.perf_counter() - started, out.counters["tokens_generated"]

    raw()  # warm-up
    raw_rates, cur_rates = [], []
    for _ in range(args.repeats):
        seconds, tokens = raw()
        raw_rates.append(tokens / seconds)
        seconds, tokens = curate()
        cur_rates.append(tokens / seconds)
    r, c = statistics.median(raw_rates), statistics.median(cur_rates)
    print(f"generation ({args.prompts} prompts x n={args.n} x {args.max_tokens} tokens, {args.dtype}):")
    print(f"  raw vllm.LLM.generate: {r:8.1f} tok/s (median of {args.repeats})")
    print(f"  curate stage:          {c:8.1f} tok/s")
    print(f"  ratio curate/raw: {c / r:.3f}  (goal >= 0.97)")


def bench_parts(args: argparse.Namespace) -> None:
    """The generation stage through a whole run: parts of 16 prompts against one part of all of them."""
    import json
    import os
    import tempfile

    from curate.config import parse_pipeline
    from curate.runner import run_pipeline

    generation = {"max_tokens": args.max_tokens, "n": args.n, "temperature": 0.7, "top_p": 0.9}
    pipeline = (f"source: {{path: prompts.jsonl, part_rows: PART}}\nexecutor: {{overlap_parts: true}}\nstages:\n  - stage: generators.responses\n"
                f"    id: gen\n    params: {{model: {args.model}, dtype: {args.dtype}, generation: {json.dumps(generation)}}}\n")
    work = tempfile.mkdtemp(prefix="curate-bench-parts-")
    with open(os.path.join(work, "prompts.jsonl"), "w") as f:
        for i, m in enumerate(prompts(args.part_prompts)):
            f.write(json.dumps({"id": f"p{i}", "prompt": m}) + "\n")

    def run(part_rows: int, attempt: int) -> float:
        text = pipeline.replace("PART", str(part_rows))
        stats = run_pipeline(parse_pipeline(text, os.path.join(work, "p.yaml")),
                             out=os.path.join(work, f"out-{part_rows}-{attempt}"))
        gen = next(s for s in stats["stages"] if s["stage_id"] == "gen")
        # the run's wall time less the model load: a stage's own seconds add up its parts, which
        # overlap when two parts compute at once (curate.executors)
        return gen["counters"]["tokens_generated"] / (stats["run_seconds"] - gen["load_seconds"])

    run(10_000, -1)  # loads the engine once (the process cache keeps it for every run below)
    small, one = [], []
    for attempt in range(args.repeats):
        small.append(run(16, attempt))
        one.append(run(10_000, attempt))
    s, o = statistics.median(small), statistics.median(one)
    print(f"generation through a run ({args.part_prompts} prompts x n={args.n} x {args.max_tokens} tokens):")
    print(f"  parts of 16 prompts (executor: {{overlap_parts: true}}): {s:8.1f} tok/s; one part: {o:8.1f} tok/s (medians of {args.repeats})")
    print(f"  small parts vs one part: {s / o:.3f}  (goal >= 0.95)")


def _row_seed(stage: Responses, row_id: str) -> int:
    from curate.keys import row_seed

    return row_seed(row_id, f"{stage.name}:{stage.params.model}", stage.seed) % (2**31)


def bench_scoring(args: argparse.Namespace) -> None:
    import torch

    backend = open_backend("transformers", args.model, dtype="float32")
    texts = [" ".join(["The answer covers the topic in some detail."] * (1 + i % 6)) for i in range(args.score_rows)]
    items = [ScoreItem(m, t) for m, t in zip(prompts(args.score_rows), texts)]
    encoded = [encode_pair(backend.tokenizer, it.messages, it.response) for it in items]
    n_tokens = sum(len(ids) - start for ids, start in encoded)

    def raw() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, len(encoded), args.score_batch):
                rows = encoded[b:b + args.score_batch]
                width = max(len(ids) for ids, _ in rows)
                ids = torch.full((len(rows), width), backend.pad_id)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for i, (row, _) in enumerate(rows):
                    ids[i, :len(row)] = torch.tensor(row)
                    mask[i, :len(row)] = 1
                logits = backend.model(input_ids=ids, attention_mask=mask).logits
                torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(2, ids[:, 1:, None])
        return time.perf_counter() - started

    def curate() -> float:
        started = time.perf_counter()
        backend.logprobs(items)
        return time.perf_counter() - started

    raw()
    raw_rates, cur_rates = [], []
    for _ in range(args.repeats):
        raw_rates.append(n_tokens / raw())
        cur_rates.append(n_tokens / curate())
    r, c = statistics.median(raw_rates), statistics.median(cur_rates)
    print(f"scoring ({args.score_rows} rows, {n_tokens} response tokens, fp32, transformers):")
    print(f"  raw batched forward (batch {args.score_batch}, arrival order): {r:8.1f} response tok/s")
    print(f"  curate logprobs (length-bucketed):                        {c:8.1f} response tok/s")
    print(f"  ratio curate/raw: {c / r:.3f}  (goal >= 0.9)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--part-prompts", type=int, default=64, help="prompts of the small-parts comparison")
    parser.add_argument("--score-rows", type=int, default=96)
    parser.add_argument("--score-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-generation", action="store_true", help="same as --sections scoring")
    parser.add_argument("--sections", default="generation,parts,scoring",
                        help="comma-separated: generation, parts, scoring (default: all three)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sections = {"scoring"} if args.skip_generation else set(args.sections.split(","))
    for name, bench in (("generation", bench_generation), ("parts", bench_parts), ("scoring", bench_scoring)):
        if name in sections:
            bench(args)


if __name__ == "__main__":
    main()
