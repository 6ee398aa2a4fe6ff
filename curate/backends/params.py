"""Stage params shared by every stage that runs a model: which backend, and how to load it.

`backend_options` turns them into the keyword arguments of `open_backend`; two stages with the
same options share one loaded engine (a self-rewarding judge reuses its generator's).
Leaves out: sampling params (`GenerationParams`).

Example: class JudgeParams(ModelParams): samples: int = 3
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from curate.backends.base import open_backend, release_backend
from curate.contract import Params

EXECUTION = {"execution": True}


class ModelParams(Params):
    """Backend choice and load options. Example: ModelParams(backend="transformers", dtype="float32")"""

    backend: Literal["vllm", "transformers", "openai"] = Field("vllm", description="engine that runs the model")
    dtype: str = Field("auto", description="weights dtype (auto, float32, bfloat16, float16)")
    max_model_len: int | None = Field(4096, ge=16, description="context length; longer prompts are row errors")
    base_url: str | None = Field(None, description="openai backend: server URL ending in /v1")
    batch_size: int | None = Field(None, ge=1, json_schema_extra=EXECUTION,
                                   description="requests per engine call (default: the whole part)")
    max_concurrency: int = Field(16, ge=1, json_schema_extra=EXECUTION, description="openai backend: requests in flight")
    timeout: float = Field(120.0, gt=0, json_schema_extra=EXECUTION, description="openai backend: seconds per request")
    max_retries: int = Field(5, ge=0, json_schema_extra=EXECUTION, description="openai backend: retries per request")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, json_schema_extra=EXECUTION,
                                                 description="vllm on CUDA: share of GPU memory per engine")


def backend_options(params: ModelParams, seed: int) -> dict[str, Any]:
    """Keyword arguments of `open_backend` for these params (any Params with `backend` and `dtype`).

    Example: backend_options(ModelParams(), 0) -> {'dtype': 'auto', 'max_model_len': 4096, 'seed': 0}
    """
    if params.backend == "vllm":
        options: dict[str, Any] = {"dtype": params.dtype, "max_model_len": params.max_model_len, "seed": seed}
        if params.gpu_memory_utilization is not None:
            options["gpu_memory_utilization"] = params.gpu_memory_utilization
        return options
    if params.backend == "transformers":
        options = {"dtype": "float32" if params.dtype == "auto" else params.dtype}
        batch_tokens = getattr(params, "batch_tokens", None)  # scoring stages size forward batches by tokens
        if batch_tokens is not None:
            options["batch_tokens"] = batch_tokens
        return options
    return {"base_url": params.base_url, "max_concurrency": params.max_concurrency, "timeout": params.timeout,
            "max_retries": params.max_retries}


def run_batched(backend: Any, requests: list, batch_size: int | None) -> list:
    """backend.generate over requests, in chunks of batch_size (None: one call).

    Example: run_batched(backend, requests, None)[0][0].text
    """
    step = batch_size or max(1, len(requests))
    out: list = []
    for start in range(0, len(requests), step):
        out.extend(backend.generate(requests[start:start + step]))
    return out


class LoadedModels:
    """The backends one stage uses: loaded on first use (shared per process), released on close.

    Example: models = LoadedModels(params, seed); models.get("smollm2-135m-instruct").generate(requests)
    """

    def __init__(self, params: ModelParams, seed: int):
        self.params = params
        self.seed = seed
        self._loaded: dict[str, Any] = {}

    def get(self, model: str) -> Any:
        """The loaded backend of `model`. Example: models.get(m).logprobs(items)"""
        if model not in self._loaded:
            self._loaded[model] = open_backend(self.params.backend, model, **backend_options(self.params, self.seed))
        return self._loaded[model]

    def release(self) -> None:
        """Close every backend this stage loaded. Example: models.release()"""
        for backend in self._loaded.values():
            release_backend(backend)
        self._loaded.clear()


def identities(params: ModelParams, models: list[str]) -> list[str] | None:
    """Model identities for a stage key (None for remote servers, keyed by name and URL in params).

    Example: identities(params, ["smollm2-135m-instruct"]) -> ['smollm2-135m-instruct@1dff70ef9e21']
    """
    from curate.models import model_identity

    return None if params.backend == "openai" else [model_identity(m) for m in models]
