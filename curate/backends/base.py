"""Requests, completions, generation params, the token layout of scoring, and the backend cache.

The token layout is defined once here so that every backend scores the same ids (METHODS.md §0):
the prompt rendered with the model's chat template including the generation prompt gives `P`;
the response tokenised without special tokens, plus the end-of-turn token, gives `R`; the
sequence is the concatenation of the *token ids* `P + R` (never a re-tokenised joined string).
Leaves out: the engines themselves (`curate.backends.vllm_engine`, `.hf`, `.openai_compat`).

Example: encode_pair(tokenizer, [{"role": "user", "content": "hi"}], "hello") -> ([...ids], start)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)


class GenerationParams(BaseModel):
    """How to sample; `max_tokens` is required because vLLM silently defaults to 16.

    Example: GenerationParams(max_tokens=256, temperature=0.7, top_p=0.9, n=4)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_tokens: int = Field(ge=1, description="most new tokens per response; responses cut here are counted")
    n: int = Field(1, ge=1, description="responses per prompt (per model in a pool)")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely tokens (None = all)")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens below min_p x the top probability")
    repetition_penalty: float = Field(1.0, gt=0.0, description="1.0 = none")
    stop: tuple[str, ...] = Field((), description="stop strings (not included in the text)")

    @model_validator(mode="after")
    def _greedy_means_one(self) -> "GenerationParams":
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n is {self.n} with temperature 0: greedy decoding gives {self.n} identical "
                             "responses (and vLLM refuses it); set temperature > 0 or n: 1")
        return self


@dataclass(frozen=True)
class ChatRequest:
    """One prompt to answer: messages, params and the seed of this row (hashed from its id).

    Example: ChatRequest([{"role": "user", "content": "hi"}], GenerationParams(max_tokens=8), seed=7)
    """

    messages: list[dict[str, str]]
    params: GenerationParams
    seed: int | None = None
    guided_choice: list[str] | None = None
    guided_regex: str | None = None


@dataclass
class Completion:
    """One generated response, or the error that stopped it (then `text` is None).

    Example: Completion("Paris.", "stop", 3, 20, "smollm2-135m-instruct")
    """

    text: str | None
    finish_reason: str | None
    n_tokens: int
    n_prompt_tokens: int
    model: str
    error: str | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True)
class ScoreItem:
    """A (prompt, response text) pair to score: prompt messages, or an already rendered prompt text.

    `prompt_text`, when given, replaces the messages: each model tokenises that one text with its
    own tokenizer (CDR scores one formatted text with two models, METHODS.md §2 step 3).
    Example: ScoreItem([{"role": "user", "content": "Capital of France?"}], "Paris.")
    """

    messages: list[dict[str, str]]
    response: str
    prompt_text: str | None = None


class ChatBackend(Protocol):
    """Batch in, batch out generation. Example: backend.generate(requests)[0][0].text"""

    name: str

    def generate(self, requests: list[ChatRequest]) -> list[list[Completion]]: ...

    def close(self) -> None: ...


# Token layout (METHODS.md §0) -----------------------------------------------------------------


def plain_prompt_text(messages: list[dict[str, str]]) -> str:
    """The prompt of a model without a chat template: `role: content` blocks, then `assistant:`.

    Example: plain_prompt_text([{"role": "user", "content": "hi"}]) -> 'user: hi\n\nassistant:'
    """
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt as text: the chat template with the generation prompt (plain text if none).

    Example: render_prompt(smollm2_tok, [{"role": "user", "content": "hi"}]) -> '<|im_start|>system...'
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return plain_prompt_text(messages)


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Prompt token ids: the chat template with the generation prompt (plain text if no template).

    Example: encode_prompt(tok, [{"role": "user", "content": "hi"}]) -> [1, 9690, ...]
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return encode_prompt_text(tokenizer, plain_prompt_text(messages))


def encode_prompt_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt text with the tokenizer's own leading special tokens (BOS),
    never doubled when the text already starts with them.

    Example: encode_prompt_text(gemma_tok, "<|im_start|>user\nhi<|im_end|>\n") -> [2, ...]
    """
    ids = [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


TURN_MARK = "CURATEENDOFTURNPROBE"  # an assistant reply no template rewrites, to find what follows it


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn, read from the chat template: the first token the
    template puts after an assistant reply when that token is a special token (`<|im_end|>` for
    ChatML, `<end_of_turn>` for Gemma, `<|eot_id|>` for Llama 3); the tokenizer's EOS otherwise
    (no template, or a template that ends a turn with plain text). Computed once per tokenizer.

    Example: end_of_turn_id(smollm2_tokenizer) -> 2; end_of_turn_id(gemma_it_tokenizer) -> 106
    """
    cached = getattr(tokenizer, "_curate_end_of_turn", None)
    if cached is not None:
        return cached
    found = _template_end_of_turn(tokenizer)
    if found is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-turn token in its chat template and no EOS token")
        found = int(tokenizer.eos_token_id)
    try:
        tokenizer._curate_end_of_turn = found
    except AttributeError:  # pragma: no cover - a tokenizer that refuses attributes: computed each time
        pass
    return found


def _template_end_of_turn(tokenizer: Any) -> int | None:
    """The special token right after an assistant reply in the chat template, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": TURN_MARK}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception as exc:  # a template that refuses this conversation: fall back to EOS
        log.debug("chat template could not render a probe turn (%s); end of turn = EOS", exc)
        return None
    if TURN_MARK not in text:
        return None
    after = text[text.rindex(TURN_MARK) + len(TURN_MARK):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}}
    return int(ids[0]) if ids and int(ids[0]) in special else None


def encode_pair(tokenizer: Any, messages: list[dict[str, str]], response: str) -> tuple[list[int], int]:
    """`P + R` token ids and the index where R starts (METHODS.md §0).

    Example: ids, start = encode_pair(tok, msgs, "Paris."); ids[start:] -> response ids + [eos]
    """
    return _with_response(tokenizer, encode_prompt(tokenizer, messages), response)


def encode_item(tokenizer: Any, item: ScoreItem) -> tuple[list[int], int]:
    """`encode_pair` of a ScoreItem, from its rendered `prompt_text` when it has one.

    Example: ids, start = encode_item(tok, ScoreItem([], "Paris.", prompt_text="Q: capital?\nA:"))
    """
    if item.prompt_text is None:
        return encode_pair(tokenizer, item.messages, item.response)
    return _with_response(tokenizer, encode_prompt_text(tokenizer, item.prompt_text), item.response)


def _with_response(tokenizer: Any, prompt: list[int], response: str) -> tuple[list[int], int]:
    reply = [int(i) for i in tokenizer(response, add_special_tokens=False)["input_ids"]]
    return prompt + reply + [end_of_turn_id(tokenizer)], len(prompt)


# One model per process -------------------------------------------------------------------------

# The process-level model cache lives in curate.backends.cache; these names stay importable here.
from curate.backends.cache import close_backends, open_backend, release_backend, return_freed_memory  # noqa: E402,F401
