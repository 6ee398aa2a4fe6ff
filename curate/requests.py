"""The request-level cache: finished generation requests of an unfinished part survive a crash.

Why this and not an engine kept fed across part boundaries: with it the default part size
(10,000 rows, one engine call per part) is safe to resume, so nobody needs small parts, and
small parts are what makes an engine drain its batch at every boundary. A task appends every
finished request to `parts/<segment key>/requests/part-NNNNN.jsonl` as the engine finishes it
(vLLM streams them; other backends when their call returns), keyed by the request's content:
backend identity, messages, sampling params, seed and constrained-output spec. A task retried
after a kill reads the log and sends the engine only what is missing; the driver deletes the log
once the part is committed. Lines are flushed to the OS, not fsynced: they survive the process
being killed, and a line cut short by a crash is ignored. Leaves out: scoring calls (log-probs,
hidden states), which are cheap next to generation and are recomputed.

Example: with using_request_log(log.scope(stage_key)): run_batched(backend, requests, None)
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
from dataclasses import asdict
from typing import Any, Iterator

from curate.backends.base import ChatRequest, Completion
from curate.keys import canonical_json, digest

log = logging.getLogger(__name__)

_CURRENT: contextvars.ContextVar["RequestScope | None"] = contextvars.ContextVar("curate_request_scope", default=None)


def request_key(backend: Any, request: ChatRequest) -> str:
    """Content key of one request on one backend. Example: request_key(backend, req) -> 20 hex chars"""
    return digest(canonical_json({
        "model": getattr(backend, "identity", None) or getattr(backend, "name", type(backend).__name__),
        "messages": request.messages,
        "params": request.params.model_dump(mode="json"),
        "seed": request.seed,
        "choice": request.guided_choice,
        "regex": request.guided_regex,
    }))


class RequestLog:
    """The finished requests of one part, read at start and appended to as requests finish.

    Example: log = RequestLog("out/q/parts/ab/requests/part-00000.jsonl"); log.scope("cd").lookup(b, reqs)
    """

    def __init__(self, path: str):
        self.path = path
        self.done: dict[tuple[str, str], list[Completion]] = {}
        self._file: Any = None
        self._scopes: dict[str, RequestScope] = {}
        self._read()

    def _read(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self.done[(entry["stage"], entry["key"])] = [Completion(**c) for c in entry["completions"]]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short by a crash
        except FileNotFoundError:
            pass
        if self.done:
            log.info("resuming with %d finished requests from %s", len(self.done), self.path)

    def append(self, stage_key: str, key: str, completions: list[Completion]) -> None:
        """Record one finished request. Example: log.append("cd", key, completions)"""
        self.done[(stage_key, key)] = completions
        if self._file is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        entry = {"stage": stage_key, "key": key, "completions": [asdict(c) for c in completions]}
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def scope(self, stage_key: str) -> "RequestScope":
        """The view of one stage. Example: log.scope(planned.key)"""
        if stage_key not in self._scopes:
            self._scopes[stage_key] = RequestScope(self, stage_key)
        return self._scopes[stage_key]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class RequestScope:
    """One stage's finished requests: lookups, appends and the counts that go to stats.json.

    Example: cached = scope.lookup(backend, requests)  # None where the engine must run
    """

    def __init__(self, log_: RequestLog, stage_key: str):
        self.log = log_
        self.stage_key = stage_key
        self.reused = 0
        self.run = 0

    def lookup(self, backend: Any, requests: list[ChatRequest]) -> list[list[Completion] | None]:
        found = [self.log.done.get((self.stage_key, request_key(backend, r))) for r in requests]
        hits = sum(f is not None for f in found)
        self.reused += hits
        self.run += len(requests) - hits
        return found

    def put(self, backend: Any, request: ChatRequest, completions: list[Completion]) -> None:
        self.log.append(self.stage_key, request_key(backend, request), completions)

    def counters(self) -> dict[str, int]:
        """`requests_run` (sent to the engine) and `requests_reused` (from a killed attempt's log)."""
        return {"requests_run": self.run, "requests_reused": self.reused} if self.run or self.reused else {}


@contextlib.contextmanager
def using_request_log(scope: RequestScope | None) -> Iterator[None]:
    """Make `scope` the request cache of generation calls in this context. Example: see the module docstring"""
    token = _CURRENT.set(scope)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_scope() -> RequestScope | None:
    """The request cache of the running stage, or None outside a task. Example: current_scope()"""
    return _CURRENT.get()
