"""Noise-aware preference handling: SPA margins and smoothing (METHODS.md §6A), EM flip rate (§6B).

What it does:
- `implicit_margins`: the SPA / implicit-DPO margin of every pair,
  `z = β·[(LP_pol(y_w) − LP_ref(y_w)) − (LP_pol(y_l) − LP_ref(y_l))]`, with `LP` the summed
  response log-prob of METHODS.md §0 from a scoring backend (`transformers` or `vllm`, fp32).
  Adds `spa_margin`, `spa_conf = σ(spa_margin)`, the four log-probs `spa_lp_*`, the policy's
  response token counts `spa_tokens_*` and the model names. The reference has no default: a
  model, or `none` written out (policy margin only, warned, `spa_ref_model = 'none'`, counted as
  `reference_free_rows` in stats.json).
- `spa_threshold` / `spa_filter`: the SPA threshold τ (mean of the sorted margins at 0-based
  indices ⌊n·q⌋ and ⌊n·q⌋+1) over a rolling buffer of 50 (the trainer's rule, §6A (c)) or over
  the whole dataset (the curate filter: `spa_noisy = z ≤ τ`); noisy rows get
  `label_smoothing = α`, or are dropped (reason `spa_noisy`).
- `em_flip_rate` / `pref_conf` / `noise_filter`: EM for the dataset's label-flip rate ε̂ under
  `P(observed | clean) = (1−ε)σ(m) + εσ(−m)`; the posterior `w = P(label correct)` becomes
  `pref_conf`; rows with `w < 0.5` are dropped (reason `likely_flipped`), or flipped where
  `w < 0.1`, or only weighted.
- `rdpo_loss`, `cdpo_loss`, `spa_label_smoothing`: the trainer-side math the columns feed
  (for tests and the README; curate trains nothing).
- Stages: `filters.spa_score` (model), `filters.spa` and `filters.noise_em` (global: τ and ε̂
  are fitted over every part, so the result does not depend on how the data is split). ε̂ and τ
  reach stats.json through `Stage.fit_summary` (a stage's `fit` block), not through counters,
  which are summed over parts.

Leaves out: SPA's sampling and pairing loop (`generators.responses` + a scoring stage +
`pairs.from_scores` do that), the λ-mixed logits (λ=1 by default, so mix = policy), the
training itself, and approximate quantiles for data sets whose margin column does not fit in
memory (the fit holds one float64 per row).

Example: t = implicit_margins(pairs, "smollm2-135m-instruct", reference="none", backend="transformers")
         t, eps_hat = pref_conf(t, "spa_margin")
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.adapters import accepts_frames
from curate.backends.base import ScoreItem, open_backend
from curate.backends.params import REFERENCE_FREE, ImplicitRewardParams, LoadedModels, identities, reference_model
from curate.backends.scoring import as_messages, summed_logprobs
from curate.contract import (
    RESPONSES,
    TEXT_TYPES,
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
from curate.registry import register

log = logging.getLogger(__name__)

SPA_WINDOW = 50  # §6A (c): rolling buffer of the last 50 per-micro-batch margins
SPA_QUANTILE = 0.1  # §6A (d): threshold quantile
SPA_ALPHA = 0.1  # §6A (d): "refine strength"
SPA_WARMUP = 0.2  # §6A (c): no refinement during the first 20% of steps
DPO_BETA = 0.1  # §6A (d)
EM_INIT = 0.1  # §6B (c): initial ε
EM_CLIP = (0.0, 0.49)  # §6B (c): ε stays below ½, where the labels still carry signal
DROP_BELOW = 0.5  # §6B (c): w < 0.5 -> the label is more likely flipped than not
FLIP_BELOW = 0.1  # §6B (c): flip only when w < 0.1
EPS_HAT_KEY = b"curate.eps_hat"  # Arrow schema metadata of pref_conf / noise_filter results
TAU_KEY = b"curate.spa_tau"  # Arrow schema metadata of spa_filter results
SIGNED_COLUMNS = ("margin", "spa_margin", "cdr_margin")  # negated when a pair is flipped (chosen − rejected differences)

LP_COLUMNS = ("spa_lp_policy_chosen", "spa_lp_policy_rejected", "spa_lp_ref_chosen", "spa_lp_ref_rejected")
NUMERIC = (pa.float64(), pa.float32(), pa.int64(), pa.int32())


# Small numerics -----------------------------------------------------------------------------------


def _as_float(values: Any) -> np.ndarray:
    """float64 numpy array of any array-like (Arrow, numpy, list, polars/pandas Series); nulls -> NaN."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pc.fill_null(pc.cast(values, pa.float64()), float("nan"))
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        return values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def sigmoid(x: Any) -> np.ndarray:
    """σ(x), stable for large |x|. Example: sigmoid([0.0]) -> array([0.5])"""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # NaN (a missing margin) stays NaN
        return np.exp(-np.logaddexp(0.0, -x))


def dpo_loss(z: Any) -> np.ndarray:
    """ℓ(z) = −log σ(z) (METHODS.md §0), elementwise. Example: dpo_loss(1.0) -> 0.31326"""
    with np.errstate(invalid="ignore"):
        return np.logaddexp(0.0, -np.asarray(z, dtype=np.float64))


def _scalar_or_array(x: np.ndarray) -> Any:
    return float(x) if x.ndim == 0 else x


# Trainer-side losses (§6A, §6B) ----------------------------------------------------------------------


def rdpo_loss(beta_h: Any, eps: float) -> Any:
    """Robust DPO: `[(1−ε)ℓ(βh) − εℓ(−βh)] / (1−2ε)`, unbiased for the clean loss under flips (§6B).

    TRL's `loss_type="robust"` with `label_smoothing=ε`. Example: rdpo_loss(1.0, 0.1) -> 0.18826
    """
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"rDPO needs 0 <= eps < 0.5, got {eps}")
    z = np.asarray(beta_h, dtype=np.float64)
    return _scalar_or_array(((1.0 - eps) * dpo_loss(z) - eps * dpo_loss(-z)) / (1.0 - 2.0 * eps))


def cdpo_loss(beta_h: Any, eps: Any) -> Any:
    """Conservative DPO (label smoothing): `(1−ε)ℓ(βh) + εℓ(−βh)` (§6B); ε may be per row.

    SPA's refined loss is this with ε = α on noisy rows (§6A (c)). Example: cdpo_loss(1.0, 0.1) -> 0.41326
    """
    z = np.asarray(beta_h, dtype=np.float64)
    e = np.asarray(eps, dtype=np.float64)
    return _scalar_or_array((1.0 - e) * dpo_loss(z) + e * dpo_loss(-z))


def spa_label_smoothing(z: Any, tau: float | None, alpha: float = SPA_ALPHA, step: int | None = None,
                        max_steps: int | None = None, warmup: float = SPA_WARMUP) -> Any:
    """α_eff per example: α where `z ≤ τ`, else 0; 0 everywhere before `warmup·max_steps` (§6A (c)).

    Without `step` (the curate filter) there is no warm-up. A NaN margin or τ None gets 0.
    Example: spa_label_smoothing([5.0, 6.0], 5.5) -> array([0.1, 0. ])
    """
    zz = np.asarray(z, dtype=np.float64)
    if tau is None or (step is not None and max_steps is not None and step < warmup * max_steps):
        return _scalar_or_array(np.zeros_like(zz))
    with np.errstate(invalid="ignore"):
        return _scalar_or_array(np.where(zz <= tau, float(alpha), 0.0))


# SPA threshold (§6A) ---------------------------------------------------------------------------------


def spa_threshold(margins: Any, quantile: float = SPA_QUANTILE, window: int | None = None) -> float | None:
    """SPA's threshold τ: sort, then average the values at 0-based indices ⌊n·q⌋ and ⌊n·q⌋+1.

    `window=50` is the trainer's rolling buffer (§6A (c)): only the last 50 values count, and
    there is no threshold (None) until the buffer is full. `window=None` is the curate filter's
    global form (`spa_noisy = z ≤ Q_q(z)` over the whole dataset): the same order-statistic rule
    over every value, so on 50 values both agree exactly, and the result does not depend on the
    order or the sharding of the values. NaN / null margins are left out; None if none remain.
    Example: spa_threshold(range(50)) -> 5.5; spa_threshold(range(60), window=50) -> 15.5
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    z = _as_float(margins)
    z = z[~np.isnan(z)]
    if window is not None:
        if len(z) < window:
            return None
        z = z[-window:]
    if len(z) == 0:
        return None
    z = np.sort(z)
    k = min(int(math.floor(len(z) * quantile + 1e-9)), len(z) - 1)  # +1e-9: 0.29·100 is 28.999…
    return float((z[k] + z[min(k + 1, len(z) - 1)]) / 2.0)


# EM flip rate (§6B) --------------------------------------------------------------------------------


def flip_posterior(margins: Any, eps: float) -> np.ndarray:
    """w = P(label correct | m) = (1−ε)σ(m) / [(1−ε)σ(m) + εσ(−m)] = σ(m + log((1−ε)/ε)) (§6B E-step).

    NaN margins give NaN. Example: flip_posterior([2, 0, -2], 0.2) -> [0.9673, 0.8, 0.3512]
    """
    m = _as_float(margins)
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
    m = _as_float(margins)
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


# Table helpers ---------------------------------------------------------------------------------------


def _float_column(values: np.ndarray) -> pa.Array:
    """float64 Arrow array with NaN turned into null."""
    return pa.array(values, pa.float64(), mask=np.isnan(values))


def _with_metadata(table: pa.Table, key: bytes, value: float | None) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[key] = repr(float("nan") if value is None else float(value)).encode()
    return table.replace_schema_metadata(meta)


def _margins(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        raise KeyError(f"no margin column '{column}' (columns: {', '.join(table.column_names)})")
    return _as_float(table.column(column))


def swap_pairs(table: pa.Table, flip: pa.BooleanArray) -> pa.Table:
    """Swap chosen and rejected on the rows where `flip` is true, keeping every column consistent.

    Swaps every column pair whose names differ only by `chosen` / `rejected` (`chosen` itself,
    `chosen_score`, `spa_lp_policy_chosen`, ...), negates the signed differences `margin` and
    `spa_margin`, and complements `spa_conf`. Example: swap_pairs(t, [True, False])
    """
    names = table.column_names
    flip = pc.fill_null(flip, False)
    columns: dict[str, pa.Array] = {}
    for name in names:
        partner = name.replace("chosen", "rejected")
        if "chosen" in name and partner in names:
            a, b = table.column(name), table.column(partner)
            if not a.type.equals(b.type):
                raise ValueError(f"cannot swap '{name}' ({a.type}) with '{partner}' ({b.type})")
            columns[name] = pc.if_else(flip, b, a)
            columns[partner] = pc.if_else(flip, a, b)
    for name in SIGNED_COLUMNS:
        if name in names:
            columns[name] = pc.if_else(flip, pc.negate(table.column(name)), table.column(name))
    if "spa_conf" in names:
        col = table.column("spa_conf")
        columns["spa_conf"] = pc.if_else(flip, pc.subtract(pa.scalar(1.0, col.type), col), col)
    return put_columns(table, columns)


# Noise actions (shared by the library functions and the stages) -------------------------------------


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
    w = flip_posterior(_margins(table, margin_column), eps)
    missing = int(np.isnan(w).sum())
    with np.errstate(invalid="ignore"):
        below = w < drop_below  # NaN compares false: no margin, no verdict
        flip = w < flip_below
    counters: dict[str, int | float] = {"margin_missing": missing}
    if action == "flip":
        out = swap_pairs(table, pa.array(flip))
        conf = np.where(flip, 1.0 - w, w)
        out = put_columns(out, {"pref_conf": _float_column(conf), "noise_flipped": pa.array(flip, pa.bool_())})
        counters.update(flipped=int(flip.sum()), likely_flipped=int(below.sum()))
        return StageOutput(out, counters=counters)
    out = put_columns(table, {"pref_conf": _float_column(w)})
    if action == "weight":
        counters["likely_flipped"] = int(below.sum())
        return StageOutput(out, counters=counters)
    if action == "drop":
        keep, reason = keep_all(table.num_rows)
        keep, reason = mark_dropped(keep, reason, pa.array(below), "likely_flipped")
        return Verdict(out, keep, reason)
    raise ValueError(f"unknown action '{action}' (drop, flip, weight)")


def spa_apply(table: pa.Table, tau: float | None, action: str = "smooth", alpha: float = SPA_ALPHA,
              margin_column: str = "spa_margin") -> StageOutput | Verdict:
    """Mark `spa_noisy = z ≤ τ`, then smooth (`label_smoothing` α / 0) or drop (reason `spa_noisy`).

    A row without a margin (or τ None: no margins at all) is not noisy: `spa_noisy` null,
    `label_smoothing` 0, kept. Example: spa_apply(t, 5.5).table.column("label_smoothing")
    """
    z = _margins(table, margin_column)
    missing = np.isnan(z)
    with np.errstate(invalid="ignore"):
        noisy = np.zeros(len(z), bool) if tau is None else z <= tau
    marked = pa.array(noisy, pa.bool_(), mask=missing)
    counters: dict[str, int | float] = {"noisy": int(noisy.sum()), "margin_missing": int(missing.sum())}
    if action == "smooth":
        smoothing = np.asarray(spa_label_smoothing(z, tau, alpha), dtype=np.float64).reshape(-1)
        smoothing[missing] = 0.0
        out = put_columns(table, {"spa_noisy": marked, "label_smoothing": pa.array(smoothing, pa.float64())})
        return StageOutput(out, counters=counters)
    if action == "drop":
        out = put_columns(table, {"spa_noisy": marked})
        keep, reason = keep_all(table.num_rows)
        keep, reason = mark_dropped(keep, reason, pa.array(noisy), "spa_noisy")
        return Verdict(out, keep, reason)
    raise ValueError(f"unknown action '{action}' (smooth, drop)")


def _kept(result: StageOutput | Verdict) -> pa.Table:
    if isinstance(result, Verdict):
        return result.table.filter(pc.fill_null(result.keep, False))
    return result.table


# Library functions on tables --------------------------------------------------------------------------


@accepts_frames
def pref_conf(table: pa.Table, margin_column: str = "spa_margin", init: float = EM_INIT,
              clip: tuple[float, float] = EM_CLIP, tol: float = 1e-7, max_iter: int = 1000) -> tuple[pa.Table, float]:
    """Fit ε̂ by EM on `margin_column` and add `pref_conf` = w; returns `(table, ε̂)`.

    ε̂ is returned and also stored in the Arrow schema metadata under `curate.eps_hat`
    (`float(t.schema.metadata[b"curate.eps_hat"])`); polars and pandas frames drop Arrow
    metadata, so use the returned value there. Example: t, eps_hat = pref_conf(t, "spa_margin")
    """
    eps, w, _, _ = _em(_margins(table, margin_column), init, clip, tol, max_iter)
    out = put_columns(table, {"pref_conf": _float_column(w)})
    return _with_metadata(out, EPS_HAT_KEY, eps), eps


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
        eps, _, _, _ = _em(_margins(table, margin_column), init, clip, tol, max_iter)
    out = _kept(noise_apply(table, margin_column, eps, action, drop_below, flip_below))
    return _with_metadata(out, EPS_HAT_KEY, eps)


@accepts_frames
def spa_filter(table: pa.Table, quantile: float = SPA_QUANTILE, action: Literal["smooth", "drop"] = "smooth",
               alpha: float = SPA_ALPHA, margin_column: str = "spa_margin", tau: float | None = None) -> pa.Table:
    """SPA as a curate filter (§6A): `spa_noisy = z ≤ τ` with τ the global quantile of this table.

    `smooth` adds `spa_noisy` and `label_smoothing` (α on noisy rows, 0 elsewhere); `drop` keeps
    only the rows that are not noisy. τ is stored in the schema metadata (`curate.spa_tau`);
    pass `tau` to reuse one fitted elsewhere. Example: spa_filter(t, action="drop")
    """
    if tau is None:
        tau = spa_threshold(table.column(margin_column), quantile)
    return _with_metadata(_kept(spa_apply(table, tau, action, alpha, margin_column)), TAU_KEY, tau)


# Implicit DPO margins (§6A (c), METHODS §0) ---------------------------------------------------------------


def score_pairs(table: pa.Table, policy: Any, reference: Any | None = None, beta: float = DPO_BETA,
                normalize: Literal["sum", "mean"] = "sum", error_column: str = "spa_error",
                batch_size: int | None = None, policy_name: str | None = None,
                reference_name: str | None = None) -> tuple[pa.Table, dict[str, int | float]]:
    """The margin columns for opened scoring backends (anything with `.logprobs(items)`), and counters.

    `normalize="mean"` uses LPn = LP / |R| (§0) for the margin and the `spa_lp_*` columns.
    A row with a null prompt / chosen / rejected, or too long for a model, gets null scores and
    its reason in `error_column`. Example: score_pairs(t, open_backend("transformers", p))[0]
    """
    prompts = [as_messages(v) for v in table.column("prompt").to_pylist()]
    chosen = table.column("chosen").to_pylist()
    rejected = table.column("rejected").to_pylist()
    n = table.num_rows
    errors: list[str | None] = [None] * n
    rows: list[int] = []
    for i in range(n):
        missing = [name for name, v in (("prompt", prompts[i]), ("chosen", chosen[i]), ("rejected", rejected[i])) if v is None]
        if missing:
            errors[i] = f"null {', '.join(missing)}"
        else:
            rows.append(i)
    items = [ScoreItem(prompts[i], text) for i in rows for text in (chosen[i], rejected[i])]
    models = {"policy": policy} | ({"ref": reference} if reference is not None else {})
    sums = summed_logprobs(items, models, normalize, batch_size, groups=[k // 2 for k in range(len(items))])
    lp = {name: np.full(n, np.nan) for name in LP_COLUMNS}
    n_tok = {"chosen": np.full(n, -1, np.int64), "rejected": np.full(n, -1, np.int64)}
    for k, message in enumerate(sums.errors):
        row, side = rows[k // 2], ("chosen", "rejected")[k % 2]
        errors[row] = errors[row] or message
        if message is None:
            for label in models:
                lp[f"spa_lp_{label}_{side}"][row] = sums.lp[label][k]
            n_tok[side][row] = sums.tokens[k]
    ref_w = lp["spa_lp_ref_chosen"] if reference is not None else 0.0
    ref_l = lp["spa_lp_ref_rejected"] if reference is not None else 0.0
    margin = beta * ((lp["spa_lp_policy_chosen"] - ref_w) - (lp["spa_lp_policy_rejected"] - ref_l))
    policy_name = policy_name or getattr(policy, "name", None)
    reference_name = reference_name or (getattr(reference, "name", None) if reference is not None else REFERENCE_FREE)
    columns = {name: _float_column(values) for name, values in lp.items()}
    columns.update({
        "spa_tokens_chosen": pa.array(n_tok["chosen"], pa.int32(), mask=n_tok["chosen"] < 0),
        "spa_tokens_rejected": pa.array(n_tok["rejected"], pa.int32(), mask=n_tok["rejected"] < 0),
        "spa_margin": _float_column(margin),
        "spa_conf": _float_column(sigmoid(margin)),
        "spa_model": pa.array([policy_name] * n, pa.string()),
        "spa_ref_model": pa.array([reference_name] * n, pa.string()),
        error_column: pa.array(errors, pa.string()),
    })
    counters = {"rows_scored": sum(e is None for e in sums.errors) // 2, "row_errors": sum(e is not None for e in errors),
                "tokens_scored": sums.scored_tokens}
    if reference is None:
        counters["reference_free_rows"] = n
    return put_columns(table, columns), counters


def _open(model: Any, backend: str, options: dict[str, Any]) -> Any:
    return model if hasattr(model, "logprobs") else open_backend(backend, model, **options)


@accepts_frames
def implicit_margins(table: pa.Table, policy: Any, reference: Any | None, beta: float = DPO_BETA,
                     backend: Literal["vllm", "transformers"] = "transformers",
                     normalize: Literal["sum", "mean"] = "sum", batch_size: int | None = None,
                     **options: Any) -> pa.Table:
    """Add the SPA / implicit DPO margin of every pair (§6A (c)) and its parts.

    `z = β·[(LP_pol(y_w) − LP_ref(y_w)) − (LP_pol(y_l) − LP_ref(y_l))]`, LP the summed response
    log-prob (METHODS.md §0) from `open_backend(backend, model, dtype="float32").logprobs`.
    Columns: `spa_margin`, `spa_conf = σ(spa_margin)`, `spa_lp_policy_chosen`,
    `spa_lp_policy_rejected`, `spa_lp_ref_chosen`, `spa_lp_ref_rejected`, `spa_tokens_chosen`,
    `spa_tokens_rejected` (policy tokens incl. end-of-turn), `spa_model`, `spa_ref_model`,
    `spa_error`. `policy` / `reference` are model references (built-in name, folder, .gguf, Hub
    id) or opened backends. `reference` has no default: `None` or `"none"` scores with the policy
    alone, `β·(LP(y_w) − LP(y_l))`: a likelihood margin, *not* an implicit DPO reward (the ref
    columns are then null, `spa_ref_model` is `'none'`, and a warning says so).
    `options` go to `open_backend` (default `dtype="float32"`).
    Example: implicit_margins(t, "smollm2-135m-instruct", "/models/sft", backend="vllm")
    """
    options = {"dtype": "float32", **options}
    pol = _open(policy, backend, options)
    if isinstance(reference, str):
        reference = reference_model(reference)
    if reference is None:
        log.warning("implicit_margins without a reference: spa_margin is the policy's log-prob margin, "
                    "not an implicit DPO reward")
    ref = _open(reference, backend, options) if reference is not None else None
    out, _ = score_pairs(table, pol, ref, beta, normalize, batch_size=batch_size,
                         policy_name=policy if isinstance(policy, str) else None,
                         reference_name=reference if isinstance(reference, str) else None)
    return out


# Stages --------------------------------------------------------------------------------------------------


class SPAScoreParams(ImplicitRewardParams):
    """Params of filters.spa_score. Example: SPAScoreParams(policy="smollm2-135m-instruct", reference="/m/sft")"""

    beta: float = Field(DPO_BETA, gt=0, description="β of the implicit reward (§6A (d))")
    normalize: Literal["sum", "mean"] = Field("sum", description="sum: LP (§0); mean: LP / |R|")
    backend: Literal["vllm", "transformers"] = Field("vllm", description="scoring engine (log-probs)")
    input: Literal["auto", "candidates", "pairs"] = Field(
        "auto", description="pairs (chosen/rejected: spa_margin) or candidates (responses: spa_rewards); auto: by the columns")
    responses: str = Field("responses", description="candidate column (input: candidates)")


@register
class SPAScore(Stage):
    """Score every pair with the SPA / implicit DPO margin (see `implicit_margins`), or, on candidate
    rows, every candidate with its implicit reward `spa_rewards` (`curate.filters.spa_rewards`).

    Row failures (null texts, too long) go to `<stage id>_error`, counted as `row_errors`.
    Example: - stage: filters.spa_score
               params: {policy: smollm2-135m-instruct, reference: /models/sft, backend: transformers}
    """

    name = "filters.spa_score"
    kind = "model"
    Params = SPAScoreParams

    def __init__(self, params: SPAScoreParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        load = self.params
        self.reference = load.ref_model  # None: `reference: none`, reference-free
        if load.backend == "vllm" and self.reference is not None and load.gpu_memory_utilization is None:
            load = load.model_copy(update={"gpu_memory_utilization": 0.4})  # two engines share one GPU (ignored on CPU)
        self.models = LoadedModels(load, seed)

    def key_material(self) -> dict[str, Any]:
        return super().key_material() | {"model_identity": identities(self.params, self._roles())}

    def _roles(self) -> list[str]:
        return [self.params.policy] + ([self.reference] if self.reference is not None else [])

    def mode(self, schema: pa.Schema) -> str:
        """`candidates` (a `responses` column and no pair) or `pairs`. Example: stage.mode(schema) -> 'pairs'"""
        p = self.params
        if p.input != "auto":
            return p.input
        return "candidates" if p.responses in schema.names and "chosen" not in schema.names else "pairs"

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        if self.mode(schema) == "candidates":
            from curate.filters.spa_rewards import REWARDS

            require(schema, {"prompt": TEXT_TYPES, self.params.responses: RESPONSES}, self.name)
            return with_fields(schema, {"spa_rewards": REWARDS, "spa_model": pa.string(), "spa_ref_model": pa.string(),
                                        self.error_column: pa.string()})
        require(schema, {"prompt": TEXT_TYPES, "chosen": pa.string(), "rejected": pa.string()}, self.name)
        fields: dict[str, pa.DataType] = {name: pa.float64() for name in LP_COLUMNS}
        fields.update({"spa_tokens_chosen": pa.int32(), "spa_tokens_rejected": pa.int32(), "spa_margin": pa.float64(),
                       "spa_conf": pa.float64(), "spa_model": pa.string(), "spa_ref_model": pa.string(),
                       self.error_column: pa.string()})
        return with_fields(schema, fields)

    def open(self) -> None:
        if self.reference is None:
            log.warning("%s: reference: none; spa_margin is β·(LP(chosen) − LP(rejected)) under the policy alone, "
                        "not an implicit DPO reward (rows say spa_ref_model = 'none')", self.stage_id)
        for model in self._roles():
            self.models.get(model)

    def close(self) -> None:
        self.models.release()

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        ref = self.models.get(self.reference) if self.reference is not None else None
        if self.mode(table.schema) == "candidates":
            from curate.filters.spa_rewards import candidate_rewards

            out, counters = candidate_rewards(table, self.models.get(p.policy), ref, p.normalize, self.error_column,
                                              p.batch_size, p.responses, p.policy, self.reference)
            return StageOutput(out, counters=counters)
        out, counters = score_pairs(table, self.models.get(p.policy), ref, p.beta, p.normalize, self.error_column,
                                    p.batch_size, p.policy, self.reference)
        return StageOutput(out, counters=counters)


def _fit_margins(tables: Iterable[pa.Table], column: str) -> np.ndarray:
    """Every part's margins in one float64 array (NaN for nulls), in part order."""
    parts = [_as_float(t.column(column)) for t in tables]
    return np.concatenate(parts) if parts else np.zeros(0)


def _state_value(state: pa.Table | None, column: str) -> Any:
    if state is None or column not in state.column_names or state.num_rows == 0:
        return None
    return state.column(column)[0].as_py()


class SPAFilterParams(Params):
    """Params of filters.spa. Example: SPAFilterParams(action="drop")"""

    margin_column: str = Field("spa_margin", description="the margin z (from filters.spa_score)")
    quantile: float = Field(SPA_QUANTILE, gt=0, lt=1, description="rows with z <= the global q-quantile are noisy")
    action: Literal["smooth", "drop"] = Field("smooth", description="smooth: label_smoothing = alpha; drop: reason spa_noisy")
    alpha: float = Field(SPA_ALPHA, ge=0, le=0.5, description="label smoothing of noisy rows (§6A refine strength)")


@register
class SPAFilter(Stage):
    """SPA's noisy-pair rule over the whole dataset: τ fitted over every part, then mark / smooth / drop.

    Adds `spa_noisy` (and `label_smoothing` when smoothing); stats.json gets `fit: {tau, n}`.
    Example: - stage: filters.spa
               params: {action: smooth, alpha: 0.1}
    """

    name = "filters.spa"
    kind = "global"
    Params = SPAFilterParams

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {self.params.margin_column: NUMERIC}, self.name)
        fields = {"spa_noisy": pa.bool_()}
        if self.params.action == "smooth":
            fields["label_smoothing"] = pa.float64()
        return with_fields(schema, fields)

    def fit_columns(self, schema: pa.Schema) -> list[str]:
        return [self.params.margin_column]

    def fit(self, tables: Iterable[pa.Table]) -> pa.Table:
        z = _fit_margins(tables, self.params.margin_column)
        tau = spa_threshold(z, self.params.quantile)
        return pa.table({"tau": pa.array([tau], pa.float64()), "n": pa.array([int((~np.isnan(z)).sum())], pa.int64())})

    def fit_summary(self, state: pa.Table) -> dict[str, Any]:
        return {"tau": _state_value(state, "tau"), "n": _state_value(state, "n")}

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput | Verdict:
        p = self.params
        return spa_apply(table, _state_value(state, "tau"), p.action, p.alpha, p.margin_column)


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
        z = _fit_margins(tables, p.margin_column)
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
        return {name: _state_value(state, name) for name in ("eps_hat", "n", "iterations", "converged")}

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput | Verdict:
        p = self.params
        eps = _state_value(state, "eps_hat")
        return noise_apply(table, p.margin_column, float("nan") if eps is None else eps, p.action,
                           p.drop_below, p.flip_below)
