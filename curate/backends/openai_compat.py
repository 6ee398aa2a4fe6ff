"""Any OpenAI-compatible chat server (vLLM serve, TGI, llama.cpp server, hosted APIs) as a backend.

Async inside: at most `max_concurrency` requests in flight; each response of a prompt is its own
request (n=1, seed + j), so token counts and seeds are exact per response. Retries with
exponential backoff and jitter on 429, 5xx, timeouts, connection errors and malformed JSON,
honouring `Retry-After` (seconds or an HTTP date). A request that still fails becomes a row
error (`Completion.error`); a run never aborts on one. A guided choice or regex goes out as
vLLM's `structured_outputs` field (what `vllm serve` 0.32 reads in a chat completion); a server
that refuses the field (HTTP 400 naming it: hosted APIs) gets the request again without it, and
a warning says so once. Leaves out: streaming and log-probs.

Example: OpenAIBackend("my-model", base_url="http://127.0.0.1:8000/v1").generate([req])
"""
from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from curate.backends.base import ChatRequest, Completion

log = logging.getLogger(__name__)

OnDone = Callable[[int, list[Completion]], None]

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or HTTP date), or None.

    Example: retry_after_seconds("2") -> 2.0
    """
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class OpenAIBackend:
    """Chat completions over HTTP with bounded concurrency and retries (module docstring).

    Example: OpenAIBackend("m", base_url="http://127.0.0.1:8000/v1", max_retries=3)
    """

    def __init__(self, model: str, base_url: str = "http://127.0.0.1:8000/v1", api_key_env: str | None = "OPENAI_API_KEY",
                 max_concurrency: int = 16, timeout: float = 60.0, max_retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 30.0):
        from curate.redaction import redact_url

        self.name = model
        self.identity = f"{model}@{redact_url(base_url)}"  # credentials in the URL never reach keys, logs or errors
        parts = urlsplit(base_url)  # a query (`?api-version=`, `?key=`) stays after the path
        self.url = urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))
        key = os.environ.get(api_key_env) if api_key_env else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.structured_refused = False  # the server answered 400 to `structured_outputs`: sent without it since

    def _body(self, request: ChatRequest, index: int) -> dict[str, Any]:
        p = request.params
        body: dict[str, Any] = {"model": self.name, "messages": request.messages, "max_tokens": p.max_tokens,
                                "temperature": p.temperature, "top_p": p.top_p, "n": 1}
        if request.seed is not None:
            body["seed"] = (request.seed + index) % (2**63)
        if p.stop:
            body["stop"] = list(p.stop)
        if p.top_k:
            body["top_k"] = p.top_k
        if request.guided_choice:
            body["structured_outputs"] = {"choice": list(request.guided_choice)}
        elif request.guided_regex:
            body["structured_outputs"] = {"regex": request.guided_regex}
        return body

    def _refuses_structure(self, body: dict[str, Any], status: int, text: str) -> bool:
        """A 400 that names `structured_outputs`: the server does not take it; drop it from now on (warned once)."""
        if status != 400 or "structured_outputs" not in body or "structured_outputs" not in text:
            return False
        if not self.structured_refused:
            log.warning("%s does not accept structured_outputs (HTTP 400); judge outputs are unconstrained", self.url)
        self.structured_refused = True
        return True

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        return min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)

    async def _one(self, client: Any, gate: asyncio.Semaphore, body: dict[str, Any]) -> Completion:
        """One completion, retried; errors become Completion.error."""
        import httpx

        error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            if self.structured_refused:
                body = {k: v for k, v in body.items() if k != "structured_outputs"}
            async with gate:
                try:
                    response = await client.post(self.url, json=body, headers=self.headers, timeout=self.timeout)
                    if response.status_code == 200:
                        data = response.json()
                        choice = data["choices"][0]
                        usage = data.get("usage") or {}
                        if not isinstance(choice["message"]["content"], str):  # never a silent null response
                            raise TypeError(f"the message content is {type(choice['message']['content']).__name__}, not text")
                        return Completion(choice["message"]["content"], choice.get("finish_reason"),
                                          int(usage.get("completion_tokens", 0)), int(usage.get("prompt_tokens", 0)),
                                          self.name)
                    error = f"HTTP {response.status_code}: {response.text[:200]}"
                    if self._refuses_structure(body, response.status_code, response.text):
                        continue
                    if response.status_code not in RETRY_STATUS:
                        break
                    retry_after = retry_after_seconds(response.headers.get("retry-after"))
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    error = f"malformed response: {type(exc).__name__}: {exc}"
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                log.debug("retrying in %.2fs after %s", delay, error)  # the CLI's log handler redacts secrets
                await asyncio.sleep(delay)
        from curate.redaction import redact

        return Completion(None, None, 0, 0, self.name, redact(f"after {self.max_retries + 1} attempts: {error}"))

    async def _all(self, requests: list[ChatRequest], on_done: OnDone | None) -> list[list[Completion]]:
        import httpx

        gate = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(max_connections=self.max_concurrency)
        async with httpx.AsyncClient(limits=limits) as client:

            async def answer(i: int, request: ChatRequest) -> list[Completion]:
                row = list(await asyncio.gather(*[self._one(client, gate, self._body(request, j))
                                                  for j in range(request.params.n)]))
                if on_done is not None:
                    on_done(i, row)
                return row

            return list(await asyncio.gather(*[answer(i, r) for i, r in enumerate(requests)]))

    streams_requests = True  # generate calls `on_done` as each request's completions are all back

    def generate(self, requests: list[ChatRequest], on_done: OnDone | None = None) -> list[list[Completion]]:
        """Answer every request; never raises for a failed request (it is a row error).

        `on_done(i, completions)` is called as request i's n completions are all back.
        Example: backend.generate([req])[0][0].error -> None or 'after 6 attempts: HTTP 500 ...'
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._all(requests, on_done))
        result: list[list[list[Completion]]] = []  # called from inside an event loop: use a thread
        thread = threading.Thread(target=lambda: result.append(asyncio.run(self._all(requests, on_done))))
        thread.start()
        thread.join()
        return result[0]

    def close(self) -> None:
        """Nothing to free (connections close per batch). Example: backend.close()"""

    def __enter__(self) -> "OpenAIBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
