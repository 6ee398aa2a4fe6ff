"""Noise-aware preference handling, the EM half (METHODS.md §6B): label-flip rate and per-pair confidence.

What it does:
- `em_flip_rate` / `pref_conf` / `noise_filter`: EM for the dataset's label-flip rate ε̂ under
  `P(observed | clean) = (1−ε)σ(m) + εσ(−m)`; the posterior `w = P(label correct)` becomes
  `pref_conf`; rows with `w < 0.5` are dropped (reason `likely_flipped`), or flipped where
  `w < 0.1` (`curate.pairing.swap_pairs`), or only weighted.
- `rdpo_loss`, `cdpo_loss` (and `dpo_loss`, `sigmoid` from `margins`): the trainer-side math the
  columns feed (for tests and the README; curate trains nothing).
- Stage: `filters.noise_em` (global: ε̂ is fitted over every part, so the result does not depend
  on how the data is split; it reaches stats.json through `Stage.fit_summary`).

SPA (margins, threshold, smoothing, `filters.spa_score`, `filters.spa`) lives in `curate.filters.spa`;
its names are still importable from here.

Leaves out: approximate quantiles for data sets whose margin column does not fit in memory (the
fit holds one float64 per row).

Example: t, eps_hat = pref_conf(t, "spa_margin")
"""
from __future__ import annotations

import importlib
import logging
import math
from typing import Any, Iterable, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.adapters import accepts_frames
from curate.contract import (
    Params,
    Stage,
    StageOutput,
    Verdict,
    keep_all,
    mark_dropped,
    put_columns,
    require,
    with_fields,
)
from curate.filters.margins import (NUMERIC, as_float, dpo_loss, fit_margins, float_column, kept_rows, margin_values,
                                    scalar_or_array, sigmoid, state_value, with_metadata)
from curate.pairing import swap_pairs
from curate.registry import register

log = logging.getLogger(__name__)

EM_INIT = 0.1  # §6B (c): initial ε
EM_CLIP = (0.0, 0.49)  # §6B (c): ε stays below ½, where the labels still carry signal
DROP_BELOW = 0.5  # §6B (c): w < 0.5 -> the label is more likely flipped than not
FLIP_BELOW = 0.1  # §6B (c): flip only when w < 0.1
EPS_HAT_KEY = b"curate.eps_hat"  # Arrow schema metadata of pref_conf / noise_filter results


# Trainer-side losses (§6A, §6B) ----------------------------------------------------------------------


def rdpo_loss(beta_h: Any, eps: float) -> Any:
    """Robust DPO: `[(1−ε)ℓ(βh) − εℓ(−βh)] / (1−2ε)`, unbiased for the clean loss under flips (§6B).

    TRL's `loss_type="robust"` with `label_smoothing=ε`. Example: rdpo_loss(1.0, 0.1) -> 0.18826
    """
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"rDPO needs 0 <= eps < 0.5, got {eps}")
    z = np.asarray(beta_h, dtype=np.float64)
    return scalar_or_array(((1.0 - eps) * dpo_loss(z) - eps * dpo_loss(-z)) / (1.0 - 2.0 * eps))


def cdpo_loss(beta_h: Any, eps: Any) -> Any:
    """Conservative DPO (label smoothing): `(1−ε)ℓ(βh) + εℓ(−βh)` (§6B); ε may be per row.

    SPA's refined loss is this with ε = α on noisy rows (§6A (c)). Example: cdpo_loss(1.0, 0.1) -> 0.41326
    """
    z = np.asarray(beta_h, dtype=np.float64)
    e = np.asarray(eps, dtype=np.float64)
    return scalar_or_array((1.0 - e) * dpo_loss(z) + e * dpo_loss(-z))


# EM flip rate (§6B) --------------------------------------------------------------------------------


def flip_posterior(margins: Any, eps: float) -> np.ndarray:
    """w = P(label correct | m) = (1−ε)σ(m) / [(1−ε)σ(m) + εσ(−m)] = σ(m + log((1−ε)/ε)) (§6B E-step).

    NaN margins give NaN. Example: flip_posterior([2, 0, -2], 0.2) -> [0.9673, 0.8, 0.3512]
    """
    m = as_float(margins)
    if eps <= 0.0:
        return np.where(np.isnan(m), np.nan, 1.0)
    if eps >= 1.0:
        return np.where(np.isnan(m), np.nan, 0.0)
    return sigmoid(m + math.log((1.0 - eps) / eps))


def _em(margins: Any, init: float, clip: tuple[float, float], tol: float, max_iter: int) -> tuple[float, np.ndarray, int, bool]:
    """EM over the non-NaN margins: (ε̂, w over all rows, iterations, converged)."""
    lo, hi = clip
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"clip must satisfy 0 <= low <= high < 1, got {clip}")
    m = as_float(margins)
    valid = m[~np.isnan(m)]
    if len(valid) == 0:
        return float("nan"), np.full(len(m), np.nan), 0, False
    eps = min(max(float(init), lo), hi)
    converged, iterations = False, 0
    for iterations in range(1, max_iter + 1):
        new = min(max(1.0 - float(np.mean(flip_posterior(valid, eps))), lo), hi)  # M-step: ε ← 1 − mean(w)
        delta, eps = abs(new - eps), new
        if delta < tol:
            converged = True
            break
    return eps, flip_posterior(m, eps), iterations, converged


def em_flip_rate(margins: Any, init: float = EM_INIT, clip: tuple[float, float] = EM_CLIP, tol: float = 1e-7,
                 max_iter: int = 1000) -> tuple[float, np.ndarray]:
    """Estimate the flip rate ε̂ by EM and return it with the posteriors w (§6B (c)).

    The margins `m_i` come from a fixed scorer and are oriented chosen − rejected, in logits
    (e.g. `spa_margin`). E-step: `w_i = P(label correct | m_i, ε)`; M-step: `ε ← 1 − mean(w)`,
    clipped to `clip`; from `init` until ε moves less than `tol`. NaN margins are left out of the
    fit and get w = NaN. No valid margin: ε̂ = NaN.
    Example: em_flip_rate(margins_of_20k_pairs_with_20pct_flips)[0] -> ≈ 0.2
    """
    eps, w, _, _ = _em(margins, init, clip, tol, max_iter)
    return eps, w


def noise_apply(table: pa.Table, margin_column: str, eps: float, action: str = "drop",
                drop_below: float = DROP_BELOW, flip_below: float = FLIP_BELOW) -> StageOutput | Verdict:
    """Write `pref_conf` for a known ε and apply the action (what `filters.noise_em` does per part).

    - `drop`: a Verdict dropping rows with `w < drop_below` (reason `likely_flipped`);
    - `flip`: rows with `w < flip_below` get chosen and rejected swapped (`swap_pairs`),
      `noise_flipped = true` and `pref_conf = 1 − w`: after the swap, P(the row's label is right);
    - `weight`: only `pref_conf`.
    A row without a margin keeps its label, gets a null `pref_conf` and is counted
    (`margin_missing`). Example: noise_apply(t, "spa_margin", 0.2, "weight").table
    """
    w = flip_posterior(margin_values(table, margin_column), eps)
    missing = int(np.isnan(w).sum())
    with np.errstate(invalid="ignore"):
        below = w < drop_below  # NaN compares false: no margin, no verdict
        flip = w < flip_below
    counters: dict[str, int | float] = {"margin_missing": missing}
    if action == "flip":
        out = swap_pairs(table, pa.array(flip))
        conf = np.where(flip, 1.0 - w, w)
        out = put_columns(out, {"pref_conf": float_column(conf), "noise_flipped": pa.array(flip, pa.bool_())})
        counters.update(flipped=int(flip.sum()), likely_flipped=int(below.sum()))
        return StageOutput(out, counters=counters)
    out = put_columns(table, {"pref_conf": float_column(w)})
    if action == "weight":
        counters["likely_flipped"] = int(below.sum())
        return StageOutput(out, counters=counters)
    if action == "drop":
        keep, reason = keep_all(table.num_rows)
        keep, reason = mark_dropped(keep, reason, pa.array(below), "likely_flipped")
        return Verdict(out, keep, reason)
    raise ValueError(f"unknown action '{action}' (drop, flip, weight)")


@accepts_frames
def pref_conf(table: pa.Table, margin_column: str = "spa_margin", init: float = EM_INIT,
              clip: tuple[float, float] = EM_CLIP, tol: float = 1e-7, max_iter: int = 1000) -> tuple[pa.Table, float]:
    """Fit ε̂ by EM on `margin_column` and add `pref_conf` = w; returns `(table, ε̂)`.

    ε̂ is returned and also stored in the Arrow schema metadata under `curate.eps_hat`
    (`float(t.schema.metadata[b"curate.eps_hat"])`); polars and pandas frames drop Arrow
    metadata, so use the returned value there. Example: t, eps_hat = pref_conf(t, "spa_margin")
    """
    eps, w, _, _ = _em(margin_values(table, margin_column), init, clip, tol, max_iter)
    out = put_columns(table, {"pref_conf": float_column(w)})
    return with_metadata(out, EPS_HAT_KEY, eps), eps


@accepts_frames
def noise_filter(table: pa.Table, margin_column: str = "spa_margin", action: Literal["drop", "flip", "weight"] = "drop",
                 eps: float | None = None, init: float = EM_INIT, clip: tuple[float, float] = EM_CLIP,
                 tol: float = 1e-7, max_iter: int = 1000, drop_below: float = DROP_BELOW,
                 flip_below: float = FLIP_BELOW) -> pa.Table:
    """EM-based noise filter (§6B (c)): `pref_conf`, then drop / flip / weight (see `noise_apply`).

    ε̂ is fitted on this table unless `eps` is given; it is stored in the schema metadata
    (`curate.eps_hat`). `drop` returns the kept rows only (the pipeline stage `filters.noise_em`
    keeps the dropped ones under rejects/ with their reason).
    Example: noise_filter(t, "spa_margin", action="flip").column("noise_flipped")
    """
    if eps is None:
        eps, _, _, _ = _em(margin_values(table, margin_column), init, clip, tol, max_iter)
    out = kept_rows(noise_apply(table, margin_column, eps, action, drop_below, flip_below))
    return with_metadata(out, EPS_HAT_KEY, eps)


class NoiseEMParams(Params):
    """Params of filters.noise_em. Example: NoiseEMParams(margin_column="spa_margin", action="flip")"""

    margin_column: str = Field("spa_margin", description="scorer margin in logits, chosen − rejected")
    action: Literal["drop", "flip", "weight"] = Field("drop", description="drop w<0.5, flip w<0.1, or only add pref_conf")
    init: float = Field(EM_INIT, ge=0, lt=0.5, description="initial ε")
    max_eps: float = Field(EM_CLIP[1], gt=0, lt=0.5, description="ε is clipped to [0, max_eps]")
    tol: float = Field(1e-7, gt=0, description="stop when ε moves less than this")
    max_iter: int = Field(1000, ge=1, description="EM iterations at most")
    drop_below: float = Field(DROP_BELOW, gt=0, lt=1, description="drop: w below this")
    flip_below: float = Field(FLIP_BELOW, gt=0, lt=1, description="flip: w below this")

    @model_validator(mode="after")
    def _init_in_clip(self) -> "NoiseEMParams":
        if self.init > self.max_eps:
            raise ValueError("init is above max_eps")
        return self


@register
class NoiseEM(Stage):
    """EM flip rate over the whole dataset (§6B (c)); `pref_conf` per row; drop / flip / weight.

    The fit runs EM over the margin column of every part; its state holds ε̂, which reaches
    stats.json as `fit: {eps_hat, n, iterations, converged}`. `flip` adds `noise_flipped`.
    Example: - stage: filters.noise_em
               params: {margin_column: spa_margin, action: drop}
    """

    name = "filters.noise_em"
    kind = "global"
    Params = NoiseEMParams

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        p = self.params
        require(schema, {p.margin_column: NUMERIC}, self.name)
        fields = {"pref_conf": pa.float64()}
        if p.action == "flip":
            require(schema, {"chosen": pa.string(), "rejected": pa.string()}, self.name)
            fields["noise_flipped"] = pa.bool_()
        return with_fields(schema, fields)

    def fit_columns(self, schema: pa.Schema) -> list[str]:
        return [self.params.margin_column]

    def fit(self, tables: Iterable[pa.Table]) -> pa.Table:
        p = self.params
        z = fit_margins(tables, p.margin_column)
        eps, _, iterations, converged = _em(z, p.init, (0.0, p.max_eps), p.tol, p.max_iter)
        if not converged and not math.isnan(eps):
            log.warning("%s: EM stopped after %d iterations without converging (eps=%.4f)", self.stage_id, iterations, eps)
        return pa.table({
            "eps_hat": pa.array([None if math.isnan(eps) else eps], pa.float64()),
            "n": pa.array([int((~np.isnan(z)).sum())], pa.int64()),
            "iterations": pa.array([iterations], pa.int64()),
            "converged": pa.array([converged], pa.bool_()),
        })

    def fit_summary(self, state: pa.Table) -> dict[str, Any]:
        return {name: state_value(state, name) for name in ("eps_hat", "n", "iterations", "converged")}

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput | Verdict:
        p = self.params
        eps = state_value(state, "eps_hat")
        return noise_apply(table, p.margin_column, float("nan") if eps is None else eps, p.action,
                           p.drop_below, p.flip_below)


_SPA_NAMES = ("implicit_margins", "score_pairs", "spa_filter", "spa_threshold", "spa_label_smoothing", "spa_apply",
              "SPAScore", "SPAScoreParams", "SPAFilter", "SPAFilterParams", "DPO_BETA", "SPA_ALPHA", "SPA_QUANTILE",
              "SPA_WARMUP", "SPA_WINDOW", "TAU_KEY", "LP_COLUMNS")


def __getattr__(name: str) -> Any:
    """SPA moved to `curate.filters.spa`: `from curate.filters.noise import spa_filter` still works."""
    if name in _SPA_NAMES:
        return getattr(importlib.import_module("curate.filters.spa"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
