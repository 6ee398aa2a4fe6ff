"""The OpenAI-compatible backend against real servers on 127.0.0.1: a scripted fault server and `vllm serve`."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from curate.backends.base import ChatRequest, GenerationParams
from curate.backends.openai_compat import OpenAIBackend, retry_after_seconds

PARAMS = GenerationParams(max_tokens=8)


class FaultServer(ThreadingHTTPServer):
    """Answers /v1/chat/completions; the model name picks a scripted fault for the first calls."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FaultHandler)
        self.calls: dict[str, list[float]] = {}
        self.bodies: list[dict] = []
        self.lock = threading.Lock()


class FaultHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = body["model"] + "|" + body["messages"][-1]["content"]
        with self.server.lock:
            self.server.calls.setdefault(key, []).append(time.monotonic())
            self.server.bodies.append(body)
            attempt = len(self.server.calls[key])
        model = body["model"]
        ok = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"echo {body['messages'][-1]['content']}"},
                                      "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}).encode()
        if model == "flaky-429" and attempt == 1:
            return self._send(429, b'{"error": "slow down"}', {"Retry-After": "1"})
        if model == "flaky-500" and attempt <= 2:
            return self._send(500, b"oops")
        if model == "slow" and attempt == 1:
            time.sleep(1.5)
        if model == "garbage" and attempt == 1:
            return self._send(200, b'{"choices": [ not json')
        if model == "always-500":
            return self._send(503, b"down")
        if model == "bad-request":
            return self._send(400, b'{"error": "bad"}')
        if model == "hosted" and "structured_outputs" in body:  # a hosted API refuses vLLM's field
            return self._send(400, b'{"error": "Unrecognized request argument supplied: structured_outputs"}')
        return self._send(200, ok)


@pytest.fixture
def fault_server():
    server = FaultServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _backend(server, model, **kw):
    options = {"max_retries": 3, "backoff": 0.05, "timeout": 1.0, "max_concurrency": 4} | kw
    return OpenAIBackend(model, base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key_env=None, **options)


def _ask(backend, n_prompts=3, n=1):
    return backend.generate([ChatRequest([{"role": "user", "content": f"q{i}"}], GenerationParams(max_tokens=8, n=n), seed=i)
                             for i in range(n_prompts)])


def test_retry_after_parsing():
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(None) is None
    assert 0 <= retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0 + 1e-9


@pytest.mark.parametrize("model", ["flaky-500", "slow", "garbage"])
def test_transient_faults_end_as_completions(fault_server, model):
    out = _ask(_backend(fault_server, model))
    assert [c[0].text for c in out] == ["echo q0", "echo q1", "echo q2"]
    assert all(c[0].error is None and c[0].n_tokens == 2 for c in out)


def test_429_honours_retry_after(fault_server):
    out = _ask(_backend(fault_server, "flaky-429"), n_prompts=2)
    assert all(c[0].error is None for c in out)
    for times in fault_server.calls.values():
        assert len(times) == 2 and times[1] - times[0] >= 0.95  # waited the 1 s the server asked for


def test_persistent_and_client_errors_become_row_errors(fault_server):
    down = _ask(_backend(fault_server, "always-500"), n_prompts=2)
    assert all(c[0].text is None and "after 4 attempts: HTTP 503" in c[0].error for c in down)
    bad = _ask(_backend(fault_server, "bad-request"), n_prompts=1)
    assert "HTTP 400" in bad[0][0].error
    assert len(fault_server.calls["bad-request|q0"]) == 1  # a 400 is not retried


def test_n_responses_are_separate_seeded_requests(fault_server):
    out = _ask(_backend(fault_server, "ok"), n_prompts=2, n=3)
    assert [len(c) for c in out] == [3, 3]
    assert len(fault_server.calls["ok|q0"]) == 3


def test_generation_stage_over_the_fault_server_never_aborts(fault_server, tmp_path):
    from curate.config import parse_pipeline
    from curate.runner import run_pipeline

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(6)))
    url = f"http://127.0.0.1:{fault_server.server_address[1]}/v1"
    yaml_text = f"""
source: {{path: p.jsonl, part_rows: 3}}
stages:
  - stage: generators.responses
    id: gen
    params: {{backend: openai, base_url: "{url}", model: always-500, max_retries: 1, timeout: 1.0,
              generation: {{max_tokens: 8, n: 2}}}}
"""
    stats = run_pipeline(parse_pipeline(yaml_text, str(tmp_path / "p.yaml")), out=str(tmp_path / "out"))
    gen = stats["stages"][1]
    assert stats["rows_out"] == 6 and gen["counters"]["row_errors"] == 6 and gen["counters"]["failed_responses"] == 12
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "data")
    assert all("2 of 2 responses failed" in e for e in table.column("gen_error").to_pylist())


def test_a_constrained_judge_sends_its_regex_to_the_server(fault_server, tmp_path):
    """`constrained: true` reaches a vLLM server as `structured_outputs` (what `vllm serve` 0.32 reads);
    a server that refuses the field gets the request again without it."""
    from curate.judges.self_reward import SelfRewardJudge, SelfRewardParams, constrained_regex

    url = f"http://127.0.0.1:{fault_server.server_address[1]}/v1"
    judge = SelfRewardJudge(SelfRewardParams(model="ok", backend="openai", base_url=url, samples=1))
    requests = judge.requests("r1", [{"role": "user", "content": "q"}], [{"text": "a"}, {"text": "b"}])
    out = _backend(fault_server, "ok").generate(requests)
    assert all(c[0].error is None for c in out)
    assert [b["structured_outputs"] for b in fault_server.bodies] == [{"regex": constrained_regex(256)}] * 2
    hosted = _backend(fault_server, "hosted")
    out = hosted.generate([ChatRequest([{"role": "user", "content": f"h{i}"}], PARAMS, guided_regex="x") for i in range(3)])
    assert all(c[0].error is None and c[0].text.startswith("echo h") for c in out) and hosted.structured_refused
    assert sum(len(t) for k, t in fault_server.calls.items() if k.startswith("hosted")) <= 6  # at most one refusal each


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_against_vllm_serve_matches_the_offline_engine(tmp_path_factory):
    pytest.importorskip("vllm")
    from tests.test_backends import PROMPTS  # noqa: F401  (same prompts)
    from curate.backends.base import open_backend
    from curate.models import resolve_model

    model = resolve_model("smollm2-135m-instruct").path
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", "smol",
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert server.poll() is None, open(log.name).read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("vllm serve did not become ready in 240 s")
        remote = OpenAIBackend("smol", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=None)
        greedy = GenerationParams(max_tokens=16, temperature=0.0)
        requests = [ChatRequest(p, greedy) for p in PROMPTS[:2]]
        served = remote.generate(requests)
        local = open_backend("vllm", model, dtype="float32", max_model_len=1024).generate(requests)
        assert [c[0].text for c in served] == [c[0].text for c in local]
        assert all(c[0].error is None and c[0].n_tokens > 0 for c in served)
        choice = remote.generate([ChatRequest(PROMPTS[0], GenerationParams(max_tokens=4), guided_choice=["yes", "no"])])
        assert choice[0][0].text in {"yes", "no"}
        from curate.judges.self_reward import constrained_regex, parse_score

        regex = constrained_regex(40)  # the self-reward judge's constraint, as `constrained: true` sends it
        judged = remote.generate([ChatRequest(PROMPTS[0], GenerationParams(max_tokens=40, temperature=0.7), seed=1,
                                              guided_regex=regex)])
        assert re.fullmatch(regex, judged[0][0].text) and parse_score(judged[0][0].text) is not None
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
