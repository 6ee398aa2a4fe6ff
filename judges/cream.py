"""CREAM's math (METHODS.md §1C): the rank agreement of two model iterations as a per-row label confidence.

What it does:
- `rank_consistency(current, previous, method)`: the agreement C ∈ [0, 1] of two reward lists over
  the same candidates. Both lists are turned into ordinal ranks (ties broken by position) and
  compared by Kendall τ (`C = (τ + 1) / 2`, the default), Spearman ρ (`C = (ρ + 1) / 2`) or
  `toporder` (C = 1 when both the top and the bottom candidate agree, else 0). Candidates without
  a reward in either list are left out; fewer than 2 left gives None. τ and ρ come from scipy.
- `cream_consistency(frame)`: the columns `cream_consistency` (per-row C), `cream_weight` (the C a
  trainer uses: the row's own, `consistency_dyn`, or the mean C of the frame, `consistency_avg`)
  and `label_smoothing = 1 − cream_weight`. CREAM's loss `C·ℓ(βh) + (1 − C)·ℓ(−βh)` is label
  smoothing with rate 1 − C, i.e. `curate.filters.cdpo_loss(βh, label_smoothing)` per row (the
  column SPA's smoothing writes too, so one weighted `compute_loss` reads both).
- `cream_rewards(frame, current, reference, previous)`: the two reward lists of §1C (c):
  `cream_reward_cur = LP(M_t) − LP(M_ref)` (sums) and `cream_reward_prev = LPn(M_{t−1})`
  (length-normalised, no reference), through SPA's candidate scorer (`candidate_rewards`, the one
  place for implicit rewards of candidates). fp32 by default.
- Pairing (chosen = argmax `cream_reward_cur`, rejected = argmin, dropped when they are the same
  index) is `pairs.from_scores` with `mode: best_worst`; the stage `judges.cream`
  (`curate.judges.cream_stages`) scores, measures C and pairs in one step.

Example: rank_consistency([3, 2, 1], [3, 1, 2]) -> 0.6667
"""
from __future__ import annotations

import logging
import math
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.adapters import accepts_frames
from curate.backends.base import open_backend
from curate.backends.params import reference_model
from curate.contract import put_columns
from curate.filters.margins import float_column

log = logging.getLogger(__name__)

Method = Literal["kendall", "spearman", "toporder"]
Mode = Literal["consistency_dyn", "consistency_avg"]
METHODS = ("kendall", "spearman", "toporder")
CURRENT, PREVIOUS = "cream_reward_cur", "cream_reward_prev"


def _valid(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def rank_consistency(current: Sequence[float | None], previous: Sequence[float | None],
                     method: Method = "kendall") -> float | None:
    """C ∈ [0, 1]: how far two reward lists over the same candidates rank them alike (§1C (c)).

    Ordinal ranks of both lists (ties by position), then Kendall τ → (τ+1)/2, Spearman ρ →
    (ρ+1)/2, or toporder (1 if the argmax and the argmin both match, else 0). Candidates missing
    from either list are left out; None when fewer than 2 remain or the lengths differ.
    Example: rank_consistency([3, 2, 1], [1, 2, 3]) -> 0.0
    """
    from scipy.stats import kendalltau, rankdata, spearmanr

    if method not in METHODS:
        raise ValueError(f"unknown consistency method '{method}' ({', '.join(METHODS)})")
    if len(current) != len(previous):
        return None
    keep = [i for i in range(len(current)) if _valid(current[i]) and _valid(previous[i])]
    if len(keep) < 2:
        return None
    a = rankdata([current[i] for i in keep], method="ordinal")
    b = rankdata([previous[i] for i in keep], method="ordinal")
    if method == "toporder":
        return float(np.argmax(a) == np.argmax(b) and np.argmin(a) == np.argmin(b))
    stat = kendalltau(a, b).statistic if method == "kendall" else spearmanr(a, b).statistic
    return float((stat + 1.0) / 2.0)


def consistency_weights(consistency: Sequence[float | None], mode: Mode = "consistency_dyn") -> tuple[list[float | None], float | None]:
    """The C each row trains with, and the mean C: its own (`consistency_dyn`) or the mean (`consistency_avg`).

    A row without a C keeps none under `consistency_dyn`; under `consistency_avg` every row gets
    the mean of the rows that have one. Example: consistency_weights([1.0, 0.5], "consistency_avg") -> ([0.75, 0.75], 0.75)
    """
    known = [c for c in consistency if _valid(c)]
    mean = float(np.mean(known)) if known else None
    if mode == "consistency_dyn":
        return [c if _valid(c) else None for c in consistency], mean
    if mode == "consistency_avg":
        return [mean] * len(consistency), mean
    raise ValueError(f"unknown mode '{mode}' (consistency_dyn, consistency_avg)")


def weight_columns(weights: Sequence[float | None]) -> dict[str, pa.Array]:
    """`cream_weight` (C) and `label_smoothing` (1 − C) as float64 columns, null where C is unknown.

    Example: weight_columns([0.75])["label_smoothing"].to_pylist() -> [0.25]
    """
    w = np.array([np.nan if c is None else c for c in weights], dtype=np.float64)
    return {"cream_weight": float_column(w), "label_smoothing": float_column(1.0 - w)}


def consistency_column(table: pa.Table, current: str = CURRENT, previous: str = PREVIOUS,
                       method: Method = "kendall") -> list[float | None]:
    """Per-row C of two list columns of rewards. Example: consistency_column(t) -> [0.6667, None]"""
    cur = pc.cast(table.column(current), pa.list_(pa.float64())).to_pylist()
    prev = pc.cast(table.column(previous), pa.list_(pa.float64())).to_pylist()
    return [None if a is None or b is None else rank_consistency(a, b, method) for a, b in zip(cur, prev)]


@accepts_frames
def cream_consistency(table: pa.Table, current: str = CURRENT, previous: str = PREVIOUS, method: Method = "kendall",
                      mode: Mode = "consistency_dyn") -> pa.Table:
    """Add `cream_consistency`, `cream_weight` and `label_smoothing` (module docstring) from two reward lists.

    `consistency_avg` gives every row the mean C of this frame (use the stage `judges.cream_avg`
    in a pipeline, so the mean covers every part). Example: cream_consistency(t, method="spearman")
    """
    return put_columns(table, consistency_columns(table, current, previous, method, mode))


def consistency_columns(table: pa.Table, current: str = CURRENT, previous: str = PREVIOUS, method: Method = "kendall",
                        mode: Mode = "consistency_dyn") -> dict[str, pa.Array]:
    """`cream_consistency`, `cream_weight` and `label_smoothing` of a table, as columns to put.

    Example: consistency_columns(t)["cream_consistency"].to_pylist() -> [0.6667]
    """
    consistency = consistency_column(table, current, previous, method)
    weights, _ = consistency_weights(consistency, mode)
    c = np.array([np.nan if v is None else v for v in consistency], dtype=np.float64)
    return {"cream_consistency": float_column(c)} | weight_columns(weights)


def score_candidates(table: pa.Table, current: Any, reference: Any, previous: Any, batch_size: int | None = None,
                     responses: str = "responses", error_column: str = "cream_error",
                     names: tuple[str | None, str | None, str | None] = (None, None, None)) -> tuple[pa.Table, dict[str, int]]:
    """`cream_reward_cur` (LP(M_t) − LP(M_ref), sums), `cream_reward_prev` (LPn(M_{t−1})), model names and
    errors for opened scoring backends, and counters. Example: score_candidates(t, cur, ref, prev)[0]
    """
    from curate.filters.spa_rewards import candidate_rewards

    cur, cur_counts = candidate_rewards(table, current, reference, "sum", "e", batch_size, responses)
    prev, prev_counts = candidate_rewards(table, previous, None, "mean", "e", batch_size, responses)
    errors = [_joined(a, b) for a, b in zip(cur.column("e").to_pylist(), prev.column("e").to_pylist())]
    n = table.num_rows
    model_names = [name or getattr(model, "name", None) for name, model in zip(names, (current, reference, previous))]
    columns = {
        CURRENT: cur.column("spa_rewards"), PREVIOUS: prev.column("spa_rewards"),
        "cream_model": pa.array([model_names[0]] * n, pa.string()),
        "cream_ref_model": pa.array([model_names[1]] * n, pa.string()),
        "cream_prev_model": pa.array([model_names[2]] * n, pa.string()),
        error_column: pa.array(errors, pa.string()),
    }
    counters = {"candidates_scored": cur_counts["candidates_scored"],
                "candidates_scored_previous": prev_counts["candidates_scored"],
                "row_errors": sum(e is not None for e in errors), "tokens_scored": cur_counts["tokens_scored"]}
    return put_columns(table, columns), counters


def _joined(current: str | None, previous: str | None) -> str | None:
    parts = [f"{label}: {message}" for label, message in (("current", current), ("previous", previous)) if message]
    return "; ".join(parts) or None


@accepts_frames
def cream_rewards(table: pa.Table, current: Any, reference: Any, previous: Any,
                  backend: Literal["vllm", "transformers"] = "transformers", batch_size: int | None = None,
                  responses: str = "responses", **options: Any) -> pa.Table:
    """The two reward lists of CREAM (§1C (c)) for every candidate: current vs its reference, and the previous iteration.

    `current` / `reference` / `previous` are model references (built-in name, folder, .gguf, Hub
    id) or opened backends; the reference is required (`none` is refused: CREAM's current reward
    is the implicit DPO reward). `options` go to `open_backend` (default `dtype="float32"`).
    Example: cream_rewards(t, "out/dpo-iter1", "smollm2-135m-instruct", "smollm2-135m-instruct")
    """
    if isinstance(reference, str) and reference_model(reference) is None:
        raise ValueError("CREAM needs the current model's reference (r = LP(M_t) − LP(M_ref)); `none` is not allowed")
    options = {"dtype": "float32", **options}
    opened = [m if hasattr(m, "logprobs") else open_backend(backend, m, **options) for m in (current, reference, previous)]
    names = tuple(m if isinstance(m, str) else None for m in (current, reference, previous))
    out, _ = score_candidates(table, *opened, batch_size=batch_size, responses=responses, names=names)
    return out
