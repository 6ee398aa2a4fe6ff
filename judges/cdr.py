"""The stage `judges.cdr`: the Customizable Density Ratio reward, strong over weak log-probs (METHODS.md §2).

For every response, `r(x, y) = Σ_{t∈y} log π_strong − Σ_{t∈y} log π_weak` (raw sums, the paper's
default), or with `normalize: mean` the per-token means of each model, `LPn_strong − LPn_weak`
(equal to `r/|y|` when the models share a tokenizer; with two tokenizers each model averages over
its own tokens). Steps (§2 (c)):
1. *Route* (optional, `router: <model>`): the router reads the conversation (template
   `cdr_router`, hashed into the key) and answers `[START]DOMAIN[END]` with DOMAIN one of SAFETY,
   REASONING, CHAT, greedy; with vLLM the answer is constrained to that form. An unparseable
   answer is CHAT (counted as `router_unparsed`). A non-null `cdr_domain` in the input is kept
   and not routed again; with no router and no input domain every row is CHAT.
2. *Customise* (`customize: criteria | exemplars | both`, default none): the domain's criteria
   text replaces the system message (or is inserted as one), and/or one exemplar block drawn
   from the domain's pool (seeded per row) is put before the last user turn, ending by re-asking
   the query and the cue `Good Assistant:`. `customize_chat: false` is the paper's
   "vanilla_domain" mode: CHAT prompts stay as they are. The texts come from
   `customization` (built-in `cdr`, i.e. judges/templates/cdr_customization.yaml, or your YAML
   file with the same keys); their content is hashed into the stage key.
3. *Score one text with both models*: the customised prompt is rendered once with the strong
   model's chat template; each model tokenises that text with its own tokenizer (the response
   span starts at the prompt's length in that tokenizer) and scores the response plus its own
   end-of-turn token (§0), through vLLM prompt log-probs or transformers.
Input: candidate rows (`responses`) give `cdr_rewards` (list, nulls for responses that could not
be scored); pair them with `pairs.from_scores` (`scores: cdr_rewards, mode: best_random`: chosen
= the best, rejected drawn uniformly from the others with a seeded draw, rows with max == min or
identical texts dropped with a reason). Pair rows (`chosen`/`rejected`, e.g. HH) give
`cdr_reward_chosen`, `cdr_reward_rejected`, `cdr_margin` (chosen − rejected) and `cdr_agrees`
(margin > 0; null on a tie), and stats.json counts `agree_with_label` / `disagree_with_label`;
`action: relabel` swaps the pairs CDR reverses and drops ties and unscored rows with a reason.
Also `cdr_logprobs` (per response, in the input order, `[strong, weak]` log-probs summed or
averaged as the reward: the raw output behind every reward), `cdr_domain`, `cdr_router_text`
(raw router output), `cdr_strong_model`, `cdr_weak_model`, and the error column (a response
too long for a model, or a failed score).
Caveat (§2 (g)): strong and weak should share a tokenizer and chat template; with two tokenizers
the weak model reads the strong model's chat markup as plain text.

Example: density_ratio([-1.0, -2.0], [-1.5, -3.0]) -> 1.5
"""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.backends.base import ChatRequest, GenerationParams, ScoreItem, render_prompt
from curate.backends.params import ModelParams, logprob_dtype_field, run_batched
from curate.backends.scoring import as_messages, response_tokens, sequence_logprobs
from curate.contract import RESPONSES, StageOutput, put_columns, require, with_fields, with_reason
from curate.errors import ConfigError, SchemaError
from curate.judges.templates import BUILTIN_DIR, conversation_text, load_template, read_yaml
from curate.keys import canonical_json, digest, row_seed
from curate.model_stage import ModelStage
from curate.pairing import swap_pairs
from curate.registry import register

DOMAINS = ("SAFETY", "REASONING", "CHAT")
ROUTER_ANSWER = re.compile(r"\[START\]\s*(SAFETY|REASONING|CHAT)\s*\[END\]", re.IGNORECASE)
ROUTER_REGEX = r"\[START\](SAFETY|REASONING|CHAT)\[END\]"
LOGPROB_PAIRS = pa.list_(pa.list_(pa.float64()))  # per response: [strong log-prob, weak log-prob]


def sequence_score(logprobs: np.ndarray | list[float], normalize: Literal["sum", "mean"] = "sum") -> float:
    """A response's log-prob under one model: the sum over its tokens, or their mean (LPn, §0).

    Example: sequence_score([-1, -2]) -> -3.0; sequence_score([-1, -2], "mean") -> -1.5
    """
    values = np.asarray(logprobs, dtype=np.float64)
    return float(values.mean() if normalize == "mean" else values.sum())


def density_ratio(strong: np.ndarray | list[float], weak: np.ndarray | list[float],
                  normalize: Literal["sum", "mean"] = "sum") -> float:
    """CDR reward of one response from the per-token log-probs of each model (§2 (c) step 3).

    Example: density_ratio([-1, -2], [-1.5, -3]) -> 1.5; with normalize="mean" -> 0.75
    """
    return sequence_score(strong, normalize) - sequence_score(weak, normalize)


def parse_domain(text: str | None) -> str | None:
    """The domain in a router answer `[START]DOMAIN[END]`, or None (the caller defaults to CHAT).

    Example: parse_domain("[START]REASONING[END]") -> 'REASONING'
    """
    match = ROUTER_ANSWER.search(text or "")
    return match.group(1).upper() if match else None


def exemplar_text(block: list[dict[str, str]], query: str) -> str:
    """One exemplar block before the real query, ending with the cue `Good Assistant:` (§2 step 2).

    Example: exemplar_text([{"query": "q", "good": "g", "bad": "b", "why": "w"}], "hi").endswith("Good Assistant:")
    """
    shots = "\n\n".join(f"User: {e['query']}\nGood Assistant: {e['good']}\nBad Assistant: {e['bad']}\n"
                        f"Why the bad answer is worse: {e['why']}" for e in block)
    return (f"Examples of a good and a bad assistant answer:\n\n{shots}\n\n"
            f"Now the real question.\nUser: {query}\nGood Assistant:")


def customize(messages: list[dict[str, str]], criteria: str | None = None,
              block: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """The prompt with the criteria as system message and/or the exemplar block in the last user turn.

    Example: customize([{"role": "user", "content": "hi"}], criteria="Be kind.")[0] -> {'role': 'system', ...}
    """
    out = [dict(m) for m in messages]
    if criteria is not None:
        if out and out[0]["role"] == "system":
            out[0]["content"] = criteria
        else:
            out.insert(0, {"role": "system", "content": criteria})
    if block:
        last = max((i for i, m in enumerate(out) if m["role"] == "user"), default=None)
        if last is not None:
            out[last]["content"] = exemplar_text(block, out[last]["content"])
    return out


def load_customization(name_or_path: str) -> dict[str, Any]:
    """Criteria texts and exemplar pools per domain from a YAML file (built-in `cdr`), validated.

    Example: load_customization("cdr")["criteria"]["CHAT"][:20]
    """
    path = name_or_path if name_or_path.endswith((".yaml", ".yml")) else \
        f"{BUILTIN_DIR}/{name_or_path}_customization.yaml"
    data = read_yaml(path, "no such CDR customization file (built-in: cdr)", name_or_path) or {}
    criteria, exemplars = data.get("criteria") or {}, data.get("exemplars") or {}
    unknown = sorted((set(criteria) | set(exemplars)) - set(DOMAINS))
    if unknown:
        raise ConfigError(f"unknown domains {unknown}; expected {list(DOMAINS)}", where=path)
    for domain, pool in exemplars.items():
        for b, block in enumerate(pool or []):
            for e, example in enumerate(block or []):
                missing = [k for k in ("query", "good", "bad", "why") if k not in (example or {})]
                if missing:
                    raise ConfigError(f"exemplars.{domain}[{b}][{e}] lacks {missing}", where=path)
    return {"criteria": criteria, "exemplars": exemplars}


class CDRParams(ModelParams):
    """Params of judges.cdr. Example: CDRParams(strong="smollm2-135m-instruct", weak="gemma3-270m")"""

    strong: str = Field(description="the better-aligned model (numerator)")
    weak: str = Field(description="the less-aligned model (denominator)")
    dtype: str = logprob_dtype_field()
    normalize: Literal["sum", "mean"] = Field("sum", description="sum: raw log-prob sums (§2 default); mean: per-token means")
    customize: Literal["none", "criteria", "exemplars", "both"] = Field("none", description="prompt customisation (§2 step 2)")
    customization: str = Field("cdr", description="built-in name or a YAML file with criteria / exemplars per domain")
    customize_chat: bool = Field(True, description="false = vanilla_domain: CHAT prompts stay uncustomised")
    router: str | None = Field(None, description="model that routes prompts to SAFETY / REASONING / CHAT (None: input or CHAT)")
    router_template: str = Field("cdr_router", description="router prompt template with {prompt}")
    input: Literal["auto", "candidates", "pairs"] = Field("auto", description="candidates (responses) or pairs (chosen/rejected); auto: by the columns present")
    responses: str = Field("responses", description="candidate column")
    action: Literal["mark", "relabel"] = Field("mark", description="pair rows: mark adds columns; relabel swaps reversed pairs, drops ties")

    @model_validator(mode="after")
    def _scoring_backend(self) -> "CDRParams":
        if self.backend == "openai":
            raise ValueError("judges.cdr needs prompt log-probs: use backend vllm or transformers")
        return self


@register
class CDRJudge(ModelStage):
    """Density-ratio reward of strong over weak (module docstring). Example: - stage: judges.cdr"""

    name = "judges.cdr"
    Params = CDRParams
    uses_seed = True

    def __init__(self, params: CDRParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        p = self.params
        self.texts = load_customization(p.customization) if p.customize != "none" else {"criteria": {}, "exemplars": {}}
        self.router_template = load_template(p.router_template, required=("prompt",)) if p.router else None

    def model_refs(self) -> list[str]:
        """The models this stage loads: strong, weak and the router if any. Example: stage.model_refs()"""
        p = self.params
        return [p.strong, p.weak] + ([p.router] if p.router else [])

    def key_texts(self) -> dict[str, Any]:
        return super().key_texts() | {
            "customization_hash": digest(canonical_json(self.texts)) if self.params.customize != "none" else None,
            "router_template_hash": self.router_template.hash if self.router_template else None,
        }

    def mode(self, schema: pa.Schema) -> str:
        """`candidates` or `pairs` for this input. Example: stage.mode(schema) -> 'pairs'"""
        if self.params.input != "auto":
            return self.params.input
        return "candidates" if self.params.responses in schema.names else "pairs"

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        p = self.params
        require(schema, {"id": pa.string()}, self.name)
        if "prompt" not in schema.names:
            raise SchemaError("needs column 'prompt'", where=f"stage '{self.name}'")
        fields: dict[str, pa.DataType] = {"cdr_domain": pa.string(), "cdr_router_text": pa.string(),
                                          "cdr_logprobs": LOGPROB_PAIRS}
        if self.mode(schema) == "candidates":
            require(schema, {p.responses: RESPONSES}, self.name)
            fields["cdr_rewards"] = pa.list_(pa.float64())
        else:
            require(schema, {"chosen": pa.string(), "rejected": pa.string()}, self.name)
            fields |= {"cdr_reward_chosen": pa.float64(), "cdr_reward_rejected": pa.float64(),
                       "cdr_margin": pa.float64(), "cdr_agrees": pa.bool_()}
        fields |= {"cdr_strong_model": pa.string(), "cdr_weak_model": pa.string(), self.error_column: pa.string()}
        return with_fields(schema, fields)

    # Steps 1 and 2 ------------------------------------------------------------------------
    def domains(self, table: pa.Table, prompts: list) -> tuple[list[str], list[str | None], Counter]:
        """Domain per row: the input's `cdr_domain`, else the router's answer, else CHAT."""
        p = self.params
        given = table.column("cdr_domain").to_pylist() if "cdr_domain" in table.column_names else [None] * len(prompts)
        domains = [d.upper() if isinstance(d, str) and d.upper() in DOMAINS else None for d in given]
        texts: list[str | None] = [None] * len(prompts)
        counters: Counter = Counter()
        todo = [i for i, d in enumerate(domains) if d is None and prompts[i] is not None]
        if p.router and todo:
            regex = ROUTER_REGEX if p.backend == "vllm" else None
            ids = table.column("id").to_pylist()
            requests = [ChatRequest([{"role": "user", "content": self.router_template.render(prompt=conversation_text(prompts[i]))}],
                                    GenerationParams(max_tokens=16, temperature=0.0),
                                    seed=row_seed(ids[i], f"{self.stage_id}:router", self.seed) % (2**31), guided_regex=regex)
                        for i in todo]
            for i, answer in zip(todo, run_batched(self.models.get(p.router), requests, p.batch_size)):
                texts[i] = answer[0].text
                domains[i] = parse_domain(texts[i])
                counters["router_unparsed"] += domains[i] is None
        return [d or "CHAT" for d in domains], texts, counters

    def prompt_text(self, row_id: str, messages: list[dict[str, str]], domain: str, tokenizer: Any) -> str:
        """The customised prompt rendered once with the strong model's chat template (§2 steps 2-3)."""
        p = self.params
        if p.customize == "none" or (domain == "CHAT" and not p.customize_chat):
            return render_prompt(tokenizer, messages)
        criteria = self.texts["criteria"].get(domain) if p.customize in ("criteria", "both") else None
        block = None
        pool = self.texts["exemplars"].get(domain) or []
        if p.customize in ("exemplars", "both") and pool:
            block = pool[random.Random(row_seed(row_id, f"{self.stage_id}:exemplar", self.seed)).randrange(len(pool))]
        return render_prompt(tokenizer, customize(messages, criteria, block))

    # Step 3 -------------------------------------------------------------------------------
    def logprobs(self, items: list[ScoreItem]) -> tuple[list[list[float] | None], list[str | None], int]:
        """Per item its [strong, weak] log-prob (summed or averaged per `normalize`; None with the reason
        where a model could not score it), and the strong model's tokens scored."""
        p = self.params
        errors: list[str | None] = [None] * len(items)
        for model in (p.strong, p.weak):
            _, too_long = response_tokens(self.models.get(model), items)
            errors = [e or t for e, t in zip(errors, too_long)]
        keep = [k for k, e in enumerate(errors) if e is None]
        per_model = [sequence_logprobs(self.models.get(m), [items[k] for k in keep], p.batch_size) for m in (p.strong, p.weak)]
        parts: list[list[float] | None] = [None] * len(items)
        for k, strong, weak in zip(keep, *per_model):
            parts[k] = [sequence_score(strong, p.normalize), sequence_score(weak, p.normalize)]
        return parts, errors, sum(len(s) for s in per_model[0])

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        ids = table.column("id").to_pylist()
        prompts = [as_messages(v) for v in table.column("prompt").to_pylist()]
        domains, router_texts, counters = self.domains(table, prompts)
        tokenizer = self.models.get(p.strong).tokenizer
        candidates = self.mode(table.schema) == "candidates"
        if candidates:
            texts = [[(c or {}).get("text") for c in (r or [])] for r in table.column(p.responses).to_pylist()]
        else:
            texts = [list(pair) for pair in zip(table.column("chosen").to_pylist(), table.column("rejected").to_pylist())]
        items, owners = [], []
        for row, (row_id, messages, domain) in enumerate(zip(ids, prompts, domains)):
            if messages is None:
                continue
            prompt_text = self.prompt_text(row_id, messages, domain, tokenizer)
            for j, text in enumerate(texts[row]):
                if text is not None:
                    items.append(ScoreItem(messages, text, prompt_text=prompt_text))
                    owners.append((row, j))
        item_parts, item_errors, tokens = self.logprobs(items)
        rewards: list[list[float | None]] = [[None] * len(t) for t in texts]
        parts: list[list[list[float] | None]] = [[None] * len(t) for t in texts]
        errors: list[list[str]] = [[] for _ in texts]
        for (row, j), part, error in zip(owners, item_parts, item_errors):
            parts[row][j] = part
            rewards[row][j] = None if part is None else part[0] - part[1]  # §2: strong − weak
            if error:
                errors[row].append(f"response {j}: {error}")
        for row, messages in enumerate(prompts):
            if messages is None:
                errors[row].append("null prompt")
            errors[row] += [f"response {j}: null text" for j, t in enumerate(texts[row]) if t is None]
        counters.update({f"domain_{d}": n for d, n in Counter(domains).items()})
        counters.update(rows=table.num_rows, responses_scored=sum(v is not None for v in item_parts),
                        tokens_scored_strong=tokens, row_errors=sum(bool(e) for e in errors))
        columns: dict[str, pa.Array] = {
            "cdr_domain": pa.array(domains, pa.string()),
            "cdr_router_text": pa.array(router_texts, pa.string()),
            "cdr_logprobs": pa.array(parts, LOGPROB_PAIRS),
            "cdr_strong_model": pa.array([p.strong] * table.num_rows, pa.string()),
            "cdr_weak_model": pa.array([p.weak] * table.num_rows, pa.string()),
            self.error_column: pa.array(["; ".join(e) if e else None for e in errors], pa.string()),
        }
        if candidates:
            columns["cdr_rewards"] = pa.array(rewards, pa.list_(pa.float64()))
            return StageOutput(put_columns(table, columns), counters=dict(counters))
        return self._pairs(table, columns, rewards, counters)

    def _pairs(self, table: pa.Table, columns: dict[str, pa.Array], rewards: list, counters: Counter) -> StageOutput:
        """Pair-row columns, agreement with the label, and (relabel) swapped / dropped rows."""
        chosen = [r[0] for r in rewards]
        rejected = [r[1] for r in rewards]
        margin = [None if c is None or r is None else c - r for c, r in zip(chosen, rejected)]
        agrees = [None if m is None or m == 0 else m > 0 for m in margin]
        counters.update(agree_with_label=sum(a is True for a in agrees), disagree_with_label=sum(a is False for a in agrees),
                        ties=sum(m == 0 for m in margin if m is not None))
        columns |= {"cdr_reward_chosen": pa.array(chosen, pa.float64()), "cdr_reward_rejected": pa.array(rejected, pa.float64()),
                    "cdr_margin": pa.array(margin, pa.float64()), "cdr_agrees": pa.array(agrees, pa.bool_())}
        out = put_columns(table, columns)
        if self.params.action == "mark":
            return StageOutput(out, counters=dict(counters))
        flip = pc.fill_null(pc.invert(out.column("cdr_agrees")), False)
        out = swap_pairs(out, flip)  # chosen/rejected and every *_chosen/*_rejected column; cdr_margin negated
        drop = pc.is_null(out.column("cdr_agrees"))
        reasons = pc.if_else(pc.is_null(out.column("cdr_margin")), pa.scalar("cdr_unscored"), pa.scalar("cdr_tie"))
        counters["relabelled"] = int(pc.sum(flip).as_py() or 0)
        dropped = with_reason(out.filter(drop), reasons.filter(drop))
        return StageOutput(out.filter(pc.invert(drop)), dropped if dropped.num_rows else None, dict(counters))
