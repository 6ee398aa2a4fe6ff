"""Stage params shared by every stage that runs a model: which backend, and how to load it.

`backend_options` turns them into the keyword arguments of `open_backend`; two stages with the
same options share one loaded engine (a self-rewarding judge reuses its generator's).
Leaves out: sampling params (`GenerationParams`).

Example: class JudgeParams(ModelParams): samples: int = 3
"""
from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import Field, SerializationInfo, field_serializer, field_validator, model_validator

from curate.backends.base import GenerationParams, open_backend, release_backend
from curate.contract import Params, execution_field

LOGPROB_DTYPE = "float32"  # METHODS.md §2: log-prob methods score in fp32 (bf16 is off by up to 0.19 nats here)
STRUCTURED_BACKENDS = ("vllm", "openai")  # engines that carry a regex / choice constraint (vLLM; vLLM servers)
REFERENCE_FREE = "none"  # `reference: none`: an implicit-reward method runs without a reference model


def logprob_dtype_field() -> Any:
    """The `dtype` field of a stage that reads log-probs: fp32 on every backend unless the user says otherwise.

    Example: class CDRParams(ModelParams): dtype: str = logprob_dtype_field()
    """
    return Field(LOGPROB_DTYPE, description="weights dtype; fp32 by default: bf16 log-probs are off by up to "
                                            "0.19 nats (ENVIRONMENT.md), METHODS.md §2 asks for fp32")


def reference_field(what: str) -> Any:
    """The required `reference` field of an implicit-reward method: a model, or `none` written out.

    Example: class SCIRParams(ModelParams): reference: str = reference_field("π_ref of the policy")
    """
    return Field(description=f"{what}; `none` runs reference-free (logged as a warning, recorded in "
                             "stats.json and the rows): β·(LP(a) − LP(b)) is then not an implicit DPO reward")


def reference_model(reference: str | None) -> str | None:
    """The reference model to load, or None for `none` (reference-free). Example: reference_model("none") -> None"""
    return None if reference is None or reference.strip().lower() == REFERENCE_FREE else reference


# Free judge text inside an output regex (reasons, rationales, principles): printable ASCII. A
# token decodes to at least one byte, so N of these one-byte characters always fit in N tokens and
# the fixed part after them (the score line) is never cut by max_tokens. `[^\n]` gave no such
# bound: an emoji is four UTF-8 bytes and can take four tokens (SmolLM2 wrote a run of them and
# lost its score line). Judges that must write other scripts run with `constrained: false`.
FREE_TEXT_CHAR = r"[ -~]"
FREE_TEXT_START = r"[!-~]"  # the same, without the space: a rationale starts with a visible character
FREE_TEXT_UNQUOTED = r"[ !#-;=?-\[\]-~]"  # without `"`, `\`, `<`, `>`: inside a JSON string, never a `<rule>` placeholder


def constrains(params: Any) -> bool:
    """Whether a judge's `constrained: true` reaches its engine (vLLM offline, or a vLLM server over HTTP).

    Example: constrains(SelfRewardParams(model="m", backend="openai", base_url="...")) -> True
    """
    return bool(getattr(params, "constrained", False)) and params.backend in STRUCTURED_BACKENDS


class ModelParams(Params):
    """Backend choice and load options. Example: ModelParams(backend="transformers", dtype="float32")"""

    backend: Literal["vllm", "transformers", "openai"] = Field("vllm", description="engine that runs the model")
    dtype: str = Field("auto", description="weights dtype (auto, float32, bfloat16, float16)")
    max_model_len: int | None = Field(4096, ge=16, description="context length; longer prompts are row errors")
    base_url: str | None = Field(None, description="openai backend: server URL ending in /v1")
    batch_size: int | None = execution_field(None, ge=1, description="requests per engine call (default: the whole part)")
    max_concurrency: int = execution_field(16, ge=1, description="openai backend: requests in flight")
    timeout: float = execution_field(120.0, gt=0, description="openai backend: seconds per request")
    max_retries: int = execution_field(5, ge=0, description="openai backend: retries per request")
    gpu_memory_utilization: float | None = execution_field(None, gt=0, le=1,
                                                           description="vllm on CUDA: share of GPU memory per engine")
    trust_remote_code: bool = execution_field(False, description="vllm / transformers: run the Python code a model "
                                                                "folder ships (off unless set here; logged when on)")

    @field_validator("base_url")
    @classmethod
    def _remember_url_secrets(cls, url: str | None) -> str | None:
        """Register the URL's credentials as secrets as soon as a pipeline names them (curate.redaction)."""
        if url is not None:
            from curate.redaction import redact_url

            redact_url(url)
        return url

    @field_serializer("base_url")
    def _base_url_redacted(self, url: str | None, info: SerializationInfo) -> str | None:
        """Written redacted (plan.json, the card, keys) unless dumped with context {"secrets": True} for a task."""
        if url is None or (info.context or {}).get("secrets"):
            return url
        from curate.redaction import redact_url

        return redact_url(url)

    @model_validator(mode="before")
    @classmethod
    def _generation_over_defaults(cls, data: Any) -> Any:
        """A partial `generation:` block keeps the stage's other defaults (e.g. §1A's T=0.7, top-p 0.9)."""
        field = cls.model_fields.get("generation")
        given = data.get("generation") if isinstance(data, dict) else None
        if field is not None and isinstance(field.default, GenerationParams) and isinstance(given, dict):
            data = {**data, "generation": field.default.model_dump() | given}
        return data


class ImplicitRewardParams(ModelParams):
    """Params shared by the implicit-reward methods (SPA, SCIR): a policy, its reference, fp32.

    `r = LP(policy) − LP(reference)` (METHODS.md §0); the reference has no default (`none`
    written out runs reference-free). Example: SPAScoreParams(policy="dpo", reference="sft").ref_model -> 'sft'
    """

    policy: str = Field(description="π_θ: the policy whose implicit reward is read")
    reference: str = reference_field("π_ref of the policy (same tokenizer)")
    dtype: str = logprob_dtype_field()

    @property
    def ref_model(self) -> str | None:
        """The reference model to load, or None for `reference: none`. Example: params.ref_model"""
        return reference_model(self.reference)


class HiddenStateParams(Params):
    """Params shared by the stages that read a model's last hidden states (CHES, DONOD): one model
    through transformers (the only engine that serves them), fp32 weights, forward batches by tokens.

    Example: class ChesScoreParams(HiddenStateParams): max_length: int = Field(512, description="...")
    """

    model: str = Field(description="the scoring model")
    backend: Literal["transformers"] = Field("transformers", description="engine; only transformers serves hidden states")
    dtype: str = Field("float32", description="weights dtype; the method's sums are float64 whatever it is")
    batch_tokens: int | None = execution_field(None, ge=1,
                                               description="longest row x rows per forward batch (backend default 8192)")


def run_dtype(params: Any, model: str | None = None) -> str:
    """The dtype a model stage really runs in: `auto` resolved as its engine resolves it.

    transformers (and stages without a backend choice: CHES, DONOD, the MiniLM embedder): `auto`
    is fp32 (`backend_options`); vLLM: the checkpoint's dtype, except that a float32 checkpoint
    (every GGUF curate converts) runs in the device's first supported dtype (bf16 on this CPU
    and on recent GPUs); openai: whatever the server was started with.
    Example: run_dtype(SelfRewardParams(model="smollm2-135m-instruct")) -> 'bfloat16'
    """
    dtype = str(getattr(params, "dtype", "auto"))
    backend = getattr(params, "backend", "transformers")  # stages without the choice (CHES, DONOD, MiniLM) use torch
    if dtype != "auto":
        return dtype
    if backend == "transformers":
        return "float32"
    if backend == "openai":
        return "set by the server"
    return _vllm_auto_dtype(model)


def _vllm_auto_dtype(model: str | None) -> str:
    """vLLM's `auto`: the config's dtype, or the platform's first supported dtype for a float32 one."""
    config_dtype = "float32"
    if model is not None:
        from curate.models import BUILTIN_GGUF

        folder = os.path.expanduser(model)
        if model not in BUILTIN_GGUF and not folder.endswith(".gguf") and os.path.isdir(folder):
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
            config_dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    if config_dtype not in ("float32", "float"):
        return config_dtype
    try:
        from curate.backends.vllm_engine import auto_dtype

        return auto_dtype()
    except ImportError:
        return "unknown: vllm is not installed"


def backend_options(params: ModelParams, seed: int) -> dict[str, Any]:
    """Keyword arguments of `open_backend` for these params (any Params with `backend` and `dtype`).

    Example: backend_options(ModelParams(), 0) -> {'dtype': 'auto', 'max_model_len': 4096, 'seed': 0}
    """
    remote_code = getattr(params, "trust_remote_code", False)  # stages without the field never run a model's code
    if params.backend == "vllm":
        options: dict[str, Any] = {"dtype": params.dtype, "max_model_len": params.max_model_len, "seed": seed}
        if getattr(params, "gpu_memory_utilization", None) is not None:
            options["gpu_memory_utilization"] = params.gpu_memory_utilization
        if remote_code:
            options["trust_remote_code"] = True
        return options
    if params.backend == "transformers":
        options = {"dtype": "float32" if params.dtype == "auto" else params.dtype}
        batch_tokens = getattr(params, "batch_tokens", None)  # scoring stages size forward batches by tokens
        if batch_tokens is not None:
            options["batch_tokens"] = batch_tokens
        if remote_code:
            options["trust_remote_code"] = True
        return options
    return {"base_url": params.base_url, "max_concurrency": params.max_concurrency, "timeout": params.timeout,
            "max_retries": params.max_retries}


def run_batched(backend: Any, requests: list, batch_size: int | None) -> list:
    """backend.generate over requests, in chunks of batch_size (None: one call), through the request cache.

    Inside a task (`curate.requests`), requests a killed attempt already finished are taken from
    its log, and each request is logged as the engine finishes it; each finished request also
    moves the run's progress bar (`curate.progress`).
    Example: run_batched(backend, requests, None)[0][0].text
    """
    from curate.progress import work_done, work_started
    from curate.requests import current_scope

    scope = current_scope()
    out: list = scope.lookup(backend, requests) if scope is not None else [None] * len(requests)
    todo = [i for i, found in enumerate(out) if found is None]
    work_started(len(requests))
    work_done(len(requests) - len(todo))
    step = batch_size or max(1, len(todo))
    for start in range(0, len(todo), step):
        chunk = todo[start:start + step]
        batch = [requests[i] for i in chunk]

        def done(j: int, completions: list, batch: list = batch) -> None:
            if scope is not None:
                scope.put(backend, batch[j], completions)
            work_done()

        results = _generate(backend, batch, done)
        for i, completions in zip(chunk, results):
            out[i] = completions
    return out


def _generate(backend: Any, batch: list, done: Any) -> list:
    """generate with a per-request callback where the backend streams, else call back after it returns."""
    if getattr(backend, "streams_requests", False):
        return backend.generate(batch, on_done=done)
    results = backend.generate(batch)
    for j, completions in enumerate(results):
        done(j, completions)
    return results


class LoadedModels:
    """The backends one stage uses: loaded on first use (shared per process), released on close.

    Example: models = LoadedModels(params, seed); models.get("smollm2-135m-instruct").generate(requests)
    """

    def __init__(self, params: ModelParams, seed: int, pool_size: int = 1):
        self.params = params
        self.seed = seed
        self.pool_size = pool_size  # models this stage holds at once (a generator's `models:` pool)
        self.kind = params.backend  # the registered backend that loads them (`curate.testing.use_scripted` swaps in `fake`)
        self._used: set[str] = set()

    def options(self) -> dict[str, Any]:
        """Load options; on CUDA a vLLM pool shares the GPU: each engine gets 0.9 / pool size of it.

        Example: LoadedModels(ModelParams(), 0, pool_size=2).options()["gpu_memory_utilization"] -> 0.45 on CUDA
        """
        options = backend_options(self.params, self.seed)
        if self.params.backend == "vllm" and self.pool_size > 1 and "gpu_memory_utilization" not in options:
            from curate.backends.cache import cuda_available

            if cuda_available():
                options["gpu_memory_utilization"] = round(0.9 / self.pool_size, 3)
        return options

    def get(self, model: str) -> Any:
        """The loaded backend of `model`, through the process cache (which may have closed and
        reloads it when memory was needed). Example: models.get(m).logprobs(items)"""
        self._used.add(model)
        return open_backend(self.kind, model, **self.options())

    def release(self) -> None:
        """Close every backend this stage loaded. Example: models.release()"""
        from curate.backends.cache import cached

        options = self.options()
        for model in self._used:
            backend = cached(self.kind, model, **options)
            if backend is not None:
                release_backend(backend)
        self._used.clear()


def identities(params: ModelParams, models: list[str]) -> list[str] | None:
    """Model identities for a stage key (None for remote servers, keyed by name and URL in params).

    Example: identities(params, ["smollm2-135m-instruct"]) -> ['smollm2-135m-instruct@1dff70ef9e21']
    """
    from curate.models import model_identity

    return None if params.backend == "openai" else [model_identity(m) for m in models]
