"""Ranking accuracy, idealized accuracy and difficulty of preference pairs (METHODS.md §8.6, Chen et al. 2405.19534).

Columns, from the reference model's summed response log-probs `LP_ref` (METHODS §0):
- `ref_logratio = LP_ref(y_w) − LP_ref(y_l)`, `difficulty_c = −ref_logratio` (Thm 4.1: a large
  positive c means the reference already strongly misranks the pair, hard to flip);
- `flip_loss_threshold = −log σ(β·c)`: the trained model ranks the pair correctly iff its DPO
  loss on it is at most this;
- `ideal_correct`: whether the optimum of DPO/RLHF with rater proportion α = P(y_w ≻ y_l) ranks
  the pair correctly (Cor. 3.3): `ref_logratio + (1/β)·ln(α/(1−α)) > 0`; α = 1 is replaced by
  1 − ε, ε = 0.001 (App. C.4), so the default α is 0.999; `ideal_ratio` is the same test as a
  likelihood ratio, `exp(ref_logratio)·(α/(1−α))^(1/β)` > 1;
- `ref_rank_correct = LP_ref(y_w) ≥ LP_ref(y_l)` (R of §8.6, for the reference) and
  `ref_rank_correct_norm`, its length-normalised variant R̃ (LP / |R| on each side).
Plus `ref_lp_chosen`, `ref_lp_rejected`, `ref_tokens_chosen`, `ref_tokens_rejected`,
`rd_ref_model` and the row error column. The log-probs are read through SPA's pair scorer
(`curate.filters.spa.score_pairs`, one place for LP of pairs), fp32 by default.

`difficulty_of(frame, lp_chosen, lp_rejected)` computes the columns from log-probs already in the
frame (e.g. `spa_lp_ref_chosen` of `filters.spa_score`); `difficulty_scores(frame, reference)`
reads them from a model. The stage `filters.ranking_difficulty` marks, or drops pairs the
reference misranks beyond `max_difficulty` (reason `ref_misranked`) and/or pairs even the
idealized optimum misranks (`ideal_incorrect`). The reference is required: `none` is refused.
Leaves out: training, and the ranking accuracy of a trained policy (give it as `reference` to read
its own R).

Example: flip_loss_threshold(1.0, 0.1) -> 0.6444
"""
from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from curate.adapters import accepts_frames
from curate.backends.base import open_backend
from curate.backends.params import ModelParams, logprob_dtype_field, reference_model
from curate.contract import TEXT_TYPES, StageOutput, put_columns, require, with_fields, with_reason
from curate.filters.margins import as_float, dpo_loss, float_column, scalar_or_array
from curate.filters.spa import DPO_BETA, score_pairs
from curate.model_stage import ModelStage
from curate.registry import register

log = logging.getLogger(__name__)

EPSILON = 0.001  # §8.6, App. C.4: α = 1 becomes 1 − ε
ALPHA = 1.0 - EPSILON

DIFFICULTY_FIELDS: dict[str, pa.DataType] = {
    "ref_lp_chosen": pa.float64(), "ref_lp_rejected": pa.float64(), "ref_tokens_chosen": pa.int32(),
    "ref_tokens_rejected": pa.int32(), "ref_logratio": pa.float64(), "difficulty_c": pa.float64(),
    "flip_loss_threshold": pa.float64(), "ideal_ratio": pa.float64(), "ideal_correct": pa.bool_(),
    "ref_rank_correct": pa.bool_(), "ref_rank_correct_norm": pa.bool_(), "rd_ref_model": pa.string(),
}


def flip_loss_threshold(c: Any, beta: float = DPO_BETA) -> Any:
    """`−log σ(β·c)` (Thm 4.1): the DPO loss a pair must reach for the trained model to rank it correctly.

    Example: flip_loss_threshold(1.0, 0.1) -> 0.6444
    """
    return scalar_or_array(dpo_loss(beta * np.asarray(c, dtype=np.float64)))


def ideal_log_margin(ref_logratio: Any, alpha: float = ALPHA, beta: float = DPO_BETA) -> Any:
    """`ref_logratio + (1/β)·ln(α/(1−α))` (Cor. 3.3): positive iff the idealized optimum ranks y_w first.

    α = 1 is replaced by 1 − ε (App. C.4). Example: ideal_log_margin(-1.0, 0.75, 1.0) -> 0.0986
    """
    alpha = ALPHA if alpha == 1.0 else alpha
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    return scalar_or_array(np.asarray(ref_logratio, dtype=np.float64) + math.log(alpha / (1.0 - alpha)) / beta)


def ideal_ratio(ref_logratio: Any, alpha: float = ALPHA, beta: float = DPO_BETA) -> Any:
    """`π_ref(y_w)/π_ref(y_l) · (α/(1−α))^(1/β)`: above 1 iff the idealized optimum ranks y_w first.

    Example: ideal_ratio(-1.0, 0.75, 0.5) -> 3.311
    """
    return scalar_or_array(np.exp(np.asarray(ideal_log_margin(ref_logratio, alpha, beta), dtype=np.float64)))


def difficulty_columns(lp_chosen: Any, lp_rejected: Any, beta: float = DPO_BETA, alpha: float = ALPHA,
                       tokens_chosen: Any = None, tokens_rejected: Any = None) -> dict[str, pa.Array]:
    """The §8.6 columns from the reference's LP of each side (NaN / null: unscored, null columns).

    Without token counts `ref_rank_correct_norm` is null. Example: difficulty_columns([-3.0], [-2.0])["difficulty_c"]
    """
    w, l_ = as_float(lp_chosen), as_float(lp_rejected)
    missing = np.isnan(w) | np.isnan(l_)
    ratio = w - l_
    c = -ratio
    with np.errstate(invalid="ignore"):
        margin = np.asarray(ideal_log_margin(ratio, alpha, beta), dtype=np.float64).reshape(-1)
        columns = {
            "ref_logratio": float_column(ratio), "difficulty_c": float_column(c),
            "flip_loss_threshold": float_column(np.asarray(flip_loss_threshold(c, beta), np.float64).reshape(-1)),
            "ideal_ratio": float_column(np.exp(margin)),
            "ideal_correct": pa.array(margin > 0, pa.bool_(), mask=missing),
            "ref_rank_correct": pa.array(ratio >= 0, pa.bool_(), mask=missing),
        }
        if tokens_chosen is not None and tokens_rejected is not None:
            tw, tl = as_float(tokens_chosen), as_float(tokens_rejected)
            normed = w / tw >= l_ / tl
            columns["ref_rank_correct_norm"] = pa.array(normed, pa.bool_(), mask=missing | np.isnan(tw) | np.isnan(tl))
        else:
            columns["ref_rank_correct_norm"] = pa.nulls(len(w), pa.bool_())
    return columns


@accepts_frames
def difficulty_of(table: pa.Table, lp_chosen: str = "ref_lp_chosen", lp_rejected: str = "ref_lp_rejected",
                  beta: float = DPO_BETA, alpha: float = ALPHA) -> pa.Table:
    """Add `ref_logratio`, `difficulty_c`, `flip_loss_threshold`, `ideal_ratio`, `ideal_correct`, `ref_rank_correct`
    from reference log-prob columns already in the frame (no model). Example: difficulty_of(t, "spa_lp_ref_chosen", "spa_lp_ref_rejected")
    """
    columns = difficulty_columns(table.column(lp_chosen), table.column(lp_rejected), beta, alpha)
    columns.pop("ref_rank_correct_norm")
    return put_columns(table, columns)


def score_difficulty(table: pa.Table, reference: Any, beta: float = DPO_BETA, alpha: float = ALPHA,
                     error_column: str = "ranking_difficulty_error", batch_size: int | None = None,
                     reference_name: str | None = None) -> tuple[pa.Table, dict[str, int]]:
    """Every §8.6 column for an opened scoring backend of the reference, and counters.

    Example: score_difficulty(pairs, open_backend("transformers", "smollm2-135m-instruct"))[0]
    """
    scored, counters = score_pairs(table, reference, None, 1.0, "sum", "e", batch_size)
    lp_w, lp_l = scored.column("spa_lp_policy_chosen"), scored.column("spa_lp_policy_rejected")
    tok_w, tok_l = scored.column("spa_tokens_chosen"), scored.column("spa_tokens_rejected")
    columns = {"ref_lp_chosen": lp_w, "ref_lp_rejected": lp_l, "ref_tokens_chosen": tok_w, "ref_tokens_rejected": tok_l}
    columns |= difficulty_columns(lp_w, lp_l, beta, alpha, tok_w, tok_l)
    columns |= {"rd_ref_model": pa.array([reference_name or getattr(reference, "name", None)] * table.num_rows, pa.string()),
                error_column: scored.column("e")}
    out = put_columns(table, columns)
    rank = out.column("ref_rank_correct")
    counters = {"rows": table.num_rows, "scored": len(rank) - rank.null_count, "row_errors": counters["row_errors"],
                "tokens_scored": counters["tokens_scored"],
                "ref_misranked": int(pc.sum(pc.invert(rank)).as_py() or 0),
                "ref_misranked_norm": int(pc.sum(pc.invert(out.column("ref_rank_correct_norm"))).as_py() or 0),
                "ideal_incorrect": int(pc.sum(pc.invert(out.column("ideal_correct"))).as_py() or 0)}
    return out, counters


@accepts_frames
def difficulty_scores(table: pa.Table, reference: Any, beta: float = DPO_BETA, alpha: float = ALPHA,
                       backend: Literal["vllm", "transformers"] = "transformers", batch_size: int | None = None,
                       **options: Any) -> pa.Table:
    """Score every pair with the reference model and add the §8.6 columns (module docstring).

    `reference` is a model reference or an opened backend (required; `none` is refused). `options`
    go to `open_backend` (default `dtype="float32"`). Example: difficulty_scores(pairs, "smollm2-135m-instruct")
    """
    if isinstance(reference, str) and reference_model(reference) is None:
        raise ValueError("ranking difficulty reads the reference's log-probs: `reference: none` is not allowed")
    opened = reference if hasattr(reference, "logprobs") else open_backend(backend, reference, **({"dtype": "float32"} | options))
    out, _ = score_difficulty(table, opened, beta, alpha, batch_size=batch_size,
                              reference_name=reference if isinstance(reference, str) else None)
    return out


class RankingDifficultyParams(ModelParams):
    """Params of filters.ranking_difficulty. Example: RankingDifficultyParams(reference="smollm2-135m-instruct")"""

    reference: str = Field(description="π_ref of the DPO run the pairs are for; required, `none` is refused")
    beta: float = Field(DPO_BETA, gt=0, description="β of the DPO run")
    alpha: float = Field(ALPHA, gt=0, le=1, description="rater proportion P(y_w ≻ y_l); 1 is read as 1 − 0.001")
    action: Literal["mark", "drop"] = Field("mark", description="mark: add columns; drop: drop by the rules below")
    max_difficulty: float | None = Field(None, description="drop: pairs with difficulty_c above this (ref_misranked)")
    drop_ideal_incorrect: bool = Field(False, description="drop: pairs even the idealized optimum misranks")
    dtype: str = logprob_dtype_field()

    @field_validator("reference")
    @classmethod
    def _reference_is_a_model(cls, value: str) -> str:
        if reference_model(value) is None:
            raise ValueError("ranking difficulty reads the reference model's log-probs (METHODS §8.6): `none` is not allowed")
        return value

    @model_validator(mode="after")
    def _drop_has_a_rule(self) -> "RankingDifficultyParams":
        if self.action == "drop" and self.max_difficulty is None and not self.drop_ideal_incorrect:
            raise ValueError("action: drop needs max_difficulty and/or drop_ideal_incorrect: true")
        return self


@register
class RankingDifficulty(ModelStage):
    """§8.6 columns of every pair from the reference model; optionally drop the pairs DPO cannot learn to rank.

    Rows the reference could not score (null texts, too long) are kept with null columns and their
    reason in `<id>_error` (counted as `row_errors`). Example: - stage: filters.ranking_difficulty
                                                                 params: {reference: smollm2-135m-instruct}
    """

    name = "filters.ranking_difficulty"
    Params = RankingDifficultyParams

    def model_refs(self) -> list[str]:
        """The one model it loads: the reference. Example: stage.model_refs() -> ['smollm2-135m-instruct']"""
        return [self.params.reference]

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"prompt": TEXT_TYPES, "chosen": pa.string(), "rejected": pa.string()}, self.name)
        return with_fields(schema, DIFFICULTY_FIELDS | {self.error_column: pa.string()})

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        out, counters = score_difficulty(table, self.models.get(p.reference), p.beta, p.alpha, self.error_column,
                                         p.batch_size, p.reference)
        if p.action == "mark":
            return StageOutput(out, counters=counters)
        c = as_float(out.column("difficulty_c"))
        with np.errstate(invalid="ignore"):
            hard = c > p.max_difficulty if p.max_difficulty is not None else np.zeros(len(c), bool)
        ideal = pc.fill_null(out.column("ideal_correct"), True).to_numpy(zero_copy_only=False).astype(bool)
        unideal = ~ideal if p.drop_ideal_incorrect else np.zeros(len(c), bool)
        drop = hard | unideal
        reasons = pa.array(np.where(hard, "ref_misranked", "ideal_incorrect")[drop], pa.string())
        counters |= {"dropped_ref_misranked": int(hard.sum()), "dropped_ideal_incorrect": int((unideal & ~hard).sum())}
        dropped = with_reason(out.filter(pa.array(drop)), reasons)
        return StageOutput(out.filter(pa.array(~drop)), dropped if dropped.num_rows else None, counters)
