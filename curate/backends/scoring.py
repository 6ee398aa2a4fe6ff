"""Scoring helpers shared by every stage that reads sequence log-probs (SPA, SCIR, CDR, CHES, DONOD).

`summed_logprobs` is the one place that turns items into LP / LPn under several models (METHODS
§0), with the length check of each model's tokenizer: the implicit rewards of SPA (pairs and
candidates) and SCIR are read through it. Leaves out: the token layout itself
(`curate.backends.base.encode_item`) and the engines.

Example: sequence_logprobs(backend, [ScoreItem(msgs, "Paris.")], batch_size=None)[0].sum()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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


def token_budget(max_length: int | None) -> int | None:
    """The token budget for prompt + response of a stage's `max_length`: -1 or None means no
    truncation (METHODS §5 (d)); under 2 cannot hold a response token. Example: token_budget(-1) -> None
    """
    if max_length is None or max_length == -1:
        return None
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, or -1 for no truncation; got {max_length}")
    return max_length


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


@dataclass
class ItemSums:
    """LP (or LPn) of every item under each model, NaN where an item was not scored, and why.

    `tokens`: response tokens under the first model (|R| with the end-of-turn token);
    `scored_tokens`: their total over the scored items. Example: sums.lp["policy"][0] -> -12.3
    """

    lp: dict[str, np.ndarray]
    errors: list[str | None]
    tokens: list[int | None]
    scored_tokens: int


def summed_logprobs(items: list[ScoreItem], models: dict[str, Any], normalize: Literal["sum", "mean"] = "sum",
                    batch_size: int | None = None, groups: list[int] | None = None) -> ItemSums:
    """LP (the sum of response log-probs, METHODS §0) or LPn = LP / |R| of every item under every model.

    Each model's own tokenizer checks the length first; an item too long for any model is not
    scored and carries the reason, and with `groups` (an owner id per item, e.g. the two sides
    of a pair) neither is any other item of its group. The first model's token counts are kept.
    Example: summed_logprobs(items, {"policy": pol, "ref": ref}).lp["ref"]
    """
    n = len(items)
    errors: list[str | None] = [None] * n
    tokens: list[int | None] = [None] * n
    for k, backend in enumerate(models.values()):
        counts, too_long = response_tokens(backend, items)
        tokens = counts if k == 0 else tokens
        for i, message in enumerate(too_long):
            errors[i] = errors[i] or message
    if groups is not None:
        failed = {}
        for i, message in enumerate(errors):
            if message is not None:
                failed.setdefault(groups[i], message)
        errors = [failed.get(g) for g in groups]
    keep = [i for i in range(n) if errors[i] is None]
    lp: dict[str, np.ndarray] = {}
    scored_tokens = 0
    for k, (label, backend) in enumerate(models.items()):
        lp[label] = np.full(n, np.nan)
        for i, per_token in zip(keep, sequence_logprobs(backend, [items[i] for i in keep], batch_size)):
            total = float(np.sum(per_token, dtype=np.float64))
            lp[label][i] = total / len(per_token) if normalize == "mean" else total
            if k == 0:
                scored_tokens += len(per_token)
                tokens[i] = tokens[i] if tokens[i] is not None else len(per_token)
    return ItemSums(lp, errors, tokens, scored_tokens)
