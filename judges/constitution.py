"""The stage `judges.constitution`: an annotator that picks a reply by a constitution (METHODS.md §4 (c) 6).

The annotator sees the numbered constitution, the conversation and the two replies as (a) and
(b), in an order drawn per row from its id, and is told to apply the rules in order and to pick
at random when none applies (template `icai_annotate`, ours, hashed into the key). It answers `a`
or `b` (greedy; on vLLM constrained to those two answers). The pick is mapped back to
`chosen` / `rejected`: `icai_choice`, and `icai_agree` = the pick is the labelled chosen reply.
Uses:
- *relabeling new data* with a mined constitution (`constitution: path/to/constitution.json`
  or an inline list; `action: relabel` swaps the pairs it reverses, unanswered rows are dropped
  with `icai_no_choice`);
- *evaluation* (§4 (c) 6): with `baseline: true` the same rows also go to a no-constitution
  annotator (`icai_annotate_plain`, same model, same order), and stats.json counts `agree` /
  `disagree` / `unanswered` for both; with no `constitution` the stage reads the constitution
  that `judges.icai_filter` put on every row, and `rows: test` annotates only the held-out rows
  (`icai_split = test`). The 50% random baseline is the third reference.
`evaluate_constitution` is the same on a table, returning both agreements with 95% intervals.
Leaves out: mining the constitution (`curate.judges.icai_library`).

Example: parse_choice("(b)") -> 'b'
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.agreement import agreement
from curate.backends.base import ChatRequest, GenerationParams
from curate.backends.params import ModelParams, constrains, run_batched
from curate.contract import MESSAGES, StageOutput, put_columns, require, with_fields, with_reason
from curate.errors import ConfigError
from curate.judges.icai import numbered
from curate.judges.icai_stages import STRINGS, counters_of
from curate.judges.templates import conversation_text, load_template
from curate.keys import canonical_json, digest, row_seed
from curate.model_stage import ModelStage
from curate.pairing import chosen_first, swap_pairs
from curate.registry import register

CHOICE = re.compile(r"(?<![a-z])\(?([ab])\)?(?![a-z])", re.IGNORECASE)


def parse_choice(text: str | None) -> str | None:
    """The first standalone `a` or `b` (also `(a)`, `A`) of an answer, or None. Example: parse_choice("b.") -> 'b'"""
    match = CHOICE.search((text or "").strip())
    return match.group(1).lower() if match else None


def load_constitution(source: str | list[str]) -> list[str]:
    """Principles from an inline list, or a JSON file holding a list or `{"principles": [...]}` (constitution.json).

    Example: load_constitution(["Select the response that is shorter."]) -> ['Select the response that is shorter.']
    """
    if isinstance(source, list):
        return [str(p) for p in source]
    try:
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError("no such constitution file", where=source) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"is not valid JSON: {exc.msg} at line {exc.lineno}", where=source) from None
    principles = data.get("principles") if isinstance(data, dict) else data
    if not isinstance(principles, list) or not all(isinstance(p, str) for p in principles):
        raise ConfigError("expected a JSON list of principles or an object with 'principles'", where=source)
    return principles


class ConstitutionParams(ModelParams):
    """Params of judges.constitution. Example: ConstitutionParams(model="smollm2-135m-instruct", constitution="out/icai/icai/constitution.json")"""

    model: str = Field(description="the annotator model")
    constitution: str | list[str] | None = Field(None, description="constitution.json path or inline list; None: the `column` of each row")
    column: str = Field("icai_constitution", description="per-row constitution column when `constitution` is None")
    baseline: bool = Field(False, description="also annotate with the no-constitution annotator (evaluation)")
    rows: Literal["all", "test"] = Field("all", description="annotate every row, or only held-out rows (icai_split = test)")
    template: str = Field("icai_annotate", description="template with {constitution}, {prompt}, {response_a}, {response_b}")
    baseline_template: str = Field("icai_annotate_plain", description="no-constitution template with {prompt}, {response_a}, {response_b}")
    generation: GenerationParams = Field(GenerationParams(max_tokens=4, temperature=0.0), description="greedy, a letter")
    constrained: bool = Field(True, description="vllm, or a vLLM server (openai): the answer is exactly `a` or `b`")
    action: Literal["mark", "relabel"] = Field("mark", description="relabel: swap pairs the annotator reverses, drop unanswered")


@register
class ConstitutionJudge(ModelStage):
    """Annotate pairs by a constitution, optionally beside a no-constitution annotator (module docstring).

    Example: - stage: judges.constitution
               params: {model: smollm2-135m-instruct, constitution: out/icai/icai/constitution.json, action: relabel}
    """

    name = "judges.constitution"
    Params = ConstitutionParams
    uses_seed = True

    def __init__(self, params: ConstitutionParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        p = self.params
        self.template = load_template(p.template, required=("constitution", "prompt", "response_a", "response_b"))
        self.plain = load_template(p.baseline_template, required=("prompt", "response_a", "response_b")) if p.baseline else None
        self.principles = load_constitution(p.constitution) if p.constitution is not None else None

    def key_texts(self) -> dict[str, Any]:
        return super().key_texts() | {
            "baseline_template_hash": self.plain.hash if self.plain else None,
            "constitution_hash": digest(canonical_json(self.principles)) if self.principles is not None else None}

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        p = self.params
        require(schema, {"id": pa.string(), "prompt": MESSAGES, "chosen": pa.string(), "rejected": pa.string()}, self.name)
        if p.constitution is None:
            require(schema, {p.column: STRINGS}, self.name)
        if p.rows == "test":
            require(schema, {"icai_split": pa.string()}, self.name)
        fields = {"icai_chosen_first": pa.bool_(), "icai_choice": pa.string(), "icai_agree": pa.bool_(),
                  "icai_annotator_text": pa.string()}
        if p.baseline:
            fields |= {"icai_baseline_choice": pa.string(), "icai_baseline_agree": pa.bool_(), "icai_baseline_text": pa.string()}
        return with_fields(schema, fields | {"icai_annotator_model": pa.string(), self.error_column: pa.string()})

    def request(self, row_id: str, messages: list[dict], chosen: str, rejected: str, principles: list[str] | None) -> ChatRequest:
        """The annotator's request; `principles=None` gives the no-constitution annotator's."""
        p = self.params
        first = chosen_first(row_id, self.stage_id, self.seed)
        fields = {"prompt": conversation_text(messages), "response_a": chosen if first else rejected,
                  "response_b": rejected if first else chosen}
        text = self.plain.render(**fields) if principles is None else self.template.render(constitution=numbered(principles), **fields)
        choice = ["a", "b"] if constrains(p) else None
        return ChatRequest([{"role": "user", "content": text}], p.generation,
                           seed=row_seed(row_id, self.stage_id, self.seed) % (2**31), guided_choice=choice)

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        ids = table.column("id").to_pylist()
        rows = list(zip(ids, table.column("prompt").to_pylist(), table.column("chosen").to_pylist(),
                        table.column("rejected").to_pylist()))
        given = table.column(p.column).to_pylist() if self.principles is None else [self.principles] * len(rows)
        split = table.column("icai_split").to_pylist() if p.rows == "test" else ["test"] * len(rows)
        todo = [i for i, r in enumerate(rows) if split[i] == "test" and None not in r and given[i] is not None]
        requests = [self.request(*rows[i], given[i]) for i in todo]
        if p.baseline:
            requests += [self.request(*rows[i], None) for i in todo]
        answers = [a[0] for a in run_batched(self.models.get(p.model), requests, p.batch_size)]
        return self._assemble(table, rows, todo, answers)

    def _assemble(self, table: pa.Table, rows: list, todo: list[int], answers: list) -> StageOutput:
        p = self.params
        n = len(rows)
        cols: dict[str, list] = {name: [None] * n for name in ("icai_choice", "icai_agree", "icai_annotator_text",
                                                                "icai_baseline_choice", "icai_baseline_agree",
                                                                "icai_baseline_text", self.error_column)}
        annotators = [("icai_choice", "icai_agree", "icai_annotator_text", "", 0)]
        if p.baseline:
            annotators.append(("icai_baseline_choice", "icai_baseline_agree", "icai_baseline_text", "baseline_", len(todo)))
        counters: Counter = Counter(counters_of(answers), rows=n, annotated=len(todo))
        counters.update({a[3] + k: 0 for a in annotators for k in ("agree", "disagree", "unanswered", "picked_a")})
        for k, i in enumerate(todo):
            first = chosen_first(rows[i][0], self.stage_id, self.seed)
            for choice_col, agree_col, text_col, label, offset in annotators:
                answer = answers[offset + k]
                letter = parse_choice(answer.text) if answer.error is None else None
                choice = None if letter is None else "chosen" if (letter == "a") == first else "rejected"
                cols[choice_col][i], cols[text_col][i] = choice, answer.text
                cols[agree_col][i] = None if choice is None else choice == "chosen"
                counters[label + ("unanswered" if choice is None else "agree" if choice == "chosen" else "disagree")] += 1
                counters[label + "picked_a"] += letter == "a"  # position bias: a fair annotator picks (a) about half the time
            if cols["icai_choice"][i] is None:
                cols[self.error_column][i] = "no a/b answer" if answers[k].error is None else f"request failed: {answers[k].error}"
        counters["row_errors"] = sum(e is not None for e in cols[self.error_column])
        schema = self.output_schema(table.schema)
        arrays = {name: pa.array(values, schema.field(name).type) for name, values in cols.items() if name in schema.names}
        arrays |= {"icai_chosen_first": pa.array([chosen_first(r[0], self.stage_id, self.seed) for r in rows], pa.bool_()),
                   "icai_annotator_model": pa.array([p.model] * n, pa.string())}
        out = put_columns(table, arrays).select(schema.names)
        if p.action == "mark":
            return StageOutput(out, counters=dict(counters))
        choice = out.column("icai_choice")
        out = swap_pairs(out, pc.fill_null(pc.equal(choice, "rejected"), False))
        drop = pc.is_null(choice)
        counters["relabelled"] = int(pc.sum(pc.fill_null(pc.equal(choice, "rejected"), False)).as_py() or 0)
        dropped = with_reason(out.filter(drop), "icai_no_choice")
        return StageOutput(out.filter(pc.invert(drop)), dropped if dropped.num_rows else None, dict(counters))


def evaluation(counters: dict[str, Any]) -> dict[str, Any]:
    """Agreement of the constitutional and (if run) the no-constitution annotator, from a stage's counters.

    Example: evaluation({"agree": 6, "disagree": 3, "unanswered": 1})["constitution"]["share"] -> 0.6
    """
    def one(prefix: str) -> dict[str, Any]:
        figures = agreement(*(int(counters.get(prefix + k, 0)) for k in ("agree", "disagree", "unanswered")))
        return figures | {"picked_a": int(counters.get(prefix + "picked_a", 0))}

    out = {"constitution": one(""), "random_baseline": 0.5}
    if any(k.startswith("baseline_") for k in counters):
        out["no_constitution"] = one("baseline_")
    return out


def evaluate_constitution(pairs: pa.Table, constitution: list[str], model: str, seed: int = 0, **params: Any) -> dict[str, Any]:
    """§4 (c) 6 on a pair table (the held-out rows): constitution vs no-constitution annotator vs 50%.

    `params` are further ConstitutionParams (backend, dtype, template, ...).
    Example: evaluate_constitution(test_pairs, ["Select the response that is shorter."], "smollm2-135m-instruct")
    """
    stage = ConstitutionJudge(ConstitutionParams(model=model, constitution=constitution, baseline=True, **params), seed=seed)
    try:
        return evaluation(stage.apply(pairs).counters)
    finally:
        stage.close()
