"""Scripted models for unit tests: the `fake` backend, so a judge or filter runs without a model.

`ScriptedBackend` answers `generate` from a reply script and `logprobs` from a table of per-token
log-probs, deterministically, and records every request it was sent. `use_scripted(stage, ...)`
makes a model stage (`curate.model_stage.ModelStage`) load its models from the `fake` backend
through the ordinary path: `LoadedModels` -> the process cache -> the backend registry, so
`open`, `close`, batching and the request log run as they do with a real engine; the stage's own
params (its `backend`, hence constrained decoding and the like) are left as written.
Leaves out: tokenizers and hidden states (give a stage that needs them a real tiny model).

Example: judge = use_scripted(SelfRewardJudge(SelfRewardParams(model="m")), ScriptedBackend("Score: 4"))
"""
from __future__ import annotations

from typing import Any, Callable, Union

import numpy as np

from curate.backends.base import ChatRequest, Completion, ScoreItem

FAKE = "fake"  # the registered name (curate.backends.registry)

Reply = Union[str, Completion, list]
Script = Union[str, Callable[[str], Reply]]

_SCRIPTED: dict[str, "ScriptedBackend"] = {}  # model reference -> the backend `fake` opens for it


class ScriptedBackend:
    """A chat and scoring backend that follows a script and records what it was asked.

    `reply`: a text for every request, or a function of the request's last message text that
    returns a text, a `Completion` (to script a failure) or a list of either (the n samples; a
    single answer is repeated `params.n` times). `logprobs`: per-token log-probs by (prompt, response),
    where the prompt is the item's rendered `prompt_text` or else its last message's content;
    `default` for any pair not listed (an unlisted pair without a default is a KeyError). Token
    counts are whitespace-separated words. `tokenizer` is exposed as the backend's tokenizer.
    Example: ScriptedBackend(lambda prompt: "Score: 5" if "good" in prompt else "Score: 1").generate(requests)
    """

    streams_requests = False

    def __init__(self, reply: Script | None = None, logprobs: dict[tuple[str, str], list[float]] | None = None,
                 default: list[float] | None = None, name: str = "scripted", tokenizer: Any = None):
        self.reply, self.table, self.default, self.name, self.tokenizer = reply, dict(logprobs or {}), default, name, tokenizer
        self.requests: list[ChatRequest] = []
        self.seen: list[ScoreItem] = []
        self.closed = False

    def _answer(self, request: ChatRequest) -> list[Completion]:
        if self.reply is None:
            raise AssertionError(f"{self.name}: no reply scripted, but generate was called")
        prompt = request.messages[-1]["content"]
        answer = self.reply(prompt) if callable(self.reply) else self.reply
        answers = answer if isinstance(answer, list) else [answer] * request.params.n
        return [a if isinstance(a, Completion) else Completion(a, "stop", len(a.split()), len(prompt.split()), self.name)
                for a in answers]

    def generate(self, requests: list[ChatRequest]) -> list[list[Completion]]:
        """The scripted completions of each request, in order. Example: backend.generate([request])[0][0].text"""
        self.requests += requests
        return [self._answer(r) for r in requests]

    def logprobs(self, items: list[ScoreItem]) -> list[np.ndarray]:
        """The scripted per-token log-probs of each item's response. Example: backend.logprobs([item])[0].sum()"""
        self.seen += items
        out = []
        for item in items:
            key = (item.prompt_text or item.messages[-1]["content"], item.response)
            values = self.table.get(key, self.default)
            if values is None:
                raise KeyError(f"{self.name}: no log-probs scripted for {key!r} and no default")
            out.append(np.array(values, dtype=np.float64))
        return out

    def close(self) -> None:
        self.closed = True


def scripted_backend(model: str, **options: Any) -> ScriptedBackend:
    """The `fake` backend's factory (`curate.backends.registry`): the backend scripted for `model`.

    Example: scripted_backend("judge") is use_scripted(stage, {"judge": backend}) and backend -> True
    """
    try:
        return _SCRIPTED[model]
    except KeyError:
        raise ValueError(f"no scripted backend for model '{model}': script it with curate.testing.use_scripted") from None


def use_scripted(stage: Any, backends: ScriptedBackend | dict[str, ScriptedBackend]) -> Any:
    """Make `stage` load its models from the `fake` backend: `backends` maps each model reference
    to its scripted backend (one backend serves every model of `stage.model_refs()`). Returns the stage.

    Example: use_scripted(CDRJudge(CDRParams(strong="s", weak="w")), {"s": strong, "w": weak}).apply(table)
    """
    from curate.backends.cache import cached, release_backend

    chosen = backends if isinstance(backends, dict) else {model: backends for model in stage.model_refs()}
    for model, backend in chosen.items():
        stale = cached(FAKE, model, **stage.models.options())
        if stale is not None and stale is not backend:
            release_backend(stale)  # an earlier test's script for the same name
        _SCRIPTED[model] = backend
    stage.models.kind = FAKE
    return stage


__all__ = ["FAKE", "ScriptedBackend", "scripted_backend", "use_scripted"]
