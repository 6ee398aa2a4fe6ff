"""The raw engine's side of `compare.py`: one tool's recorded work replayed in one vLLM engine load.

Reads a work file (JSONL, one request per line: `phase`, the prompt as `messages` or as rendered
`text`, the generated token count `tokens`, `temperature`, `top_p`, and for a constrained request
its `regex` and `max_tokens`), loads the model once with the engine settings curate uses on CPU,
and generates each phase (generation, then judging) in one `LLM.generate` call: every request
forced to exactly its recorded length (`min_tokens = max_tokens`, `ignore_eos`), or, when the
tool constrained it, under the same regex and token cap (greedy, so the same reply). The engine
produces the tokens the tool did, with no templates, parsing, pipelines or processes around it.
Prints one JSON line of timings.

Example: python raw_job.py --model /path --work work.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm import SamplingParams


def replay_params(w: dict, seed: int, end_of_turn: int) -> SamplingParams:
    """Sampling params that make the engine redo one recorded request.

    A request the tool constrained by a regex is replayed with that regex, greedy and the tool's
    token cap (the engine writes the same reply again, and pays the same constraint cost); any
    other request is forced to its recorded length.
    Example: replay_params({"tokens": 12, "temperature": 1.0}, 0, 2).max_tokens -> 12
    """
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    if w.get("regex"):
        return SamplingParams(max_tokens=w["max_tokens"], temperature=w.get("temperature", 0.0), top_p=w.get("top_p", 1.0),
                              seed=seed, structured_outputs=StructuredOutputsParams(regex=w["regex"]),
                              stop_token_ids=[end_of_turn])
    return SamplingParams(max_tokens=w["tokens"], min_tokens=w["tokens"], ignore_eos=True,
                          temperature=w.get("temperature", 1.0), top_p=w.get("top_p", 1.0), seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    start = time.perf_counter()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from curate.backends.base import encode_prompt, end_of_turn_id

    with open(args.work, encoding="utf-8") as f:
        work = [json.loads(line) for line in f]
    llm = LLM(model=args.model, dtype=args.dtype, seed=0, enforce_eager=True, enable_chunked_prefill=False,
              max_model_len=4096, max_num_batched_tokens=4096)  # as curate/backends/vllm_engine.py on CPU
    loaded = time.perf_counter()
    tokenizer = llm.get_tokenizer()
    timings, tokens = {}, 0
    for phase in dict.fromkeys(w["phase"] for w in work):
        prompts, params = [], []
        for i, w in enumerate(x for x in work if x["phase"] == phase and x["tokens"] > 0):
            ids = encode_prompt(tokenizer, w["messages"]) if "messages" in w else \
                tokenizer(w["text"], add_special_tokens=True)["input_ids"]
            prompts.append(TokensPrompt(prompt_token_ids=list(ids)))
            params.append(replay_params(w, i, end_of_turn_id(tokenizer)))
        began = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        timings[phase] = time.perf_counter() - began
        tokens += sum(len(o.token_ids) for out in outputs for o in out.outputs)
    print(json.dumps({"load_s": loaded - start, "phases_s": timings, "tokens": tokens,
                      "requests": len(work), "total_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
