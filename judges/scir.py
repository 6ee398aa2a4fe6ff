"""The stage `judges.scir`: keep pairs on which the generative judge and the implicit DPO reward agree (METHODS.md §1B).

- `p_imp = σ(β·(r(x,a) − r(x,b)))` with `r = LP(policy) − LP(reference)` (METHODS §0), computed by
  `curate.filters.spa.score_pairs` (the SPA margin, one place for implicit rewards). The
  `reference` must be given: a model, or `none` written out, which runs with `r = LP(policy)`,
  the policy's own likelihood margin (not an implicit DPO reward, not length-neutral): the stage
  then logs a warning, writes `scir_ref_model = 'none'` and counts `reference_free_rows`.
  Log-probs are read in fp32 by default (`dtype`), as METHODS.md §2 asks.
- `p_gen`: the judge (default: the policy itself, as in self-rewarding) reads a prompt asking
  "A or B" (template `ab_choice`, hashed into the key); its log-probs of the answers `A` and `B`
  at the answer position give `P(A) = softmax([logit_A, logit_B])[0]`, read in both orders and
  averaged to remove position bias: `p_gen = ½(P_AB(A) + 1 − P_BA(A))`. No text is generated.
- `consistent = (p_gen − ½)(p_imp − ½) > 0`, and optionally `|p − ½| ≥ min_confidence` for both.
Columns: `scir_p_ab`, `scir_p_ba`, `scir_p_gen`, `scir_p_imp`, `scir_consistent`, `scir_model`,
`scir_ref_model`, `scir_judge_model`, and the error column. `action: drop` keeps consistent
rows, labelled by the agreed direction (pairs where both say b ≻ a are swapped), and drops the
rest with the reason `scir_inconsistent` or `scir_unscored`; `mark` only adds the columns. The
probabilities are P(input chosen ≻ input rejected), in the input's order, also on swapped rows;
`scir_p_imp` is kept on rows the judge could not score (and the other way round).
stats.json counts consistent / inconsistent / unscored rows and how often each signal agrees
with the input label. Leaves out: the paper's consistency loss during training (§1B, unverified).

Example: order_averaged(0.9, 0.3) -> 0.8
"""
from __future__ import annotations

import logging
import math
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.backends.base import ScoreItem
from curate.backends.params import REFERENCE_FREE, ImplicitRewardParams
from curate.backends.scoring import as_messages, response_tokens, sequence_logprobs
from curate.contract import MESSAGES, StageOutput, put_columns, require, with_fields, with_reason
from curate.filters.spa import DPO_BETA, score_pairs
from curate.judges.templates import conversation_text, load_template
from curate.model_stage import ModelStage
from curate.pairing import swap_pairs
from curate.registry import register

log = logging.getLogger(__name__)


def choice_probability(logprob_a: float, logprob_b: float) -> float:
    """P(A) = softmax([logit_A, logit_B])[0], from the two answer tokens' log-probs (same softmax).

    Example: choice_probability(math.log(0.6), math.log(0.2)) -> 0.75
    """
    return 1.0 / (1.0 + math.exp(logprob_b - logprob_a))


def order_averaged(p_ab: float, p_ba: float) -> float:
    """p_gen = ½(P_AB(A) + 1 − P_BA(A)): a's win probability over both presentation orders.

    Example: order_averaged(0.9, 0.3) -> 0.8
    """
    return 0.5 * (p_ab + 1.0 - p_ba)


def is_consistent(p_gen: float, p_imp: float, min_confidence: float = 0.0) -> bool:
    """Both signals on the same side of ½, each at least `min_confidence` away from it (§1B).

    Example: is_consistent(0.8, 0.6) -> True; is_consistent(0.8, 0.3) -> False
    """
    same_side = (p_gen - 0.5) * (p_imp - 0.5) > 0
    return same_side and abs(p_gen - 0.5) >= min_confidence and abs(p_imp - 0.5) >= min_confidence


class SCIRParams(ImplicitRewardParams):
    """Params of judges.scir. Example: SCIRParams(policy="my-dpo-model", reference="my-sft-model")"""

    judge: str | None = Field(None, description="the generative judge (default: the policy, self-rewarding)")
    beta: float = Field(DPO_BETA, gt=0, description="β of the implicit reward")
    template: str = Field("ab_choice", description="judge prompt with {prompt}, {answer_1}, {answer_2}, answered by A or B")
    min_confidence: float = Field(0.0, ge=0, lt=0.5, description="δ: also require |p − ½| ≥ δ for both signals")
    action: Literal["drop", "mark"] = Field("drop", description="drop: keep consistent rows, relabelled; mark: add columns")


@register
class SCIRFilter(ModelStage):
    """Generative-judge vs implicit-reward consistency (module docstring). Example: - stage: judges.scir"""

    name = "judges.scir"
    Params = SCIRParams

    def __init__(self, params: SCIRParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        self.template = load_template(self.params.template, required=("prompt", "answer_1", "answer_2"))

    @property
    def judge(self) -> str:
        return self.params.judge or self.params.policy

    @property
    def reference(self) -> str | None:
        """The reference model, or None when `reference: none` (reference-free). Example: stage.reference"""
        return self.params.ref_model

    def model_refs(self) -> list[str]:
        """The models this stage loads: policy, reference if any, judge (once each). Example: stage.model_refs()"""
        p = self.params
        return list(dict.fromkeys(m for m in (p.policy, self.reference, self.judge) if m))

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), "prompt": MESSAGES, "chosen": pa.string(), "rejected": pa.string()}, self.name)
        return with_fields(schema, {
            "scir_p_ab": pa.float64(), "scir_p_ba": pa.float64(), "scir_p_gen": pa.float64(),
            "scir_p_imp": pa.float64(), "scir_consistent": pa.bool_(), "scir_model": pa.string(),
            "scir_ref_model": pa.string(), "scir_judge_model": pa.string(), self.error_column: pa.string(),
        })

    def open(self) -> None:
        if self.reference is None:
            log.warning("%s: reference: none; p_imp is σ(β·(LP(a) − LP(b))) under the policy alone, "
                        "not an implicit DPO reward (rows say scir_ref_model = 'none')", self.stage_id)
        super().open()

    def judge_items(self, messages: list[dict[str, str]], a: str, b: str) -> list[ScoreItem]:
        """Four scoring items: order ab answered A, B; order ba answered A, B."""
        prompt = conversation_text(messages)
        items = []
        for first, second in ((a, b), (b, a)):
            question = [{"role": "user", "content": self.template.render(prompt=prompt, answer_1=first, answer_2=second)}]
            items += [ScoreItem(question, "A"), ScoreItem(question, "B")]
        return items

    def generative(self, prompts: list, a: list, b: list) -> tuple[list[tuple[float, float] | None], list[str | None]]:
        """(P_AB(A), P_BA(A)) per row from the judge's answer-token log-probs, or None with a reason."""
        backend = self.models.get(self.judge)
        rows = [i for i in range(len(prompts)) if None not in (prompts[i], a[i], b[i])]
        items = [item for i in rows for item in self.judge_items(prompts[i], a[i], b[i])]
        _, too_long = response_tokens(backend, items)
        errors: list[str | None] = ["null prompt or answer"] * len(prompts)
        for i in rows:
            errors[i] = None
        for k, message in enumerate(too_long):
            if message and errors[rows[k // 4]] is None:
                errors[rows[k // 4]] = f"judge: {message}"
        scored = [k for k in range(len(items)) if errors[rows[k // 4]] is None]
        first_token = {k: float(lp[0]) for k, lp in zip(scored, sequence_logprobs(backend, [items[k] for k in scored], self.params.batch_size))}
        probs: list[tuple[float, float] | None] = [None] * len(prompts)
        for n, i in enumerate(rows):
            if errors[i] is None:
                k = 4 * n
                probs[i] = (choice_probability(first_token[k], first_token[k + 1]),
                            choice_probability(first_token[k + 2], first_token[k + 3]))
        return probs, errors

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        prompts = [as_messages(v) for v in table.column("prompt").to_pylist()]
        a, b = table.column("chosen").to_pylist(), table.column("rejected").to_pylist()
        probs, errors = self.generative(prompts, a, b)
        pairs = table.select(["id", "prompt", "chosen", "rejected"])
        reference = self.models.get(self.reference) if self.reference else None
        implicit, _ = score_pairs(pairs, self.models.get(p.policy), reference, beta=p.beta, batch_size=p.batch_size,
                                  policy_name=p.policy, reference_name=self.reference)
        p_imp = [None if m is None or math.isnan(m) else m for m in implicit.column("spa_conf").to_pylist()]
        for i, message in enumerate(implicit.column("spa_error").to_pylist()):
            if message and errors[i] is None:
                errors[i] = f"implicit reward: {message}"
        p_gen = [None if pr is None else order_averaged(*pr) for pr in probs]
        consistent = [None if g is None or m is None else is_consistent(g, m, p.min_confidence)  # NaN is null here
                      for g, m in zip(p_gen, p_imp)]
        n = table.num_rows
        out = put_columns(table, {
            "scir_p_ab": pa.array([None if pr is None else pr[0] for pr in probs], pa.float64()),
            "scir_p_ba": pa.array([None if pr is None else pr[1] for pr in probs], pa.float64()),
            "scir_p_gen": pa.array(p_gen, pa.float64()),
            "scir_p_imp": pa.array(p_imp, pa.float64()),  # kept when the judge could not score the row
            "scir_consistent": pa.array(consistent, pa.bool_()),
            "scir_model": pa.array([p.policy] * n, pa.string()),
            "scir_ref_model": pa.array([self.reference or REFERENCE_FREE] * n, pa.string()),
            "scir_judge_model": pa.array([self.judge] * n, pa.string()),
            self.error_column: pa.array(errors, pa.string()),
        })
        counters = {"rows": n, "consistent": sum(c is True for c in consistent),
                    "inconsistent": sum(c is False for c in consistent), "unscored": sum(c is None for c in consistent),
                    "judge_agrees_with_label": sum(g is not None and g > 0.5 for g in p_gen),
                    "implicit_agrees_with_label": sum(m is not None and m > 0.5 for m in p_imp)}
        if self.reference is None:
            counters["reference_free_rows"] = n
        if p.action == "mark":
            return StageOutput(out, counters=counters)
        return self._keep_consistent(out, counters)

    def _keep_consistent(self, table: pa.Table, counters: dict[str, int]) -> StageOutput:
        """Swap rows where both signals prefer b; drop inconsistent and unscored rows with a reason."""
        keep = pc.fill_null(table.column("scir_consistent"), False)
        flip = pc.and_(keep, pc.less(table.column("scir_p_gen"), 0.5))
        table = swap_pairs(table, flip)
        drop = pc.invert(keep)
        reasons = pc.if_else(pc.is_null(table.column("scir_consistent")), pa.scalar("scir_unscored"),
                             pa.scalar("scir_inconsistent"))
        counters["relabelled"] = int(pc.sum(flip).as_py() or 0)
        dropped = with_reason(table.filter(drop), reasons.filter(drop))
        return StageOutput(table.filter(keep), dropped if dropped.num_rows else None, counters)
