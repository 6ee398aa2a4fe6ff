"""A scripted OpenAI-compatible chat server on 127.0.0.1 for end-to-end runs over the `openai` backend.

Answers every request deterministically (a generation echoes its prompt and seed; a judge prompt,
one that asks for `Score:`, gets a score hashed from its text). `faults(prompt, attempt)` picks a
fault for one call: "429" (with Retry-After: 0), "500", "timeout" (sleeps past the client's
timeout), "truncated" (closes the connection mid-body), "malformed" (200 with broken JSON),
"null" (200 with `content: null`), "echo" (a 500 that echoes the request's Authorization header
and path, as a hostile or careless server might). Every call is recorded with its headers.

Example: with loopback_openai(lambda prompt, attempt: "500" if attempt == 1 else None) as server: server.url
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

Faults = Callable[[str, int], "str | None"]
SLEEP_FOR_TIMEOUT = 1.5  # seconds a "timeout" fault waits (clients in the tests time out after 0.5 s)


class LoopbackOpenAI(ThreadingHTTPServer):
    """The server; `calls` maps (model, prompt text, seed) to the number of calls; `seen` keeps headers and paths."""

    daemon_threads = True

    def __init__(self, faults: Faults | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.faults = faults or (lambda prompt, attempt: None)
        self.calls: dict[tuple, int] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:  # a client that timed out closed the socket: expected
        pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def _score(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 6


def answer_for(body: dict) -> str:
    """The deterministic answer to a request body. Example: answer_for({"messages": [...], "seed": 3})"""
    text = body["messages"][-1]["content"]
    if "Score:" in text:
        return f"Looks fine to me.\nScore: {_score(text)}"
    return f"reply {body.get('seed')} to {text[:40]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None, length: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        key = (body["model"], prompt, body.get("seed"))
        with self.server.lock:
            self.server.calls[key] = attempt = self.server.calls.get(key, 0) + 1
            self.server.seen.append((self.path, dict(self.headers)))
        fault = self.server.faults(prompt, attempt)
        ok = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer_for(body)},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode()
        if fault == "429":
            return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "0"})
        if fault == "500":
            return self._send(500, b'{"error": "internal"}')
        if fault == "echo":
            echoed = f"denied {self.path} for {self.headers.get('Authorization')}".encode()
            return self._send(500, echoed)
        if fault == "timeout":
            time.sleep(SLEEP_FOR_TIMEOUT)
            return self._send(200, ok)
        if fault == "truncated":
            self._send(200, ok[: len(ok) // 2], length=len(ok))
            self.close_connection = True
            return None
        if fault == "malformed":
            return self._send(200, b'{"choices": [{"message": {"content": "cut')
        if fault == "null":
            return self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": None},
                                                            "finish_reason": "stop"}]}).encode())
        return self._send(200, ok)


@contextlib.contextmanager
def loopback_openai(faults: Faults | None = None) -> Iterator[LoopbackOpenAI]:
    """Start the server in a thread; stop it after. Example: with loopback_openai() as s: s.url"""
    server = LoopbackOpenAI(faults)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
