"""SPA's annotation half (METHODS.md §6A (b), (c) 2-3): the implicit reward of every candidate response.

For a prompt with K candidates sampled from the policy π_t, each candidate gets
`r_i = LP(π_t, x, y_i) − LP(π_ref, x, y_i)` (LP the summed response log-prob of METHODS §0, no β in
the saved reward, §6A (c) 2), written as the list column `spa_rewards` in candidate order. Pairing
is `pairs.from_scores` with `scores: spa_rewards, mode: best_worst`: chosen = argmax r, rejected =
argmin r (§6A's "min_max"; `best_random` is its "max_chosen" alternative). With `reference: none`
the reward is LP(π_t) alone (the policy's likelihood, not an implicit reward; warned and recorded).
A candidate that could not be scored (null text, too long for a model) has a null reward and is
named in the row's error column; `pairs.from_scores` leaves null scores out.
Leaves out: sampling the candidates (`generators.responses`) and the DPO step of each iteration.

Example: implicit_rewards(candidates, "my-dpo-policy", "smollm2-135m-instruct", backend="transformers")
"""
from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from curate.adapters import accepts_frames
from curate.backends.base import ScoreItem, open_backend
from curate.backends.params import REFERENCE_FREE, reference_model
from curate.backends.scoring import as_messages, summed_logprobs
from curate.contract import put_columns

log = logging.getLogger(__name__)

REWARDS = pa.list_(pa.float64())


def candidate_rewards(table: pa.Table, policy: Any, reference: Any | None, normalize: Literal["sum", "mean"] = "sum",
                      error_column: str = "spa_error", batch_size: int | None = None, responses: str = "responses",
                      policy_name: str | None = None, reference_name: str | None = None) -> tuple[pa.Table, dict[str, int]]:
    """`spa_rewards` (r_i = LP_policy − LP_reference per candidate, or LPn with `normalize="mean"`),
    `spa_model`, `spa_ref_model` and the error column for opened scoring backends, and counters.

    Example: candidate_rewards(t, pol, ref)[0].column("spa_rewards").to_pylist() -> [[1.2, -0.4, 0.3]]
    """
    prompts = [as_messages(v) for v in table.column("prompt").to_pylist()]
    candidates = [[(c or {}).get("text") for c in (row or [])] for row in table.column(responses).to_pylist()]
    where = [(row, i) for row, texts in enumerate(candidates) for i, text in enumerate(texts)
             if text is not None and prompts[row] is not None]
    items = [ScoreItem(prompts[row], candidates[row][i]) for row, i in where]
    models = {"policy": policy} | ({"ref": reference} if reference is not None else {})
    sums = summed_logprobs(items, models, normalize, batch_size)
    reward = sums.lp["policy"] - (sums.lp["ref"] if reference is not None else 0.0)
    rewards: list[list[float | None]] = [[None] * len(texts) for texts in candidates]
    failed: list[dict[int, str]] = [{} for _ in candidates]
    for (row, i), value, message in zip(where, reward, sums.errors):
        if message is None:
            rewards[row][i] = float(value)
        else:
            failed[row][i] = message
    errors = [_row_error(prompts[row], texts, failed[row]) for row, texts in enumerate(candidates)]
    n = table.num_rows
    columns = {
        "spa_rewards": pa.array(rewards, REWARDS),
        "spa_model": pa.array([policy_name or getattr(policy, "name", None)] * n, pa.string()),
        "spa_ref_model": pa.array([reference_name or (getattr(reference, "name", None) if reference is not None
                                                      else REFERENCE_FREE)] * n, pa.string()),
        error_column: pa.array(errors, pa.string()),
    }
    counters = {"candidates_scored": int(np.sum([m is None for m in sums.errors])),
                "row_errors": sum(e is not None for e in errors), "tokens_scored": sums.scored_tokens}
    if reference is None:
        counters["reference_free_rows"] = n
    return put_columns(table, columns), counters


def _row_error(prompt: Any, texts: list[str | None], failed: dict[int, str]) -> str | None:
    """Why some candidates of a row have no reward (None when every candidate was scored)."""
    if prompt is None:
        return "null prompt" if texts else None
    nulls = [i for i, t in enumerate(texts) if t is None]
    parts = ([f"null text for candidates {nulls}"] if nulls else []) + \
        [f"candidate {i}: {message}" for i, message in sorted(failed.items())]
    return "; ".join(parts) or None


@accepts_frames
def implicit_rewards(table: pa.Table, policy: Any, reference: Any | None, backend: Literal["vllm", "transformers"] = "transformers",
                     normalize: Literal["sum", "mean"] = "sum", batch_size: int | None = None,
                     responses: str = "responses", **options: Any) -> pa.Table:
    """`spa_rewards` of every candidate (module docstring) for model references or opened backends.

    `reference` has no default: `None` / `"none"` scores LP(policy) alone (warned). `options` go to
    `open_backend` (default `dtype="float32"`). Then pair with `pairs.from_scores` (`best_worst`).
    Example: implicit_rewards(t, "dpo-policy", "sft-model").column("spa_rewards")
    """
    options = {"dtype": "float32", **options}
    reference = reference_model(reference) if isinstance(reference, str) else reference
    if reference is None:
        log.warning("implicit_rewards without a reference: spa_rewards is the policy's log-prob, not an implicit reward")
    opened = [m if hasattr(m, "logprobs") else open_backend(backend, m, **options) for m in (policy, reference)
              if m is not None]
    out, _ = candidate_rewards(table, opened[0], opened[1] if reference is not None else None, normalize,
                               batch_size=batch_size, responses=responses,
                               policy_name=policy if isinstance(policy, str) else None,
                               reference_name=reference if isinstance(reference, str) else None)
    return out
