"""SPA: implicit-DPO margins of pairs, the noisy-pair threshold and label smoothing (METHODS.md §6A).

What it does:
- `implicit_margins` / `score_pairs`: the SPA / implicit-DPO margin of every pair,
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
- `spa_label_smoothing`: the trainer-side smoothing schedule the columns feed.
- Stages: `filters.spa_score` (model; on candidate rows it writes `spa_rewards`, see
  `curate.filters.spa_rewards`) and `filters.spa` (global: τ is fitted over every part). The EM
  flip rate (`filters.noise_em`) is in `curate.filters.noise`.

Leaves out: SPA's sampling and pairing loop (`generators.responses` + a scoring stage +
`pairs.from_scores` do that), the λ-mixed logits (λ=1 by default, so mix = policy), the
training itself.

Example: t = implicit_margins(pairs, "smollm2-135m-instruct", reference="none", backend="transformers")
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.adapters import accepts_frames
from curate.backends.base import ScoreItem, open_backend
from curate.backends.params import REFERENCE_FREE, ImplicitRewardParams, reference_model
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
from curate.filters.margins import (NUMERIC, as_float, fit_margins, float_column, kept_rows, margin_values,
                                    scalar_or_array, sigmoid, state_value, with_metadata)
from curate.model_stage import ModelStage
from curate.registry import register

log = logging.getLogger(__name__)

SPA_WINDOW = 50  # §6A (c): rolling buffer of the last 50 per-micro-batch margins
SPA_QUANTILE = 0.1  # §6A (d): threshold quantile
SPA_ALPHA = 0.1  # §6A (d): "refine strength"
SPA_WARMUP = 0.2  # §6A (c): no refinement during the first 20% of steps
DPO_BETA = 0.1  # §6A (d)
TAU_KEY = b"curate.spa_tau"  # Arrow schema metadata of spa_filter results

LP_COLUMNS = ("spa_lp_policy_chosen", "spa_lp_policy_rejected", "spa_lp_ref_chosen", "spa_lp_ref_rejected")


# Threshold and smoothing (§6A (c)) ----------------------------------------------------------------


def spa_label_smoothing(z: Any, tau: float | None, alpha: float = SPA_ALPHA, step: int | None = None,
                        max_steps: int | None = None, warmup: float = SPA_WARMUP) -> Any:
    """α_eff per example: α where `z ≤ τ`, else 0; 0 everywhere before `warmup·max_steps` (§6A (c)).

    Without `step` (the curate filter) there is no warm-up. A NaN margin or τ None gets 0.
    Example: spa_label_smoothing([5.0, 6.0], 5.5) -> array([0.1, 0. ])
    """
    zz = np.asarray(z, dtype=np.float64)
    if tau is None or (step is not None and max_steps is not None and step < warmup * max_steps):
        return scalar_or_array(np.zeros_like(zz))
    with np.errstate(invalid="ignore"):
        return scalar_or_array(np.where(zz <= tau, float(alpha), 0.0))


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
    z = as_float(margins)
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


def spa_apply(table: pa.Table, tau: float | None, action: str = "smooth", alpha: float = SPA_ALPHA,
              margin_column: str = "spa_margin") -> StageOutput | Verdict:
    """Mark `spa_noisy = z ≤ τ`, then smooth (`label_smoothing` α / 0) or drop (reason `spa_noisy`).

    A row without a margin (or τ None: no margins at all) is not noisy: `spa_noisy` null,
    `label_smoothing` 0, kept. Example: spa_apply(t, 5.5).table.column("label_smoothing")
    """
    z = margin_values(table, margin_column)
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
    return with_metadata(kept_rows(spa_apply(table, tau, action, alpha, margin_column)), TAU_KEY, tau)


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
    columns = {name: float_column(values) for name, values in lp.items()}
    columns.update({
        "spa_tokens_chosen": pa.array(n_tok["chosen"], pa.int32(), mask=n_tok["chosen"] < 0),
        "spa_tokens_rejected": pa.array(n_tok["rejected"], pa.int32(), mask=n_tok["rejected"] < 0),
        "spa_margin": float_column(margin),
        "spa_conf": float_column(sigmoid(margin)),
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
class SPAScore(ModelStage):
    """Score every pair with the SPA / implicit DPO margin (see `implicit_margins`), or, on candidate
    rows, every candidate with its implicit reward `spa_rewards` (`curate.filters.spa_rewards`).

    Row failures (null texts, too long) go to `<stage id>_error`, counted as `row_errors`.
    Example: - stage: filters.spa_score
               params: {policy: smollm2-135m-instruct, reference: /models/sft, backend: transformers}
    """

    name = "filters.spa_score"
    Params = SPAScoreParams

    @property
    def reference(self) -> str | None:
        """The reference model, or None for `reference: none` (reference-free). Example: stage.reference"""
        return self.params.ref_model

    def load_params(self) -> SPAScoreParams:
        load = self.params
        if load.backend == "vllm" and self.reference is not None and load.gpu_memory_utilization is None:
            load = load.model_copy(update={"gpu_memory_utilization": 0.4})  # two engines share one GPU (ignored on CPU)
        return load

    def model_refs(self) -> list[str]:
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
        super().open()

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
        z = fit_margins(tables, self.params.margin_column)
        tau = spa_threshold(z, self.params.quantile)
        return pa.table({"tau": pa.array([tau], pa.float64()), "n": pa.array([int((~np.isnan(z)).sum())], pa.int64())})

    def fit_summary(self, state: pa.Table) -> dict[str, Any]:
        return {"tau": state_value(state, "tau"), "n": state_value(state, "n")}

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput | Verdict:
        p = self.params
        return spa_apply(table, state_value(state, "tau"), p.action, p.alpha, p.margin_column)
