"""The stage `judges.rationale`: why the chosen reply beats the rejected one, in words (METHODS.md §3).

One LLM call per pair writes a rationale (RDPO/RORPO train on it beside the preference, §3 (c)):
- *Styles*: `general` (two or three sentences) or `specific` (one line per aspect, citing the
  responses: correctness, instruction following, relevance, ...); each is a template written for
  curate (`rationale_general`, `rationale_specific`), hashed into the stage key.
- *Presentation order* is drawn per row, seeded from the row id (§3 (c) [ours]: so the writer
  does not learn "first = better"); the prompt says which one was preferred.
- *Rewrite*: the writer is asked to say "the preferred response" / "the other response"; any
  "Response 1" / "Response 2" it still writes is rewritten to those words according to the
  order it saw, so the rationale refers to the replies by role, never by position (§3 (c)).
- `rationale_prompt` is the training-time conditioning text `x_rat` of §3: "Given the prompt:"
  and the conversation, the question which assistant response is more preferable and strictly
  follows the prompt, the chosen reply labelled *above*, "or", the rejected reply labelled
  *below* (chosen always first). It is the user turn; the assistant prefix is the policy's chat
  template's generation prompt. Its template (`rationale_conditioning`) is hashed into the key too.
- *Leakage guard* (§3 (f) [ours]): a rationale whose normalised edit distance to either reply is
  at most `min_edit_distance` (0.2) is a copy, and the row is dropped (`rationale_copies_response`).
Columns: `rationale`, `rationale_prompt`, `rationale_type`, `rationale_model`, the raw text
`rationale_raw`, `rationale_chosen_first` (the order the writer saw) and `<stage id>_error` (no
text, an empty text, a failed request; such rows are kept, with a null rationale; drop them with
`filters.nonempty: {columns: [rationale]}`). The RDPO loss term (§3 (c)) is `rdpo_loss`.
Leaves out: training (the trainer's job).

Example: rdpo_rationale_term(-50.0, gamma=0.1) -> 5.0067
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.backends.base import ChatRequest, Completion, GenerationParams
from curate.backends.params import ModelParams, run_batched
from curate.contract import MESSAGES, StageOutput, put_columns, require, with_fields, with_reason
from curate.judges.templates import conversation_text, load_template
from curate.keys import row_seed
from curate.model_stage import ModelStage
from curate.pairing import chosen_first
from curate.registry import register

ROLE_LABEL = re.compile(r"\b(?:the\s+)?response\s*([12])\b", re.IGNORECASE)
ROLES = {True: "the preferred response", False: "the other response"}


def refer_by_role(text: str, chosen_first: bool) -> str:
    """Replace "Response 1" / "Response 2" by the role of that reply in the order the writer saw.

    Example: refer_by_role("Response 2 is polite.", chosen_first=False) -> 'The preferred response is polite.'
    """
    def role(match: re.Match) -> str:
        phrase = ROLES[(match.group(1) == "1") == chosen_first]
        start = match.start()
        before = text[:start].rstrip()
        return phrase[0].upper() + phrase[1:] if not before or before[-1] in ".!?:\n-" else phrase

    return ROLE_LABEL.sub(role, text)


def edit_distance(a: str, b: str) -> float:
    """Levenshtein distance over characters divided by the longer length (0 = equal, 1 = nothing shared).

    Example: edit_distance("kitten", "sitting") -> 0.4286
    """
    from rapidfuzz.distance import Levenshtein

    return float(Levenshtein.normalized_distance(a, b))


def copies_response(rationale: str, chosen: str, rejected: str, min_edit_distance: float = 0.2) -> bool:
    """§3 (f) leakage guard: the rationale is within `min_edit_distance` of either reply.

    Example: copies_response("Paris is the capital.", "Paris is the capital!", "Rome.") -> True
    """
    return any(edit_distance(rationale.strip(), reply.strip()) <= min_edit_distance for reply in (chosen, rejected))


def dpo_term(z: float) -> float:
    """ℓ(z) = −log σ(z), computed stably. Example: dpo_term(0.0) -> 0.6931"""
    return math.log1p(math.exp(-z)) if z > -30 else -z + math.log1p(math.exp(z))


def rdpo_rationale_term(rationale_logprob: float, gamma: float = 0.1) -> float:
    """RDPO's rationale term ℓ(γ·LP(π_θ, x_rat, rationale)) (§3 (c); ≈ −γ·LP for a very negative LP).

    Example: rdpo_rationale_term(-50.0, gamma=0.1) -> 5.0067 (§3 (f))
    """
    return dpo_term(gamma * rationale_logprob)


def rdpo_loss(margin: float, rationale_logprob: float, beta: float = 0.1, gamma: float = 0.1) -> float:
    """RDPO loss of one pair: ℓ(β·h) + ℓ(γ·LP(rationale)), h the DPO margin (§0, §3 (c); β, γ of §3 (d)).

    Example: rdpo_loss(0.0, -50.0) -> 5.6998
    """
    return dpo_term(beta * margin) + rdpo_rationale_term(rationale_logprob, gamma)


class RationaleParams(ModelParams):
    """Params of judges.rationale. Example: RationaleParams(model="smollm2-135m-instruct", style="specific")"""

    model: str = Field(description="the model that writes the rationales")
    style: Literal["general", "specific"] = Field("general", description="general: a concise reason; specific: point by point")
    template: str | None = Field(None, description="template with {prompt}, {response_1}, {response_2}, {preferred} "
                                                   "(default: the built-in one of the style)")
    conditioning_template: str = Field("rationale_conditioning", description="x_rat template with {prompt}, {chosen}, {rejected}")
    generation: GenerationParams = Field(GenerationParams(max_tokens=256, temperature=0.7, top_p=0.9),
                                         description="sampling (§3 (c) [ours]: T <= 0.7, 256-512 tokens)")
    min_edit_distance: float = Field(0.2, ge=0.0, le=1.0,
                                     description="rationales this close to a reply (normalised edit distance) are dropped")


@register
class RationaleJudge(ModelStage):
    """Write a rationale per pair and its training-time conditioning text (module docstring).

    Example: - stage: judges.rationale
               params: {model: smollm2-135m-instruct, style: general}
    """

    name = "judges.rationale"
    Params = RationaleParams
    uses_seed = True

    def __init__(self, params: RationaleParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        p = self.params
        self.template = load_template(p.template or f"rationale_{p.style}",
                                      required=("prompt", "response_1", "response_2", "preferred"))
        self.conditioning = load_template(p.conditioning_template, required=("prompt", "chosen", "rejected"))

    def key_texts(self) -> dict[str, Any]:
        return super().key_texts() | {"conditioning_hash": self.conditioning.hash}

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), "prompt": MESSAGES, "chosen": pa.string(), "rejected": pa.string()}, self.name)
        return with_fields(schema, {
            "rationale": pa.string(), "rationale_prompt": pa.string(), "rationale_type": pa.string(),
            "rationale_model": pa.string(), "rationale_raw": pa.string(), "rationale_chosen_first": pa.bool_(),
            self.error_column: pa.string(),
        })

    def conditioning_text(self, messages: list[dict], chosen: str, rejected: str) -> str:
        """`x_rat` of §3: the chosen reply above, the rejected one below. Example: stage.conditioning_text(m, "a", "b")"""
        return self.conditioning.render(prompt=conversation_text(messages), chosen=chosen, rejected=rejected)

    def request(self, row_id: str, messages: list[dict], chosen: str, rejected: str) -> ChatRequest:
        """The writer's request for one pair, in this row's presentation order. Example: stage.request("r1", m, "a", "b")"""
        first = chosen_first(row_id, self.stage_id, self.seed)
        text = self.template.render(prompt=conversation_text(messages), response_1=chosen if first else rejected,
                                    response_2=rejected if first else chosen, preferred="Response 1" if first else "Response 2")
        return ChatRequest([{"role": "user", "content": text}], self.params.generation,
                           seed=row_seed(row_id, f"{self.stage_id}:text", self.seed) % (2**31))

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        rows = list(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist(),
                        table.column("chosen").to_pylist(), table.column("rejected").to_pylist()))
        todo = [i for i, (_, m, c, r) in enumerate(rows) if m is not None and c is not None and r is not None]
        answers = run_batched(self.models.get(self.params.model), [self.request(*rows[i]) for i in todo], self.params.batch_size)
        by_row: dict[int, Completion] = {i: answer[0] for i, answer in zip(todo, answers)}
        return self._assemble(table, rows, by_row)

    def _assemble(self, table: pa.Table, rows: list, by_row: dict[int, Completion]) -> StageOutput:
        """Columns, errors and counters; rows whose rationale copies a reply are rejected."""
        p = self.params
        cols: dict[str, list] = {k: [] for k in ("rationale", "rationale_prompt", "rationale_raw", "rationale_chosen_first",
                                                 self.error_column)}
        leaked, counters = [], Counter(rows=len(rows), rationales=0, row_errors=0, request_errors=0, leaked=0,
                                       truncated=0, tokens_generated=0)
        for i, (row_id, messages, chosen, rejected) in enumerate(rows):
            answer, first = by_row.get(i), chosen_first(row_id, self.stage_id, self.seed)
            error = None if answer is not None else "null prompt, chosen or rejected"
            if answer is not None and answer.error is not None:
                error, counters["request_errors"] = f"request failed: {answer.error}", counters["request_errors"] + 1
            elif answer is not None and not (answer.text or "").strip():
                error = "empty rationale"
            rationale = refer_by_role(answer.text.strip(), first) if error is None else None
            copy = rationale is not None and copies_response(rationale, chosen, rejected, p.min_edit_distance)
            leaked.append(copy)
            counters.update(rationales=rationale is not None, row_errors=error is not None, leaked=copy,
                            truncated=bool(answer and answer.truncated), tokens_generated=answer.n_tokens if answer else 0)
            cols["rationale"].append(rationale)
            cols["rationale_prompt"].append(self.conditioning_text(messages, chosen, rejected)
                                            if messages is not None and chosen is not None and rejected is not None else None)
            cols["rationale_raw"].append(answer.text if answer is not None else None)
            cols["rationale_chosen_first"].append(first)
            cols[self.error_column].append(error)
        n = table.num_rows
        schema = self.output_schema(table.schema)
        arrays = {name: pa.array(values, schema.field(name).type) for name, values in cols.items()}
        arrays |= {"rationale_type": pa.array([p.style] * n, pa.string()), "rationale_model": pa.array([p.model] * n, pa.string())}
        out = put_columns(table, arrays).select(schema.names)
        drop = pa.array(leaked, pa.bool_())
        rejected = with_reason(out.filter(drop), "rationale_copies_response") if any(leaked) else None
        return StageOutput(out.filter(pc.invert(drop)), rejected, dict(counters))
