"""Security: YAML constructs nothing, remote code only when asked, secrets never written, paths stay in the run folder,
templates come from the package or the named file, huge cells are refused with a located error."""
from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import parse_pipeline
from curate.errors import ConfigError, CurateError, InputError
from tests.loopback_openai import loopback_openai

PROMPTS = "".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(8))


def _curate(cwd: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curate.cli", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, env=env)


# YAML constructs no objects ----------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["!!python/object:collections.OrderedDict {}", "!!python/object/new:builtins.dict []",
                                 "!!python/name:os.system", "!!python/module:os", "!!python/tuple [1, 2]"])
def test_python_and_other_tags_are_refused_with_the_line(tag):
    text = f"source: {{path: in.jsonl}}\nname: x\noutput: {tag}\n"
    with pytest.raises(ConfigError) as info:
        parse_pipeline(text, "p.yaml")
    assert info.value.where == "p.yaml:3"
    assert "YAML tags are not allowed" in info.value.message


# trust_remote_code ------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the spies once they have recorded how a model would be loaded."""


def _model_folder(tmp_path: Path) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def _spy_transformers(monkeypatch) -> list[dict]:
    import transformers

    seen: list[dict] = []

    def record(*args, **kwargs):
        seen.append(kwargs)
        raise _Stop

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    return seen


def _spy_vllm(monkeypatch) -> list[dict]:
    seen: list[dict] = []

    class LLM:
        def __init__(self, **kwargs):
            seen.append(kwargs)
            raise _Stop

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    return seen


def _stage_options(tmp_path: Path, backend: str, extra: str = "") -> dict:
    from curate.backends.params import backend_options

    text = (f"source: {{path: in.jsonl}}\noutput: out\nstages:\n  - stage: generators.responses\n"
            f"    params: {{model: {_model_folder(tmp_path)}, backend: {backend}, generation: {{max_tokens: 4}}{extra}}}\n")
    stage = parse_pipeline(text, str(tmp_path / "p.yaml")).stages[0].stage
    return backend_options(stage.params, 0)


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_remote_code_is_off_unless_the_yaml_sets_it_for_that_model(backend, tmp_path, monkeypatch, caplog):
    from curate.backends.cache import _construct

    seen = _spy_transformers(monkeypatch) if backend == "transformers" else _spy_vllm(monkeypatch)
    for folder, extra, trusted in [("plain", "", False), ("trusted", ", trust_remote_code: true", True)]:
        (tmp_path / folder).mkdir()
        options = _stage_options(tmp_path / folder, backend, extra)
        assert options.get("trust_remote_code", False) is trusted
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(_Stop):
            _construct(backend, str(tmp_path / folder / "model"), options)
        assert seen[-1]["trust_remote_code"] is trusted
        logged = "trust_remote_code is on (set in the pipeline)" in caplog.text
        assert logged is trusted, caplog.text


def test_remote_code_must_be_a_boolean(tmp_path):
    with pytest.raises(ConfigError) as info:
        _stage_options(tmp_path, "vllm", ", trust_remote_code: maybe")
    assert "trust_remote_code" in str(info.value) and "p.yaml:5" in str(info.value)


# Secrets never written --------------------------------------------------------------------------

HF_SECRET = "hf_PLANTEDsecretTOKEN1234"
OPENAI_SECRET = "sk-PLANTEDopenaiKEY5678"
URL_PASSWORD = "PLANTEDurlPASSWORD90"
URL_KEY = "PLANTEDqueryKEY4242"
SECRETS = [HF_SECRET, OPENAI_SECRET, URL_PASSWORD, URL_KEY, base64.b64encode(f"user:{URL_PASSWORD}".encode()).decode()]

SECRET_PIPELINE = """name: secrets
source: {{path: prompts.jsonl, part_rows: 4}}
output: out
stages:
  - stage: generators.responses
    id: generate
    params: {{backend: openai, base_url: "{url}", model: remote-model, max_retries: 1, timeout: 5,
              generation: {{max_tokens: 8, n: 2}}}}
  - stage: judges.self_reward
    id: judge
    params: {{backend: openai, base_url: "{url}", model: remote-model, max_retries: 1, timeout: 5, samples: 1,
              generation: {{max_tokens: 40}}}}
  - stage: pairs.from_scores
    params: {{scores: sr_scores, mode: best_worst}}
  - stage: format.trl
"""


def _every_output_text(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_planted_tokens_never_reach_any_output_or_stream(tmp_path):
    """A real run over a loopback server that echoes the Authorization header in some errors."""
    (tmp_path / "prompts.jsonl").write_text(PROMPTS)
    env = dict(os.environ, HF_TOKEN=HF_SECRET, OPENAI_API_KEY=OPENAI_SECRET)
    with loopback_openai(lambda prompt, attempt: "echo" if prompt.startswith("question 3") else None) as server:
        host = server.url.split("//", 1)[1]
        url = f"http://user:{URL_PASSWORD}@{host}?key={URL_KEY}"
        (tmp_path / "p.yaml").write_text(SECRET_PIPELINE.format(url=url))
        runs = [_curate(tmp_path, "--debug", "run", "p.yaml", env=env),
                _curate(tmp_path, "run", "p.yaml", "--set", f"stages.judge.params.base_url={url}", env=env),
                _curate(tmp_path, "plan", "p.yaml", env=env), _curate(tmp_path, "plan", "--json", "p.yaml", env=env),
                _curate(tmp_path, "validate", "p.yaml", env=env), _curate(tmp_path, "report", "out", env=env)]
        seen = list(server.seen)
    assert runs[0].returncode == 0, runs[0].stderr[-3000:]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-500:] for r in runs]
    # The server did get the credentials: the test would prove nothing otherwise.
    assert all(path.endswith(f"?key={URL_KEY}") for path, _ in seen)
    basic = "Basic " + base64.b64encode(f"user:{URL_PASSWORD}".encode()).decode()
    assert all(headers["Authorization"] == basic for _, headers in seen)  # httpx sends the URL's credentials
    rejects = pq.read_table(tmp_path / "out" / "rejects")
    errors = rejects.column("generate_error").to_pylist()
    outputs = _every_output_text(tmp_path / "out")
    assert {"stats.json", "plan.json", "README.md", "pipeline.yaml", "report.html"} <= set(outputs)
    assert any(name.startswith("rejects/") for name in outputs), "the echoed errors should be rejected rows"
    streams = {f"run {i} {name}": text.encode() for i, r in enumerate(runs) for name, text in
               (("stdout", r.stdout), ("stderr", r.stderr))}
    for name, content in {**outputs, **streams}.items():
        for secret in SECRETS:
            assert secret.encode() not in content, f"{secret} found in {name}"
    assert "***" in (tmp_path / "out" / "pipeline.yaml").read_text()
    echoed = [e for e in errors if e and "denied" in e]  # the server's echo was kept as a row error, redacted
    assert echoed and all("Basic ***" in e and "key=***" in e for e in echoed), errors


def test_a_source_url_keeps_its_credentials_out_of_the_plan():
    from curate.sources import SourceSpec

    spec = SourceSpec(path=f"https://u:{URL_PASSWORD}@data.example/x.jsonl?sig={URL_KEY}")
    dumped = json.dumps(spec.model_dump(mode="json"))
    assert URL_PASSWORD not in dumped and URL_KEY not in dumped and "***@data.example/x.jsonl" in dumped
    assert spec.path.startswith(f"https://u:{URL_PASSWORD}@")  # the reader still gets them


def test_url_credentials_reach_the_server_but_not_the_plan(tmp_path):
    from curate.backends.openai_compat import OpenAIBackend

    backend = OpenAIBackend("m", base_url=f"http://u:{URL_PASSWORD}@127.0.0.1:9/v1?key={URL_KEY}", api_key_env=None)
    assert backend.url == f"http://u:{URL_PASSWORD}@127.0.0.1:9/v1/chat/completions?key={URL_KEY}"
    assert URL_PASSWORD not in backend.identity and URL_KEY not in backend.identity


# No output path escapes the run folder ----------------------------------------------------------


@pytest.mark.parametrize("stage_id", ["../escape", "/tmp/abs", "a/b", "nul\\0byte", "..", "x" * 65, "café\\u2028"])
def test_stage_ids_that_could_leave_the_folder_are_refused(stage_id, tmp_path):
    text = f'source: {{path: in.jsonl}}\noutput: out\nstages:\n  - stage: filters.nonempty\n    id: "{stage_id}"\n'
    with pytest.raises(ConfigError) as info:
        parse_pipeline(text, "p.yaml")
    assert info.value.where == "p.yaml:5"
    assert "stage id" in info.value.message


@pytest.mark.parametrize("config_name", ["../up", "/abs", "a/b", "data", "x\x00y"])
def test_hub_config_names_that_could_leave_the_folder_are_refused(config_name, tmp_path):
    from curate.hub import push_run

    with pytest.raises(CurateError) as info:
        push_run(str(tmp_path), "me/x", config_name=config_name, dry_run=True)
    assert "config name" in info.value.message and info.value.where == "--config-name"


def test_hostile_names_and_row_ids_write_nothing_outside_the_run_folder(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    rows = [{"id": "../../../escaped", "prompt": "a"}, {"id": "/tmp/absolute-escape", "prompt": "bb"},
            {"id": "nul\x00id", "prompt": "c"}, {"id": "..", "prompt": "dd"}]
    (work / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "p.yaml").write_text('name: "../../evil\\0name"\nsource: {path: in.jsonl, part_rows: 2}\noutput: out\n'
                                 'stages:\n  - stage: filters.length\n    params: {columns: [prompt], max_chars: 1}\n'
                                 '  - stage: core.identity\n')
    before = {p for p in tmp_path.rglob("*")}
    proc = _curate(work, "run", "p.yaml")
    assert proc.returncode == 0, proc.stderr
    created = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in created if not str(p).startswith(str(work / "out"))]
    assert outside == []
    assert not Path("/tmp/absolute-escape").exists()
    kept = pq.read_table(work / "out" / "data").column("id").to_pylist()
    rejected = pq.read_table(work / "out" / "rejects").column("id").to_pylist()
    assert sorted(kept + rejected) == sorted(r["id"] for r in rows) and len(rejected) == 2


# Templates --------------------------------------------------------------------------------------


def test_templates_load_only_from_the_package_or_the_named_path(tmp_path, monkeypatch):
    from curate.judges.templates import BUILTIN_DIR, load_template

    monkeypatch.chdir(tmp_path)
    (tmp_path / "self_reward.txt").write_text("planted {prompt} {response}")  # a same-named file in the cwd
    assert load_template("self_reward").text == Path(BUILTIN_DIR, "self_reward.txt").read_text()
    for name in ["..", "../self_reward", "nul\x00name", "x" * 300]:
        with pytest.raises(ConfigError):
            load_template(name)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "judge.txt").write_text("mine {prompt} {response}")
    assert load_template("mine/judge.txt").text.startswith("mine")


# Huge cells -------------------------------------------------------------------------------------


def _ingest(path: Path, **limits):
    from curate.sources import SourceSpec, ingest

    return ingest(SourceSpec(path=path.name, **limits), str(path.parent))


def test_a_huge_jsonl_string_is_refused_with_file_and_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "' + "x" * 5000 + '"}\n')
    with pytest.raises(InputError) as info:
        _ingest(path, max_cell_bytes=1000)
    assert info.value.where == f"{path}:2" and "'prompt'" in info.value.message and "5000 bytes" in info.value.message


def test_a_huge_line_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "in.jsonl"
    with open(path, "wb") as f:  # one 9 MiB line: more than a read block, past 4 x the limit
        f.write(b'{"prompt": "ok"}\n{"prompt": "' + b"y" * (9 << 20) + b'"}\n')
    with pytest.raises(InputError) as info:
        _ingest(path, max_cell_bytes=1 << 20)
    assert info.value.where == f"{path}:2" and "line is longer than" in info.value.message


def test_a_ten_million_item_list_is_refused_with_the_default_limits(tmp_path):
    path = tmp_path / "in.jsonl"
    with open(path, "w") as f:
        f.write('{"prompt": "ok", "tags": [1]}\n{"prompt": "big", "tags": [' + ",".join(["0"] * 10_000_000) + "]}\n")
    with pytest.raises(InputError) as info:
        _ingest(path)
    assert info.value.where == f"{path}:2" and "10000000 items" in info.value.message


def test_a_huge_parquet_cell_deep_in_a_list_is_refused_with_file_and_row(tmp_path):
    path = tmp_path / "in.parquet"
    responses = [[{"text": "short"}], [{"text": "short"}, {"text": "z" * 3000}]]
    pq.write_table(pa.table({"prompt": ["a", "b"], "responses": responses}), path)
    with pytest.raises(InputError) as info:
        _ingest(path, max_cell_bytes=1000)
    assert info.value.where == f"{path} row 1" and "'responses'" in info.value.message
    assert _ingest(path).table.num_rows == 2  # the default limits let it through


def test_huge_cells_fail_the_cli_with_one_located_line(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "' + "x" * 3000 + '"}\n')
    (tmp_path / "p.yaml").write_text("source: {path: in.jsonl, max_cell_bytes: 100}\noutput: out\n")
    for command in ("run", "validate"):
        proc = _curate(tmp_path, "-q", command, "p.yaml")
        assert proc.returncode == 3 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().startswith("error: ") and "in.jsonl:1" in proc.stderr


def test_redaction_of_urls_and_log_records(monkeypatch):
    from curate.redaction import SecretFilter, redact, redact_url

    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_SECRET)
    assert redact_url("https://api.example.com/v1") == "https://api.example.com/v1"
    assert redact_url(f"http://{URL_PASSWORD}@h:1/v1") == "http://***@h:1/v1"  # a token as the user name
    assert redact_url(f"http://h/v1?api-version=2024&key={URL_KEY}") == "http://h/v1?api-version=***&key=***"
    assert redact(f"sent {OPENAI_SECRET} and {URL_PASSWORD} and {URL_KEY}") == "sent *** and *** and ***"
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "bad key %s", (OPENAI_SECRET,), None)
    assert SecretFilter().filter(record) and record.getMessage() == "bad key ***"
    try:
        raise ValueError(f"boom {URL_KEY}")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    SecretFilter().filter(record)
    assert URL_KEY not in logging.Formatter().format(record) and "***" in logging.Formatter().format(record)
