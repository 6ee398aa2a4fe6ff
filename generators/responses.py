"""The stage `generators.responses`: N candidate responses per prompt from one model or a pool.

Writes the wide `responses` column (`list<struct<text, model, finish_reason, n_tokens>>`) and
`<stage id>_error` (null when every response came back). Each row's sampling seed is hashed from
(row id, stage id, pool entry, global seed), so re-sharding changes nothing (DESIGN.md §6). With a model
pool, each prompt is answered by `models_per_prompt` models drawn from `models` (and, when
`system_prompts` is set, one system prompt drawn per model), the UltraFeedback shape of
METHODS.md §8.3. Responses cut by `max_tokens` keep `finish_reason: length` and are counted in
stats.json (`truncated`), never hidden. By default a whole part goes to the engine in one call,
so the engine schedules it at full occupancy. Leaves out: judging (`curate.judges`).

Example: - stage: generators.responses
           params: {model: smollm2-135m-instruct, generation: {max_tokens: 128, n: 4, temperature: 0.7, top_p: 0.9}}
"""
from __future__ import annotations

import logging
import random

import pyarrow as pa
from pydantic import Field, model_validator

from curate.backends.base import ChatRequest, Completion, GenerationParams
from curate.backends.params import ModelParams, run_batched
from curate.contract import MESSAGES, RESPONSES, StageOutput, put_columns, require, with_fields
from curate.keys import row_seed
from curate.model_stage import ModelStage
from curate.registry import register

log = logging.getLogger(__name__)


class ResponsesParams(ModelParams):
    """Params of generators.responses. Example: ResponsesParams(model="smollm2-135m-instruct", generation={"max_tokens": 64})"""

    model: str | None = Field(None, description="one model: built-in name, local folder, .gguf file or Hub id")
    models: list[str] | None = Field(None, min_length=1, description="a pool of models (UltraFeedback shape)")
    models_per_prompt: int | None = Field(None, ge=1, description="models drawn from the pool per prompt (default: all)")
    generation: GenerationParams = Field(description="sampling params; max_tokens is required")
    system_prompt: str | None = Field(None, description="system message put in front of (or replacing) the prompt's")
    system_prompts: list[str] | None = Field(None, min_length=1, description="one drawn per (prompt, model)")

    @model_validator(mode="after")
    def _one_source_of_models(self) -> "ResponsesParams":
        if (self.model is None) == (self.models is None):
            raise ValueError("give exactly one of 'model' or 'models'")
        if self.models_per_prompt is not None and self.models is not None and self.models_per_prompt > len(self.models):
            raise ValueError("models_per_prompt is larger than the pool")
        if self.backend == "openai" and self.base_url is None:
            raise ValueError("the openai backend needs base_url")
        return self

    @property
    def pool(self) -> list[str]:
        return self.models if self.models is not None else [self.model]


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """Put `system` first, replacing a system message the prompt already has.

    Example: with_system([{"role": "user", "content": "hi"}], "Be brief.")[0]["role"] -> 'system'
    """
    if system is None:
        return messages
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return [{"role": "system", "content": system}] + rest


@register
class Responses(ModelStage):
    """Generate candidate responses (module docstring). Example: see the module docstring"""

    name = "generators.responses"
    Params = ResponsesParams
    uses_seed = True

    def model_refs(self) -> list[str]:
        return self.params.pool

    def pool_size(self) -> int:
        return len(self.params.pool)

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), "prompt": MESSAGES}, self.name)
        return with_fields(schema, {"responses": RESPONSES, self.error_column: pa.string()})

    # Work -----------------------------------------------------------------------------------
    def assignments(self, row_id: str) -> list[tuple[str, str | None]]:
        """The (model, system prompt) pairs that answer one row, drawn with the row's seed.

        Example: stage.assignments("r1") -> [("smollm2-135m-instruct", None)]
        """
        return [(self.params.pool[slot], system) for slot, system in self.pool_draw(row_id)]

    def pool_draw(self, row_id: str) -> list[tuple[int, str | None]]:
        """The (pool position, system prompt) pairs that answer one row, drawn with the row's seed.

        Example: stage.pool_draw("r1") -> [(0, None)]
        """
        p = self.params
        rng = random.Random(row_seed(row_id, f"{self.stage_id}:pool", self.seed))
        slots = range(len(p.pool)) if p.models_per_prompt is None else rng.sample(range(len(p.pool)), p.models_per_prompt)
        if p.system_prompts:
            return [(slot, rng.choice(p.system_prompts)) for slot in slots]
        return [(slot, p.system_prompt) for slot in slots]

    def seed_scopes(self) -> list[str]:
        """The seed scope of each pool entry: the model, plus `#k` for its k-th repeat in the pool,
        so a pool that lists one model twice samples it twice with different seeds.

        Example: stage.seed_scopes() -> ['gen:m', 'gen:m#2'] for models [m, m]
        """
        seen: dict[str, int] = {}
        scopes = []
        for model in self.params.pool:
            seen[model] = seen.get(model, 0) + 1
            scopes.append(f"{self.stage_id}:{model}" + (f"#{seen[model]}" if seen[model] > 1 else ""))
        return scopes

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        ids = table.column("id").to_pylist()
        prompts = table.column("prompt").to_pylist()
        by_model: dict[str, list[tuple[int, int, ChatRequest]]] = {}
        slots: list[int] = []
        scopes = self.seed_scopes()
        for row, (row_id, messages) in enumerate(zip(ids, prompts)):
            assigned = self.pool_draw(row_id)
            slots.append(len(assigned))
            for slot, (entry, system) in enumerate(assigned):
                model = p.pool[entry]
                seed = row_seed(row_id, scopes[entry], self.seed) % (2**31)
                request = ChatRequest(with_system(messages, system), p.generation, seed=seed)
                by_model.setdefault(model, []).append((row, slot, request))
        answers: list[list[list[Completion]]] = [[[] for _ in range(n)] for n in slots]
        for model, jobs in by_model.items():
            completions = run_batched(self.models.get(model), [job[2] for job in jobs], p.batch_size)
            for (row, slot, _), answer in zip(jobs, completions):
                answers[row][slot] = answer
        return self._assemble(table, answers)

    def _assemble(self, table: pa.Table, answers: list[list[list[Completion]]]) -> StageOutput:
        """Responses and error columns from the completions, plus counters for stats.json."""
        responses, errors = [], []
        counters = {"responses": 0, "truncated": 0, "tokens_generated": 0, "prompt_tokens": 0,
                    "failed_responses": 0, "row_errors": 0}
        for row in answers:
            kept, failed = [], []
            for completions in row:
                for c in completions:
                    if c.error is not None:
                        failed.append(c.error)
                        continue
                    kept.append({"text": c.text, "model": c.model, "finish_reason": c.finish_reason, "n_tokens": c.n_tokens})
                    counters["truncated"] += c.truncated
                    counters["tokens_generated"] += c.n_tokens
                    counters["prompt_tokens"] += c.n_prompt_tokens
            counters["responses"] += len(kept)
            counters["failed_responses"] += len(failed)
            counters["row_errors"] += bool(failed)
            responses.append(kept)
            errors.append(f"{len(failed)} of {len(kept) + len(failed)} responses failed: {failed[0]}" if failed else None)
        columns = {"responses": pa.array(responses, RESPONSES), self.error_column: pa.array(errors, pa.string())}
        return StageOutput(put_columns(table, columns), counters=counters)

