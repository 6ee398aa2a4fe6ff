"""Scoring helpers shared by every stage that reads sequence log-probs (SPA, SCIR, CDR, CHES, DONOD).

Leaves out: the token layout itself (`curate.backends.base.encode_item`) and the engines.

Example: sequence_logprobs(backend, [ScoreItem(msgs, "Paris.")], batch_size=None)[0].sum()
"""
from __future__ import annotations

from typing import Any

import numpy as np

from curate.backends.base import ScoreItem, encode_item


def as_messages(prompt: Any) -> list[dict[str, str]] | None:
    """A prompt cell as chat messages (a plain string becomes one user turn; None stays None).

    Example: as_messages("hi") -> [{'role': 'user', 'content': 'hi'}]
    """
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def token_limit(backend: Any) -> int | None:
    """The most tokens a backend's model takes (vLLM max_model_len, else max_position_embeddings).

    Example: token_limit(vllm_backend) -> 4096
    """
    limit = getattr(backend, "max_model_len", None)
    if limit is None:
        config = getattr(getattr(backend, "model", None), "config", None)
        limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def response_tokens(backend: Any, items: list[ScoreItem]) -> tuple[list[int | None], list[str | None]]:
    """Response token counts (|R| with the end-of-turn token) and a too-long error per item.

    Counted with the backend's own tokenizer; a backend without one gets no counts and no check.
    Example: response_tokens(backend, items) -> ([5, 12], [None, None])
    """
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        return [None] * len(items), [None] * len(items)
    limit = token_limit(backend)
    counts: list[int | None] = []
    errors: list[str | None] = []
    for item in items:
        ids, start = encode_item(tokenizer, item)
        counts.append(len(ids) - start)
        too_long = limit is not None and len(ids) > limit
        errors.append(f"{getattr(backend, 'name', 'model')}: prompt + response is {len(ids)} tokens, limit {limit}"
                      if too_long else None)
    return counts, errors


def sequence_logprobs(backend: Any, items: list[ScoreItem], batch_size: int | None) -> list[np.ndarray]:
    """Per-token response log-probs of every item, `batch_size` items per backend call (None: one call).

    Example: sequence_logprobs(backend, items, 64)[0] -> array([-0.3, -1.2, ...])
    """
    step = batch_size or max(1, len(items))
    out: list[np.ndarray] = []
    for start in range(0, len(items), step):
        out.extend(backend.logprobs(items[start:start + step]))
    return out
