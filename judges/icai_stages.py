"""ICAI's model stages (METHODS.md §4 (c) 1, 2, 4): propose principles, embed them, vote with them.

- `judges.icai_propose`: per pair, the LLM sees the conversation, the preferred and the other
  reply (template `icai_propose`, ours, hashed into the key) and replies with JSON
  `{"principles": [...]}`: `principles` rules (3, §4 (d)), each "Select the response that ...".
  On vLLM the reply is constrained to that JSON (a regex sized to fit `max_tokens`). With
  `holdout: f` a seeded share f of the rows (drawn from the row id) is marked `icai_split = test`
  and gets no proposals: those rows are the held-out set of the evaluation (§4 (c) 6).
- `judges.icai_embed`: MiniLM sentence embeddings of each row's candidates, through the shared
  embedder cache of `filters.near_dup` (`icai_candidate_vectors`).
- `judges.icai_vote`: per pair and seed, the principles from `judges.icai_cluster`
  (`icai_principles`) are shuffled (seeded from the row id and the seed) and cut into prompts of
  at most `max_per_prompt` (40) numbered rules; each prompt shows the two replies as A and B in
  a random order (per comparison) and asks, per rule, A, B, Both or None as JSON (constrained on
  vLLM to exactly the numbers asked). Answers are mapped to the original order (for / against /
  both / abstain / invalid) and combined over `seeds` (3) by `unanimous` or `majority` voting.
Every stage keeps its raw texts and writes `<stage id>_error` for failed or unparseable rows.
Leaves out: clustering and the filter (global stages, `curate.judges.icai_fit`).

Example: - stage: judges.icai_propose
           params: {model: smollm2-135m-instruct, holdout: 0.2}
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curate.backends.base import ChatRequest, GenerationParams
from curate.backends.params import ModelParams, constrains, run_batched
from curate.contract import MESSAGES, Params, Stage, StageOutput, execution_field, put_columns, require, with_fields
from curate.filters.near_dup import DEFAULT_EMBEDDER, embed, embedder_identity, load_embedder, release_embedders
from curate.judges.icai import (
    Combine, chunks, combine_seeds, heldout, map_vote, numbered, parse_principles, parse_votes, propose_regex,
    vote_regex, vote_reply_chars,
)
from curate.judges.templates import Template, conversation_text, load_template
from curate.keys import row_coin, row_seed
from curate.model_stage import ModelStage
from curate.registry import register

STRINGS = pa.list_(pa.string())
VECTORS = pa.list_(pa.list_(pa.float32()))


def judge_request(template: Template, params: GenerationParams, seed: int, regex: str | None, **fields: str) -> ChatRequest:
    """One user turn rendered from a template, with its seed and optional output regex.

    Example: judge_request(load_template("icai_vote"), GenerationParams(max_tokens=30), 7, None, prompt="...", ...)
    """
    return ChatRequest([{"role": "user", "content": template.render(**fields)}], params, seed=seed % (2**31), guided_regex=regex)


def counters_of(completions: list) -> dict[str, int]:
    """Tokens generated, truncated responses and failed requests of a list of completions.

    Example: counters_of([c1, c2])["tokens_generated"] -> 120
    """
    return {"tokens_generated": sum(c.n_tokens for c in completions), "truncated": sum(c.truncated for c in completions),
            "request_errors": sum(c.error is not None for c in completions)}


class ProposeParams(ModelParams):
    """Params of judges.icai_propose. Example: ProposeParams(model="smollm2-135m-instruct", principles=2)"""

    model: str = Field(description="the model that proposes principles")
    template: str = Field("icai_propose", description="template with {prompt}, {preferred}, {other}, {count}")
    principles: int = Field(3, ge=1, le=10, description="principles per pair (§4 (d): 3 in the code, 2 in the paper)")
    generation: GenerationParams = Field(GenerationParams(max_tokens=256, temperature=0.0),
                                         description="sampling (greedy: inverse-cai calls its models at temperature 0)")
    constrained: bool = Field(True, description="vllm, or a vLLM server (openai): constrain the reply to the JSON with exactly `principles` rules")
    holdout: float = Field(0.0, ge=0.0, lt=1.0, description="share of rows held out for evaluation (icai_split = test)")


@register
class ICAIPropose(ModelStage):
    """Propose candidate principles per pair (module docstring). Example: - stage: judges.icai_propose"""

    name = "judges.icai_propose"
    Params = ProposeParams
    uses_seed = True

    def __init__(self, params: ProposeParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        self.template = load_template(self.params.template, required=("prompt", "preferred", "other", "count"))

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), "prompt": MESSAGES, "chosen": pa.string(), "rejected": pa.string()}, self.name)
        return with_fields(schema, {"icai_split": pa.string(), "icai_candidates": STRINGS, "icai_propose_text": pa.string(),
                                    "icai_propose_model": pa.string(), self.error_column: pa.string()})

    def request(self, row_id: str, messages: list[dict], chosen: str, rejected: str) -> ChatRequest:
        """The proposal request of one pair. Example: stage.request("r1", msgs, "Yes.", "No.")"""
        p = self.params
        regex = propose_regex(p.principles, p.generation.max_tokens) if constrains(p) else None
        return judge_request(self.template, p.generation, row_seed(row_id, self.stage_id, self.seed), regex,
                             prompt=conversation_text(messages), preferred=chosen, other=rejected, count=str(p.principles))

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        rows = list(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist(),
                        table.column("chosen").to_pylist(), table.column("rejected").to_pylist()))
        split = ["test" if heldout(r[0], p.holdout, self.seed) else "train" for r in rows]
        todo = [i for i, r in enumerate(rows) if split[i] == "train" and None not in r]
        answers = [a[0] for a in run_batched(self.models.get(p.model), [self.request(*rows[i]) for i in todo], p.batch_size)]
        candidates: list[list[str] | None] = [None] * len(rows)
        texts: list[str | None] = [None] * len(rows)
        errors: list[str | None] = [None if s == "test" else "null prompt, chosen or rejected" for s in split]
        for i, answer in zip(todo, answers):
            texts[i] = answer.text
            candidates[i] = parse_principles(answer.text)
            errors[i] = (f"request failed: {answer.error}" if answer.error else None if candidates[i]
                         else "no principle in the reply")
        counters = counters_of(answers) | {
            "rows": len(rows), "heldout_rows": split.count("test"), "proposed_rows": sum(c is not None for c in candidates),
            "candidates": sum(len(c or []) for c in candidates), "row_errors": sum(e is not None for e in errors),
            "parse_failures": sum(a.error is None and candidates[i] is None for i, a in zip(todo, answers))}
        columns = {"icai_split": pa.array(split, pa.string()), "icai_candidates": pa.array(candidates, STRINGS),
                   "icai_propose_text": pa.array(texts, pa.string()),
                   "icai_propose_model": pa.array([p.model] * len(rows), pa.string()),
                   self.error_column: pa.array(errors, pa.string())}
        return StageOutput(put_columns(table, columns), counters=counters)


class EmbedParams(Params):
    """Params of judges.icai_embed. Example: EmbedParams(model="all-minilm-l6-v2")"""

    model: str = Field(DEFAULT_EMBEDDER, description="sentence-transformers model: built-in name or local folder")
    batch_size: int = execution_field(64, ge=1, description="texts per embedding batch")
    device: str | None = execution_field(None, description="torch device of the embedder (None: auto)")


@register
class ICAIEmbed(Stage):
    """Embed each row's candidate principles (§4 (c) 2). Example: - stage: judges.icai_embed"""

    name = "judges.icai_embed"
    kind = "model"
    Params = EmbedParams

    def key_material(self) -> dict[str, Any]:
        return super().key_material() | {"model_identity": embedder_identity(self.params.model)}

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"icai_candidates": STRINGS}, self.name)
        return with_fields(schema, {"icai_candidate_vectors": VECTORS})

    def open(self) -> None:
        load_embedder(self.params.model, self.params.device)

    def close(self) -> None:
        release_embedders()

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        lists = table.column("icai_candidates").to_pylist()
        flat = [text for texts in lists for text in (texts or [])]
        vectors = embed(flat, load_embedder(self.params.model, self.params.device), self.params.batch_size)
        out, at = [], 0
        for texts in lists:
            out.append(None if texts is None else vectors[at:at + len(texts)].tolist())
            at += len(texts or [])
        return StageOutput(put_columns(table, {"icai_candidate_vectors": pa.array(out, VECTORS)}),
                           counters={"embedded": len(flat)})


class VoteParams(ModelParams):
    """Params of judges.icai_vote. Example: VoteParams(model="smollm2-135m-instruct", seeds=3, combine="majority")"""

    model: str = Field(description="the model that votes")
    template: str = Field("icai_vote", description="template with {prompt}, {response_a}, {response_b}, {principles}")
    seeds: int = Field(3, ge=1, description="re-annotations with reshuffled chunking (§4 (d): 3)")
    max_per_prompt: int = Field(40, ge=1, description="principles per voting prompt (§4 (d): 40)")
    combine: Combine = Field("unanimous", description="across seeds: unanimous (§4 (d)) or majority; else abstain")
    generation: GenerationParams = Field(GenerationParams(max_tokens=600, temperature=0.0),
                                         description="sampling; constrained replies get exactly the tokens they can need")
    constrained: bool = Field(True, description="vllm, or a vLLM server (openai): constrain the reply to the JSON with one answer per rule")
    rows: Literal["train", "all"] = Field("train", description="vote on the training rows only, or on held-out rows too")


@register
class ICAIVote(ModelStage):
    """Vote with every principle on every pair, several seeds (module docstring). Example: - stage: judges.icai_vote"""

    name = "judges.icai_vote"
    Params = VoteParams
    uses_seed = True

    def __init__(self, params: VoteParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        self.template = load_template(self.params.template, required=("prompt", "response_a", "response_b", "principles"))

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), "prompt": MESSAGES, "chosen": pa.string(), "rejected": pa.string(),
                         "icai_principles": STRINGS}, self.name)
        return with_fields(schema, {"icai_votes": STRINGS, "icai_votes_by_seed": pa.list_(STRINGS),
                                    "icai_vote_texts": STRINGS, "icai_vote_model": pa.string(), self.error_column: pa.string()})

    def plan(self, row_id: str, count: int) -> list[tuple[str, int, list[int], bool]]:
        """(scope, seed, principle indices, flipped) per prompt of one row: shuffled per seed, chunked, A/B drawn.

        `flipped` means the preferred reply is shown as B. Example: stage.plan("r1", 3) -> [("0:0", 0, [2, 0, 1], True), ...]
        """
        out = []
        for s in range(self.params.seeds):
            order = list(range(count))
            random.Random(row_seed(row_id, f"{self.stage_id}:shuffle:{s}", self.seed)).shuffle(order)
            for c, chunk in enumerate(chunks(order, self.params.max_per_prompt)):
                out.append((f"{s}:{c}", s, chunk, row_coin(row_id, f"{self.stage_id}:flip:{s}:{c}", self.seed)))
        return out

    def request(self, row_id: str, messages: list[dict], chosen: str, rejected: str, principles: list[str],
                scope: str, flipped: bool) -> ChatRequest:
        """One voting prompt (`scope` = seed:chunk): these principles, numbered, on the pair shown in this order."""
        p = self.params
        regex = vote_regex(len(principles)) if constrains(p) else None
        params = p.generation.model_copy(update={"max_tokens": vote_reply_chars(len(principles))}) if regex else p.generation
        a, b = (rejected, chosen) if flipped else (chosen, rejected)
        return judge_request(self.template, params, row_seed(row_id, f"{self.stage_id}:sample:{scope}", self.seed),
                             regex, prompt=conversation_text(messages), response_a=a, response_b=b, principles=numbered(principles))

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        rows = list(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist(), table.column("chosen").to_pylist(),
                        table.column("rejected").to_pylist(), table.column("icai_principles").to_pylist()))
        split = table.column("icai_split").to_pylist() if "icai_split" in table.column_names else ["train"] * len(rows)
        requests, owners = [], []
        for i, (row_id, messages, chosen, rejected, principles) in enumerate(rows):
            if (p.rows == "train" and split[i] == "test") or not principles or None in (messages, chosen, rejected):
                continue
            for scope, seed, chunk, flipped in self.plan(row_id, len(principles)):
                requests.append(self.request(row_id, messages, chosen, rejected, [principles[j] for j in chunk], scope, flipped))
                owners.append((i, seed, chunk, flipped))
        answers = [a[0] for a in run_batched(self.models.get(p.model), requests, p.batch_size)]
        return self._assemble(table, rows, owners, answers)

    def _assemble(self, table: pa.Table, rows: list, owners: list, answers: list) -> StageOutput:
        """Votes per seed mapped to the original order, combined over seeds, with texts, errors and counters."""
        p = self.params
        by_seed: dict[int, list[list[str]]] = {}
        texts: dict[int, list[str | None]] = {}
        errors: dict[int, list[str]] = {}
        counters: Counter = Counter(counters_of(answers), requests=len(answers), parse_failures=0)
        for (i, seed, chunk, flipped), answer in zip(owners, answers):
            seeds = by_seed.setdefault(i, [["invalid"] * len(rows[i][4]) for _ in range(p.seeds)])
            texts.setdefault(i, []).append(answer.text)
            parsed = parse_votes(answer.text if answer.error is None else None, len(chunk))
            counters["parse_failures"] += sum(v is None for v in parsed) if answer.error is None else 0
            for j, value in zip(chunk, parsed):
                seeds[seed][j] = map_vote(value, flipped)
            if answer.error is not None or all(v is None for v in parsed):
                errors.setdefault(i, []).append(f"seed {seed}: " + (f"request failed: {answer.error}" if answer.error
                                                                   else "no parseable vote"))
        combined: list[list[str] | None] = [None] * len(rows)
        for i, seeds in by_seed.items():
            combined[i] = [combine_seeds([s[j] for s in seeds], p.combine) for j in range(len(rows[i][4]))]
            counters.update(f"vote_{v}" for v in combined[i])
        counters.update(rows=len(rows), voted_rows=len(by_seed), row_errors=len(errors))
        columns = {"icai_votes": pa.array(combined, STRINGS),
                   "icai_votes_by_seed": pa.array([by_seed.get(i) for i in range(len(rows))], pa.list_(STRINGS)),
                   "icai_vote_texts": pa.array([texts.get(i) for i in range(len(rows))], STRINGS),
                   "icai_vote_model": pa.array([p.model] * len(rows), pa.string()),
                   self.error_column: pa.array(["; ".join(errors[i]) if i in errors else None for i in range(len(rows))],
                                               pa.string())}
        return StageOutput(put_columns(table, columns), counters=dict(counters))
