"""The stage `judges.ultrafeedback`: one judge prompt rates all of a row's candidates together, per aspect (METHODS.md §8.3).

For every row and every asked aspect (default the four of §8.3: instruction following, honesty,
truthfulness, helpfulness; or `aspects: [overall]`), one prompt shows the request and all the
candidate texts as `Text 1 ... Text K` and asks, for each text, a `Rating:` from 1 to 5 and a
one-sentence `Rationale:`. The prompt frame (template `ultrafeedback`) and the aspect rubrics
(`ultrafeedback_aspects.yaml`) are ours, and both are hashed into the stage key.
- *Order*: the candidates are shuffled once per row, seeded from (row id, stage, seed), and the
  same order is shown for every aspect (§8.3: UltraFeedback shuffles once, `SHUFLLE_NUM=1`); the
  ratings are mapped back to the original order. `uf_order[j]` is the candidate shown as Text j+1.
- *Sampling*: greedy by default (§8.3: the GPT-4 annotator ran at temperature 0).
- *Constrained output*: with the vLLM backend the reply is a regex of exactly K blocks
  `Text k / Rating: [1-5] / Rationale: <one line>`, each rationale sized so the whole reply fits
  in `max_tokens` (a token decodes to at least one character), so a small model still yields
  K ratings. Other backends get the same instructions, unconstrained.
- *Columns*: `uf_ratings` (struct, one list per aspect, one rating per candidate in the original
  order), `uf_rationales` (same shape), `uf_texts` (the raw reply per aspect), `uf_mean` (per
  candidate, the mean of the fine-grained aspects asked, or of `overall` when only it is asked;
  null when one of them is missing), `uf_overall` (only when `overall` is asked), `uf_order`,
  `uf_model`, and `<stage id>_error`: a reply that lacks the rating of a shown candidate, or a
  failed request, is a row error naming the aspect and the candidates, counted in stats.json
  (`parse_failures`, `row_errors`), never a silent null. Candidates without text are not shown
  and stay unrated. `monotone_in_position` counts replies whose ratings strictly rise or fall
  with the shown position (K >= 3): a judge that rates by position, which the shuffle turns into
  noise rather than a bias, but noise all the same.
Binarize with `pairs.from_scores` (`scores: uf_mean`, `mode: best_random_other`): chosen = highest
mean, rejected drawn uniformly among the others, ties dropped (§8.3, HuggingFaceH4's
`ultrafeedback_binarized`). Leaves out: the separate 1-10 critique prompt of §8.3 and its
overall_score fix, and the world-knowledge hints UltraFeedback gave its truthfulness annotator.

Example: parse_ratings("Text 1\\nRating: 4\\nRationale: Clear.", 1) -> [(4.0, 'Clear.')]
"""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator

from curate.backends.base import GenerationParams
from curate.backends.params import FREE_TEXT_CHAR, FREE_TEXT_START, ModelParams, run_batched
from curate.contract import MESSAGES, RESPONSES, StageOutput, put_columns, require, with_fields
from curate.errors import ConfigError
from curate.judges.icai_stages import counters_of, judge_request
from curate.judges.templates import BUILTIN_DIR, conversation_text, load_template, read_yaml
from curate.keys import canonical_json, digest, row_seed
from curate.model_stage import ModelStage
from curate.registry import register

FINE_GRAINED = ("instruction_following", "honesty", "truthfulness", "helpfulness")  # §8.3
OVERALL = "overall"
ASPECT_NAME = re.compile(r"[a-z][a-z_]*")
HEADER = re.compile(r"^[^\w\n]*(?:Output for\s+)?Text\s*(\d+)\b", re.IGNORECASE | re.MULTILINE)
RATING = re.compile(r"Rating[*\s]*:[*\s]*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)
RATIONALE = re.compile(r"Rationale[*\s]*:[*\s]*([^\n]*)", re.IGNORECASE)


def load_aspects(name_or_path: str) -> dict[str, dict[str, str]]:
    """Aspect titles and rubrics from a YAML file (built-in `ultrafeedback`), validated.

    Example: load_aspects("ultrafeedback")["honesty"]["title"] -> 'honesty'
    """
    path = name_or_path if name_or_path.endswith((".yaml", ".yml")) else f"{BUILTIN_DIR}/{name_or_path}_aspects.yaml"
    data = read_yaml(path, "no such aspects file (built-in: ultrafeedback)", name_or_path) or {}
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of aspect name -> {title, rubric}", where=path)
    for name, entry in data.items():
        if not isinstance(name, str) or not ASPECT_NAME.fullmatch(name):
            raise ConfigError(f"aspect name {name!r} must be lowercase letters and '_'", where=path)
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry[k].strip() for k in ("title", "rubric")):
            raise ConfigError(f"aspect '{name}' needs a non-empty `title` and `rubric`", where=path)
    return {name: {"title": entry["title"].strip(), "rubric": entry["rubric"].strip()} for name, entry in data.items()}


def presentation_order(indices: list[int], row_id: str, scope: str, seed: int) -> list[int]:
    """The candidate indices in the order the judge sees them: one seeded shuffle per row (§8.3).

    Re-sharding changes nothing (the seed hashes the row id). Example: presentation_order([0, 1, 2], "r1", "uf", 0) -> [2, 0, 1]
    """
    order = list(indices)
    random.Random(row_seed(row_id, scope, seed)).shuffle(order)
    return order


def numbered_texts(texts: list[str]) -> str:
    """The candidates as `[Text k]` blocks for the prompt. Example: numbered_texts(["Hi."]) -> '[Text 1]\\nHi.\\n[End of Text 1]'"""
    return "\n\n".join(f"[Text {k}]\n{text}\n[End of Text {k}]" for k, text in enumerate(texts, 1))


def listwise_regex(count: int, max_tokens: int) -> str:
    """Exactly `count` blocks `Text k / Rating: [1-5] / Rationale: <line>`, sized to fit max_tokens.

    Rationales are printable ASCII (`FREE_TEXT_CHAR`: one byte each, and a token is at least one
    byte), so a reply of at most `max_tokens` characters always ends before `max_tokens` cuts it;
    each rationale gets an equal share of what is left.
    Example: listwise_regex(2, 200) -> 'Text 1\\nRating: [1-5]\\nRationale: [!-~][ -~]{0,70}\\nText 2...'
    """
    fixed = sum(len(f"Text {k}\nRating: 5\nRationale: ") for k in range(1, count + 1)) + count - 1
    free = max(8, (max_tokens - fixed) // max(1, count))
    block = r"Text %d\nRating: [1-5]\nRationale: " + FREE_TEXT_START + FREE_TEXT_CHAR + "{0,%d}"
    return r"\n".join(block % (k, free - 1) for k in range(1, count + 1))


def parse_ratings(text: str | None, count: int) -> list[tuple[float | None, str | None]]:
    """(rating, rationale) of each shown text 1..count; rating None where missing or not a whole 1-5.

    Reads `Text k` headers (also `#### Output for Text k`, markdown bold) and the `Rating:` and
    `Rationale:` after each; a later block for the same k wins. Example:
    parse_ratings("Text 2\\nRating: 3\\nRationale: Vague.\\nText 1\\nRating: 6", 2) -> [(None, None), (3.0, 'Vague.')]
    """
    found: dict[int, tuple[float | None, str | None]] = {}
    if text:
        headers = list(HEADER.finditer(text))
        for h, header in enumerate(headers):
            block = text[header.end(): headers[h + 1].start() if h + 1 < len(headers) else len(text)]
            number = int(header.group(1))
            rating = RATING.search(block)
            value = float(rating.group(1)) if rating else None
            if value is not None and not (value.is_integer() and 1 <= value <= 5):
                value = None
            rationale = RATIONALE.search(block)
            why = rationale.group(1).strip().strip("*").strip() if rationale else None
            if 1 <= number <= count:
                found[number] = (value, why or None) if value is not None else (None, None)
    return [found.get(k, (None, None)) for k in range(1, count + 1)]


def map_back(shown: list[tuple[float | None, str | None]], order: list[int], n_candidates: int) -> tuple[list, list]:
    """Ratings and rationales in the original candidate order; candidates not shown stay None.

    `shown[j]` belongs to the candidate `order[j]`. Example: map_back([(5.0, "a"), (2.0, "b")], [1, 0], 2) -> ([2.0, 5.0], ['b', 'a'])
    """
    ratings: list[float | None] = [None] * n_candidates
    rationales: list[str | None] = [None] * n_candidates
    for (rating, why), index in zip(shown, order):
        ratings[index], rationales[index] = rating, why
    return ratings, rationales


def monotone_in_position(ratings: list[float | None]) -> bool:
    """Whether the ratings of K >= 3 shown texts strictly rise or fall with their position: a judge
    rating by position, not content (counted as `monotone_in_position` in stats.json).

    Example: monotone_in_position([1.0, 2.0, 3.0, 4.0]) -> True; monotone_in_position([2.0, 1.0, 4.0]) -> False
    """
    if len(ratings) < 3 or any(r is None for r in ratings):
        return False
    steps = [b - a for a, b in zip(ratings, ratings[1:])]  # type: ignore[operator]
    return all(d > 0 for d in steps) or all(d < 0 for d in steps)


def candidate_means(ratings: dict[str, list[float | None]]) -> list[float | None]:
    """Per candidate, the mean rating over the fine-grained aspects (everything but `overall`), or
    `overall` alone when no other aspect was asked; None when one of those ratings is missing.

    Example: candidate_means({"honesty": [4.0, 2.0], "helpfulness": [5.0, None]}) -> [4.5, None]
    """
    used = [a for a in ratings if a != OVERALL] or list(ratings)
    n = len(next(iter(ratings.values()))) if ratings else 0
    means: list[float | None] = []
    for i in range(n):
        values = [ratings[a][i] for a in used]
        means.append(None if any(v is None for v in values) else sum(values) / len(values))  # type: ignore[arg-type]
    return means


class UltraFeedbackParams(ModelParams):
    """Params of judges.ultrafeedback. Example: UltraFeedbackParams(model="smollm2-135m-instruct", aspects=["overall"])"""

    model: str = Field(description="the judge model")
    aspects: list[str] = Field(list(FINE_GRAINED), min_length=1,
                               description="aspects to rate, one prompt each (§8.3's four, or [overall], or yours)")
    template: str = Field("ultrafeedback", description="built-in template name or a .txt file with {prompt}, {count}, {texts}, {aspect}, {rubric}")
    aspects_file: str = Field("ultrafeedback", description="built-in name or a YAML file of aspect -> {title, rubric}")
    generation: GenerationParams = Field(GenerationParams(max_tokens=512, temperature=0.0),
                                         description="judge sampling (§8.3: temperature 0)")
    constrained: bool = Field(True, description="vllm: constrain the reply to K blocks of Text / Rating / Rationale")
    responses: str = Field("responses", description="candidate column")

    @field_validator("aspects")
    @classmethod
    def _unique(cls, aspects: list[str]) -> list[str]:
        repeated = sorted({a for a in aspects if aspects.count(a) > 1})
        if repeated:
            raise ValueError(f"aspects are repeated: {repeated}")
        return aspects


@register
class UltraFeedbackJudge(ModelStage):
    """Rate all candidates of a row jointly per aspect, 1-5 with a rationale (module docstring).

    Example: - stage: judges.ultrafeedback
               params: {model: smollm2-135m-instruct, aspects: [overall]}
    """

    name = "judges.ultrafeedback"
    Params = UltraFeedbackParams
    uses_seed = True

    def __init__(self, params: UltraFeedbackParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        p = self.params
        self.template = load_template(p.template, required=("prompt", "count", "texts", "aspect", "rubric"))
        known = load_aspects(p.aspects_file)
        unknown = [a for a in p.aspects if a not in known]
        if unknown:
            raise ConfigError(f"unknown aspects {unknown}; the aspects file has {sorted(known)}", where=p.aspects_file)
        self.rubrics = {a: known[a] for a in p.aspects}

    def key_texts(self) -> dict[str, Any]:
        return super().key_texts() | {"aspects_hash": digest(canonical_json(self.rubrics))}

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        p = self.params
        require(schema, {"id": pa.string(), "prompt": MESSAGES, p.responses: RESPONSES}, self.name)
        fields = {
            "uf_order": pa.list_(pa.int32()),
            "uf_texts": pa.struct([(a, pa.string()) for a in p.aspects]),
            "uf_ratings": pa.struct([(a, pa.list_(pa.float64())) for a in p.aspects]),
            "uf_rationales": pa.struct([(a, pa.list_(pa.string())) for a in p.aspects]),
            "uf_mean": pa.list_(pa.float64()),
        }
        if OVERALL in p.aspects:
            fields["uf_overall"] = pa.list_(pa.float64())
        return with_fields(schema, fields | {"uf_model": pa.string(), self.error_column: pa.string()})

    def requests(self, row_id: str, messages: list[dict], texts: list[str]) -> list:
        """One request per aspect for the texts in the order shown. Example: len(stage.requests("r1", msgs, ["a", "b"])) -> 4"""
        p = self.params
        regex = listwise_regex(len(texts), p.generation.max_tokens) if p.constrained and p.backend == "vllm" else None
        shared = {"prompt": conversation_text(messages), "count": str(len(texts)), "texts": numbered_texts(texts)}
        return [judge_request(self.template, p.generation, row_seed(row_id, f"{self.stage_id}:{aspect}", self.seed), regex,
                              aspect=self.rubrics[aspect]["title"], rubric=self.rubrics[aspect]["rubric"], **shared)
                for aspect in p.aspects]

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        ids = table.column("id").to_pylist()
        prompts = table.column("prompt").to_pylist()
        candidates = [r or [] for r in table.column(p.responses).to_pylist()]
        orders, requests = [], []
        for row_id, messages, cands in zip(ids, prompts, candidates):
            shown = [i for i, c in enumerate(cands) if c is not None and c["text"] is not None]
            order = presentation_order(shown, row_id, f"{self.stage_id}:order", self.seed)
            orders.append(order)
            if order:
                requests += self.requests(row_id, messages, [cands[i]["text"] for i in order])
        answers = [a[0] for a in run_batched(self.models.get(p.model), requests, p.batch_size)]
        return self._assemble(table, candidates, orders, answers)

    def _assemble(self, table: pa.Table, candidates: list, orders: list[list[int]], answers: list) -> StageOutput:
        """Map every reply back to the original order; columns, row errors and counters."""
        p = self.params
        cols: dict[str, list] = {k: [] for k in ("uf_order", "uf_texts", "uf_ratings", "uf_rationales", "uf_mean", "uf_overall")}
        errors: list[str | None] = []
        counters = Counter(counters_of(answers), requests=len(answers), parse_failures=0, row_errors=0, rated_candidates=0,
                           monotone_in_position=0)
        replies = iter(answers)
        for cands, order in zip(candidates, orders):
            texts, ratings, rationales, problems = {}, {}, {}, []
            for aspect in p.aspects:
                answer = next(replies) if order else None
                texts[aspect] = answer.text if answer is not None else None
                shown = parse_ratings(texts[aspect], len(order))
                counters["monotone_in_position"] += monotone_in_position([rating for rating, _ in shown])
                ratings[aspect], rationales[aspect] = map_back(shown, order, len(cands))
                unrated = sorted(order[j] for j, (rating, _) in enumerate(shown) if rating is None)
                if answer is not None and answer.error is not None:
                    problems.append(f"{aspect}: request failed: {answer.error}")
                elif unrated:
                    counters["parse_failures"] += 1
                    problems.append(f"{aspect}: no rating for candidates {unrated}")
            if not order:
                problems.append("no candidate text to rate")
            means = candidate_means(ratings)
            counters["rated_candidates"] += sum(m is not None for m in means)
            counters["row_errors"] += bool(problems)
            errors.append("; ".join(problems) or None)
            for name, value in (("uf_order", order), ("uf_texts", texts), ("uf_ratings", ratings), ("uf_rationales", rationales),
                                ("uf_mean", means), ("uf_overall", ratings.get(OVERALL))):
                cols[name].append(value)
        schema = self.output_schema(table.schema)
        arrays = {name: pa.array(values, schema.field(name).type) for name, values in cols.items() if name in schema.names}
        arrays["uf_model"] = pa.array([p.model] * table.num_rows, pa.string())
        arrays[self.error_column] = pa.array(errors, pa.string())
        return StageOutput(put_columns(table, arrays), counters=dict(counters))
