"""distilabel's side of `compare.py`: the UltraFeedback job as a distilabel 1.5.3 pipeline.

Runs in distilabel's own virtual environment (made by `compare.py --setup`), never in curate's.
LoadDataFromDicts -> TextGeneration (n samples per prompt) -> one UltraFeedback task per aspect,
each on a vLLM engine with the settings curate uses on CPU. The rows (instruction, generations,
ratings per aspect) are written as JSONL for `compare.py` to binarize and count.

Two changes are needed for distilabel 1.5.3 to run on vLLM 0.32's CPU build, both made here by a
small subclass of distilabel's `vLLM` class, never by editing distilabel's files:
- `disable_cuda_device_placement=True` (distilabel otherwise looks for CUDA devices);
- its `vLLM.generate` passes `logits_processors=[]` to `vllm.SamplingParams`, which vLLM 0.32 refuses;
  the subclass swaps `vllm.SamplingParams` for the duration of its own call with a function that
  drops that argument when it is empty (and refuses to drop a non-empty one).
The subclass also appends every request it sent (the prompt text as distilabel rendered it, and
the generated token counts) to the work log named by `BENCH_WORK_LOG`, so the raw engine can
replay exactly the same tokens, and a `start` line per call, so `compare.py` can see the judge
step begin.

Example: python distilabel_job.py --model /path --prompts prompts.jsonl --n-prompts 64 --out rows.jsonl
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Any, Iterator

from distilabel.models.llms import vLLM
from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts
from distilabel.steps.tasks import TextGeneration, UltraFeedback

ENGINE = {"max_model_len": 4096, "enforce_eager": True, "enable_chunked_prefill": False,
          "max_num_batched_tokens": 4096}  # what curate's vLLM backend sets on CPU (curate/backends/vllm_engine.py)


def _log(entry: dict[str, Any]) -> None:
    path = os.environ.get("BENCH_WORK_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


@contextlib.contextmanager
def _sampling_params_without_empty_logits_processors() -> Iterator[None]:
    import vllm

    original = vllm.SamplingParams

    def build(*args: Any, logits_processors: Any = None, **kwargs: Any) -> Any:
        if logits_processors:
            raise RuntimeError("vLLM 0.32 has no per-request logits_processors; this job uses none")
        return original(*args, **kwargs)

    vllm.SamplingParams = build
    try:
        yield
    finally:
        vllm.SamplingParams = original


class CPUvLLM(vLLM):
    """distilabel's vLLM on vLLM 0.32 CPU (module docstring); logs the work it sends."""

    phase: str = "generate"

    def generate_outputs(self, inputs: list, num_generations: int = 1, **kwargs: Any) -> list:
        # `generate_outputs`, not `generate`: distilabel reads its runtime parameters from `generate`'s signature
        _log({"event": "start", "phase": self.phase, "time": time.time(), "pid": os.getpid(), "inputs": len(inputs)})
        with _sampling_params_without_empty_logits_processors():
            outputs = super().generate_outputs(inputs=inputs, num_generations=num_generations, **kwargs)
        for item, output in zip(inputs, outputs):
            _log({"event": "request", "phase": self.phase, "prompt": self.prepare_input(item),
                  "output_tokens": list(output["statistics"].get("output_tokens", [])),
                  "temperature": kwargs.get("temperature", 1.0), "top_p": kwargs.get("top_p", 1.0)})
        return outputs


def build(args: argparse.Namespace, prompts: list[str]) -> Pipeline:
    batch = {} if args.batch_size is None else {"input_batch_size": args.batch_size}
    load_batch = {} if args.batch_size is None else {"batch_size": args.batch_size}

    def engine(phase: str, **sampling: Any) -> CPUvLLM:
        return CPUvLLM(model=args.model, dtype=args.dtype, seed=args.seed, phase=phase, extra_kwargs=dict(ENGINE),
                       disable_cuda_device_placement=True, generation_kwargs={"top_p": 1.0, **sampling})

    with Pipeline(name="curate-vs-distilabel-ultrafeedback") as pipeline:
        load = LoadDataFromDicts(data=[{"instruction": p} for p in prompts], **load_batch)
        generate = TextGeneration(
            llm=engine("generate", max_new_tokens=args.gen_tokens, temperature=args.temperature),
            num_generations=args.samples, group_generations=True, output_mappings={"generation": "generations", "model_name": "generation_model"}, **batch)
        previous = load >> generate
        for aspect in args.aspects:
            columns = ["ratings", "rationales", "model_name"] + (["types", "rationales-for-ratings"]
                                                                 if aspect in ("helpfulness", "truthfulness") else [])
            renamed = {c: f"{c}_{aspect}" for c in columns}
            judge = UltraFeedback(name=f"judge_{aspect}", aspect=aspect,
                                  llm=engine("judge", max_new_tokens=args.judge_tokens, temperature=0.0),
                                  use_default_structured_output=False, output_mappings=renamed, **batch)
            previous = previous >> judge
    return pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder (curate's converted SmolLM2 checkpoint)")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--aspects", nargs="+", default=["overall-rating"])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--gen-tokens", type=int, default=200)
    parser.add_argument("--judge-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="input_batch_size (None: distilabel's default, 50)")
    parser.add_argument("--out", required=True, help="rows JSONL")
    args = parser.parse_args()
    with open(args.prompts, encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f][: args.n_prompts]
    distiset = build(args, prompts).run(use_cache=True)
    config = next(iter(distiset))
    with open(args.out, "w", encoding="utf-8") as f:
        for row in distiset[config]["train"]:
            f.write(json.dumps({"instruction": row["instruction"], "generations": row.get("generations"),
                                "ratings": {a: row.get(f"ratings_{a}") for a in args.aspects}}) + "\n")


if __name__ == "__main__":
    main()
