"""The stage `judges.self_reward`: a model grades each candidate on an additive 0-5 scale (METHODS.md §1A).

For every candidate in `responses`, the judge prompt (template `self_reward`, hashed into the
stage key) is sampled `samples` times (k=3, T=0.7, top-p 0.9 by default, §1A (d)); each text is
parsed for the last `Score: x` / `Points: x` (case-insensitive), values outside [0, 5] are
dropped, and the candidate's score is the mean of the valid values. With the vLLM backend, or a
vLLM server through `openai`, the judge's output can be constrained to a short justification
ending in `Score: <0-5>` (structured outputs, a regex), so that even a small model yields a
parseable verdict. Raw judge texts are
kept (`sr_judgments`); a candidate with no parseable score has a null score and makes the row's
`<stage id>_error` say so, counted in stats.json (`parse_failures`, `row_errors`), never a silent
null. Pairing (best vs worst, ties dropped) is `pairs.from_scores` with `scores: sr_scores`.
Leaves out: the §1B consistency check (its own stage).

Example: parse_score("...so 3 points. Score: 4") -> 4.0
"""
from __future__ import annotations

import logging
import math
import re

import pyarrow as pa
from pydantic import Field

from curate.backends.base import ChatRequest, GenerationParams
from curate.backends.params import FREE_TEXT_CHAR, ModelParams, constrains, run_batched
from curate.contract import MESSAGES, RESPONSES, StageOutput, put_columns, require, with_fields
from curate.judges.templates import conversation_text, load_template
from curate.keys import row_seed
from curate.model_stage import ModelStage
from curate.registry import register

log = logging.getLogger(__name__)

SCORE = re.compile(r"(?i)(?:Score|Points):\s*([0-9.]+)")  # §1A (c), as in the reference implementations


def constrained_regex(max_tokens: int) -> str:
    """One line of reasons, then `Score: <0-5>` (§1A output instructions), short enough to fit.

    Reasons are printable ASCII (`FREE_TEXT_CHAR`, one byte each, and a token is at least one
    byte), so reasons of at most `max_tokens - 10` characters always leave room for the score line
    before `max_tokens` cuts the text.
    Example: constrained_regex(200) -> '[ -~]{1,190}\\nScore: [0-5]'
    """
    return FREE_TEXT_CHAR + r"{1,%d}\nScore: [0-5]" % max(16, max_tokens - 10)


def parse_score(text: str | None, low: float = 0.0, high: float = 5.0) -> float | None:
    """The last `Score:` / `Points:` value in a judge text, or None if absent or outside [low, high].

    Example: parse_score("Points: 3.5") -> 3.5; parse_score("Score: 7") -> None
    """
    if not text:
        return None
    matches = SCORE.findall(text)
    if not matches:
        return None
    try:
        value = float(matches[-1].rstrip("."))
    except ValueError:
        return None
    return value if low <= value <= high and math.isfinite(value) else None


def mean_score(texts: list[str | None]) -> tuple[float | None, int]:
    """Mean of the parseable scores of k judge texts, and how many parsed (§1A (f)).

    Example: mean_score(["...Score: 4", "Score: 5", "no score"]) -> (4.5, 2)
    """
    values = [v for v in (parse_score(t) for t in texts) if v is not None]
    return (sum(values) / len(values) if values else None), len(values)


class SelfRewardParams(ModelParams):
    """Params of judges.self_reward. Example: SelfRewardParams(model="smollm2-135m-instruct")"""

    model: str = Field(description="the judge; for self-rewarding, the policy that generated the candidates")
    template: str = Field("self_reward", description="built-in template name or a .txt file with {prompt} and {response}")
    samples: int = Field(3, ge=1, description="judge samples per candidate, averaged (k)")
    generation: GenerationParams = Field(GenerationParams(max_tokens=256, temperature=0.7, top_p=0.9),
                                         description="judge sampling params (n is set to `samples`)")
    constrained: bool = Field(True, description="vllm, or a vLLM server (openai): constrain the judge to reasons + 'Score: <0-5>'")
    responses: str = Field("responses", description="candidate column")


@register
class SelfRewardJudge(ModelStage):
    """Score every candidate with an LLM-as-judge on the additive 5-point scale (module docstring).

    Example: - stage: judges.self_reward
               params: {model: smollm2-135m-instruct}
    """

    name = "judges.self_reward"
    Params = SelfRewardParams
    uses_seed = True

    def __init__(self, params: SelfRewardParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        self.template = load_template(self.params.template, required=("prompt", "response"))

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), "prompt": MESSAGES, self.params.responses: RESPONSES}, self.name)
        return with_fields(schema, {
            "sr_judgments": pa.list_(pa.list_(pa.string())),
            "sr_scores": pa.list_(pa.float64()),
            "sr_n_valid": pa.list_(pa.int32()),
            "sr_model": pa.string(),
            self.error_column: pa.string(),
        })

    def requests(self, row_id: str, messages: list[dict], responses: list[dict]) -> list[ChatRequest]:
        """One judge request per candidate (n = samples), seeded from the row id and candidate index.

        Example: stage.requests("r1", msgs, [{"text": "hi"}])[0].params.n -> 3
        """
        p = self.params
        params = p.generation.model_copy(update={"n": p.samples})
        regex = constrained_regex(params.max_tokens) if constrains(p) else None
        conversation = conversation_text(messages)
        return [
            ChatRequest([{"role": "user", "content": self.template.render(prompt=conversation, response=r["text"] or "")}],
                        params, seed=row_seed(row_id, f"{self.stage_id}:{i}", self.seed) % (2**31), guided_regex=regex)
            for i, r in enumerate(responses)
        ]

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        ids = table.column("id").to_pylist()
        prompts = table.column("prompt").to_pylist()
        candidates = [r or [] for r in table.column(p.responses).to_pylist()]
        requests, owners = [], []
        for row, (row_id, messages, responses) in enumerate(zip(ids, prompts, candidates)):
            for request in self.requests(row_id, messages, responses):
                requests.append(request)
                owners.append(row)
        completions = run_batched(self.models.get(p.model), requests, p.batch_size)
        judgments: list[list[list[str | None]]] = [[] for _ in ids]
        for row, answer in zip(owners, completions):
            judgments[row].append([c.text if c.error is None else None for c in answer])
        return self._assemble(table, judgments, completions)

    def _assemble(self, table: pa.Table, judgments: list, completions: list) -> StageOutput:
        """Score columns, errors and counters from the judge texts."""
        scores, valid, errors = [], [], []
        counters = {"judgments": 0, "parse_failures": 0, "row_errors": 0, "request_errors": 0,
                    "tokens_generated": sum(c.n_tokens for answer in completions for c in answer),
                    "truncated": sum(c.truncated for answer in completions for c in answer)}
        for row in judgments:
            row_scores, row_valid, unscored = [], [], []
            for i, texts in enumerate(row):
                score, n_valid = mean_score(texts)
                row_scores.append(score)
                row_valid.append(n_valid)
                counters["judgments"] += len(texts)
                counters["parse_failures"] += sum(t is not None for t in texts) - n_valid
                counters["request_errors"] += sum(t is None for t in texts)
                if score is None:
                    unscored.append(i)
            scores.append(row_scores)
            valid.append(row_valid)
            errors.append(f"no parseable score for candidates {unscored}" if unscored else None)
            counters["row_errors"] += bool(unscored)
        columns = {
            "sr_judgments": pa.array(judgments, pa.list_(pa.list_(pa.string()))),
            "sr_scores": pa.array(scores, pa.list_(pa.float64())),
            "sr_n_valid": pa.array(valid, pa.list_(pa.int32())),
            "sr_model": pa.array([self.params.model] * table.num_rows, pa.string()),
            self.error_column: pa.array(errors, pa.string()),
        }
        return StageOutput(put_columns(table, columns), counters=counters)
