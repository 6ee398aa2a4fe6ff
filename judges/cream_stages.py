"""The stages of CREAM (METHODS.md §1C): `judges.cream` (score, measure, pair) and `judges.cream_avg` (dataset-mean C).

- `judges.cream` (model) reads candidate rows (`prompt`, `responses`), scores every candidate with
  the current model M_t against its reference (`cream_reward_cur`, summed log-ratio) and with the
  previous iteration M_{t−1} (`cream_reward_prev`, length-normalised log-prob), measures their rank
  agreement `cream_consistency` (Kendall τ by default; `method: spearman | toporder`) and pairs
  chosen = argmax / rejected = argmin of `cream_reward_cur` with `pairs.from_scores`'s
  `best_worst` rule (ties and identical texts dropped with their reason). Each pair carries
  `cream_weight` = C (`consistency_dyn`, the row's own) and `label_smoothing` = 1 − C, the rate of
  CREAM's loss `C·ℓ(βh) + (1−C)·ℓ(−βh)`. The reference is required (a model; `none` is refused:
  CREAM's current reward is the implicit DPO reward). fp32 by default.
- `judges.cream_avg` (global) is the `consistency_avg` mode: every pair's `cream_weight` becomes the
  mean C over the whole dataset (fitted over every part, in stats.json as `fit: {mean_consistency, n}`).
Leaves out: generating the candidates (`generators.responses`, §1C (d): N=5, T=0.8, top-p 0.95)
and the DPO training itself.

Example: - stage: judges.cream
           params: {policy: out/dpo-iter1, reference: smollm2-135m-instruct, previous: smollm2-135m-instruct}
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from curate.backends.params import ModelParams, logprob_dtype_field, reference_model
from curate.contract import RESPONSES, TEXT_TYPES, Params, Stage, StageOutput, put_columns, require, with_fields
from curate.filters.margins import NUMERIC, as_float, fit_margins, state_value
from curate.filters.spa_rewards import REWARDS
from curate.judges.cream import CURRENT, PREVIOUS, Method, consistency_columns, score_candidates, weight_columns
from curate.pairing import PairFromScores, PairParams
from curate.model_stage import ModelStage
from curate.registry import register

log = logging.getLogger(__name__)

CREAM_FIELDS: dict[str, pa.DataType] = {
    CURRENT: REWARDS, PREVIOUS: REWARDS, "cream_consistency": pa.float64(), "cream_weight": pa.float64(),
    "label_smoothing": pa.float64(), "cream_model": pa.string(), "cream_ref_model": pa.string(),
    "cream_prev_model": pa.string(),
}


class CREAMParams(ModelParams):
    """Params of judges.cream. Example: CREAMParams(policy="dpo-1", reference="sft", previous="sft")"""

    policy: str = Field(description="M_t: the current (DPO-trained) model")
    reference: str = Field(description="M_t's reference (same tokenizer); required, `none` is refused")
    previous: str = Field(description="M_{t−1}: the previous iteration, scored by its length-normalised log-prob")
    method: Method = Field("kendall", description="rank agreement: kendall (CREAM's default) | spearman | toporder")
    responses: str = Field("responses", description="candidate column (list<struct<text, ...>>)")
    dtype: str = logprob_dtype_field()

    @field_validator("reference")
    @classmethod
    def _reference_is_a_model(cls, value: str) -> str:
        if reference_model(value) is None:
            raise ValueError("CREAM's current reward is LP(M_t) − LP(M_ref) (METHODS §1C): give the reference model; "
                             "`none` is not allowed")
        return value


@register
class CREAMJudge(ModelStage):
    """Score candidates with two iterations, weight by their rank agreement, pair by the current reward (module docstring).

    Example: CREAMJudge(CREAMParams(policy="p", reference="r", previous="q")).model_refs() -> ['p', 'r', 'q']
    """

    name = "judges.cream"
    Params = CREAMParams

    def __init__(self, params: CREAMParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        self.pairing = PairFromScores(PairParams(scores=CURRENT, responses=self.params.responses, mode="best_worst"),
                                      seed=seed, stage_id=self.stage_id)

    def model_refs(self) -> list[str]:
        """The models this stage loads, each once: current, reference, previous. Example: stage.model_refs()"""
        p = self.params
        return list(dict.fromkeys((p.policy, p.reference, p.previous)))

    def load_params(self) -> CREAMParams:
        """Three engines share one GPU: a 0.3 memory share each on vLLM unless set (ignored on CPU)."""
        if self.params.backend == "vllm" and self.params.gpu_memory_utilization is None:
            return self.params.model_copy(update={"gpu_memory_utilization": 0.3})
        return self.params

    def _annotated(self, schema: pa.Schema) -> pa.Schema:
        p = self.params
        require(schema, {"id": pa.string(), "prompt": TEXT_TYPES, p.responses: RESPONSES}, self.name)
        return with_fields(schema, CREAM_FIELDS | {self.error_column: pa.string()})

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        return self.pairing.output_schema(self._annotated(schema))

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        scored, counters = score_candidates(
            table, self.models.get(p.policy), self.models.get(p.reference), self.models.get(p.previous),
            p.batch_size, p.responses, self.error_column, (p.policy, p.reference, p.previous))
        scored = put_columns(scored, consistency_columns(scored, method=p.method))
        scored = scored.select(self._annotated(table.schema).names)
        paired = self.pairing.apply(scored)
        c = as_float(scored.column("cream_consistency"))
        known = c[~np.isnan(c)]
        counters |= {"rows": table.num_rows, "pairs": paired.table.num_rows, "consistency_rows": int(len(known)),
                     "consistency_sum": float(known.sum()), "fully_consistent": int((known == 1.0).sum()),
                     "fully_inconsistent": int((known == 0.0).sum())}
        rejected = paired.rejected
        if rejected is not None:  # the input rows with their reason (the run record keeps input columns)
            rejected = rejected.select(table.column_names + ["reason"])
        return StageOutput(paired.table, rejected, counters)


class CREAMAvgParams(Params):
    """Params of judges.cream_avg. Example: CREAMAvgParams(column="cream_consistency")"""

    column: str = Field("cream_consistency", description="the per-row C (from judges.cream)")


@register
class CREAMAvg(Stage):
    """`consistency_avg` (§1C (c)): every row's `cream_weight` becomes the dataset-mean C; `label_smoothing` = 1 − it.

    Example: - stage: judges.cream_avg
    """

    name = "judges.cream_avg"
    kind = "global"
    Params = CREAMAvgParams

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {self.params.column: NUMERIC}, self.name)
        return with_fields(schema, {"cream_weight": pa.float64(), "label_smoothing": pa.float64()})

    def fit_columns(self, schema: pa.Schema) -> list[str]:
        return [self.params.column]

    def fit(self, tables: Iterable[pa.Table]) -> pa.Table:
        c = fit_margins(tables, self.params.column)
        known = c[~np.isnan(c)]
        mean = float(known.mean()) if len(known) else None
        return pa.table({"mean_consistency": pa.array([mean], pa.float64()), "n": pa.array([len(known)], pa.int64())})

    def fit_summary(self, state: pa.Table) -> dict[str, Any]:
        return {"mean_consistency": state_value(state, "mean_consistency"), "n": state_value(state, "n")}

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        mean = state_value(state, "mean_consistency")
        return StageOutput(put_columns(table, weight_columns([mean] * table.num_rows)))

