"""Resilience scenarios, shared by tests/resilience/ (assertions) and benchmarks/resilience.py (the table).

Each scenario runs real `curate` processes (or the real push) on cheap CPU-only pipelines and
returns one `Outcome` per repetition: did the run (after recovery) complete, how many rows were
lost or duplicated against an uninterrupted run, anything it found wrong, and how long recovery
took. The scenarios:
- `sigkill`: the CPU pipeline SIGKILLed at seeded random moments, then resumed;
- `disk_full`: ENOSPC injected at the k-th write moment of a run (a Parquet or Arrow file write,
  leaving a half-written file, or an fsync), then the run resumed with the space "freed";
- `two_runs`: a second `curate run` on the output folder of a live one;
- `backend_faults`: a generator over a loopback OpenAI-compatible server answering 429, 500,
  timeouts, truncated bodies, malformed JSON and null content, some prompts failing for good;
- `hub_push`: a loopback Hub failing one push step, then `curate push` run again.

Example: [o.ok for o in disk_full(tmp_path, moments=3)]
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.test_crash_safety import PIPELINE, _write_candidates

REPO = Path(__file__).resolve().parents[2]

# The crash test's CPU pipeline (tests/test_crash_safety.py), with a chosen part size.
CPU_PIPELINE = PIPELINE.replace("part_rows: 1000", "part_rows: PART_ROWS").replace("output: OUT", "output: out")

# Runs `curate` with write faults or a slow stage: the real CLI, patched in its own process only.
WRAPPER = r'''
import errno, os, sys, time
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

AT = int(os.environ.get("CURATE_TEST_ENOSPC_AT", "0"))
COUNT_FILE = os.environ.get("CURATE_TEST_WRITE_COUNT")
moments = [0]

def _moment(path):
    moments[0] += 1
    if COUNT_FILE:
        with open(COUNT_FILE, "w") as f:
            f.write(str(moments[0]))
    if moments[0] == AT:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([path] if isinstance(path, str) else []))

_write_table, _new_file, _fsync = pq.write_table, ipc.new_file, os.fsync

def write_table(table, where, *args, **kwargs):
    if moments[0] + 1 == AT and isinstance(where, str):
        with open(where, "wb") as f:  # the disk filled part-way through this file
            f.write(b"PAR1" + b"\0" * 64)
    _moment(where)
    return _write_table(table, where, *args, **kwargs)

def new_file(sink, *args, **kwargs):
    _moment(None)
    return _new_file(sink, *args, **kwargs)

def fsync(fd):
    _moment(None)  # a real fsync's ENOSPC names no file
    return _fsync(fd)

pq.write_table, ipc.new_file, os.fsync = write_table, new_file, fsync

SLEEP = float(os.environ.get("CURATE_TEST_SLEEP", "0"))
if SLEEP:
    import pyarrow as pa
    from curate.contract import Stage, StageOutput
    from curate.registry import register

    @register
    class Sleep(Stage):
        name = "test.sleep"
        kind = "map"

        def apply(self, table, state=None):
            time.sleep(SLEEP)
            return StageOutput(table)

from curate.cli import main
sys.exit(main())
'''


@dataclass
class Outcome:
    """One repetition of a scenario. Example: Outcome("disk full", True, 0, 0, 1.2).ok"""

    scenario: str
    completed: bool
    rows_lost: int
    rows_duplicated: int
    recover_seconds: float | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.completed and not self.rows_lost and not self.rows_duplicated and not self.problems


def prepare_cpu_run(folder: Path, rows: int = 3000, part_rows: int = 500, extra_stage: str = "") -> Path:
    """A folder with the candidates, the pipeline (plus `extra_stage` YAML) and the wrapper script."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_candidates(folder / "cands.parquet", rows)
    (folder / "p.yaml").write_text(CPU_PIPELINE.replace("PART_ROWS", str(part_rows)) + extra_stage)
    (folder / "wrapper.py").write_text(WRAPPER)
    return folder


def curate(folder: Path, *args: str, env: dict | None = None, wait: bool = True, timeout: float = 300):
    """`curate` through the wrapper in `folder` (a Popen when not `wait`)."""
    command = [sys.executable, str(folder / "wrapper.py"), *args]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    if not wait:
        return subprocess.Popen(command, cwd=folder, env=full_env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=folder, env=full_env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def whole_json_lines(path: Path) -> list:
    """The parsed lines of a JSONL file a killed run may have cut short (the cut line left out).

    Example: whole_json_lines(out / "parts" / key / "manifest.jsonl")[0]["part"]
    """
    values = []
    for line in path.read_text().splitlines():
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return values


def published(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in sorted((out / "data").glob("*.parquet")))


def compare(got: pa.Table, expected: pa.Table) -> tuple[int, int, list[str]]:
    """(rows lost, rows duplicated, problems) of a run's output against the uninterrupted one."""
    ids = got.column("id").to_pylist()
    want = set(expected.column("id").to_pylist())
    lost = len(want - set(ids))
    duplicated = len(ids) - len(set(ids))
    problems = [] if lost or duplicated or got.sort_by("id").equals(expected.sort_by("id")) else ["rows differ"]
    extra = set(ids) - want
    if extra:
        problems.append(f"{len(extra)} rows the uninterrupted run does not have")
    return lost, duplicated, problems


def nothing_half_written(out: Path) -> list[str]:
    """Problems: a visible file in data/ or rejects/ that is temporary or not whole Parquet, a committed part unreadable."""
    from curate.store import Store, read_table_file

    problems = []
    for folder in ("data", "rejects"):
        for path in (out / folder).rglob("*") if (out / folder).exists() else []:
            if path.is_file():
                if ".tmp" in path.name:
                    problems.append(f"temporary file published: {path.relative_to(out)}")
                    continue
                try:
                    pq.read_metadata(path)
                except Exception as exc:  # noqa: BLE001 - any unreadable file is the finding
                    problems.append(f"{path.relative_to(out)} is not whole Parquet: {exc}")
    store = Store(str(out))
    for key_dir in (out / "parts").iterdir() if (out / "parts").exists() else []:
        for index in store.finished(key_dir.name):
            try:
                store.read_part(key_dir.name, index)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"committed part {key_dir.name}/{index} unreadable: {exc}")
    return problems


def one_error_line(stderr: str, expect: str) -> list[str]:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if "Traceback" in stderr:
        return ["a traceback was printed"]
    if not lines or not lines[-1].startswith("error: ") or expect not in lines[-1]:
        return [f"no one-line error naming {expect!r}: {stderr[-300:]!r}"]
    return []


# SIGKILL -------------------------------------------------------------------------------------------


def sigkill(folder: Path, kills: int = 3, rows: int = 20_000, seed: int = 1234) -> list[Outcome]:
    """SIGKILL a run at `kills` seeded random moments (each in a fresh folder), then resume it.

    A run that ends before its moment is not counted (one Outcome per kill that landed).
    """
    import signal

    prepare_cpu_run(folder, rows, part_rows=1000)
    started = time.perf_counter()
    clean = curate(folder, "-q", "run", "p.yaml", "--out", "clean")
    duration = time.perf_counter() - started
    assert clean.returncode == 0, clean.stderr
    expected = published(folder / "clean")
    rng = random.Random(seed)
    outcomes = []
    for k in range(kills):
        out = f"killed-{k}"
        proc = curate(folder, "-q", "run", "p.yaml", "--out", out, wait=False)
        time.sleep(rng.uniform(0.05, 0.8) * duration)
        if proc.poll() is not None:
            continue  # the run ended before its kill moment: not a kill, left out of the count
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=300)
        outcomes.append(resume(folder, out, expected, "SIGKILL mid-run", nothing_half_written(folder / out)))
    return outcomes


def resume(folder: Path, out: str, expected: pa.Table, scenario: str, problems: list[str]) -> Outcome:
    """Run again into `out` after a fault; compare with the uninterrupted output; look for leftovers."""
    started = time.perf_counter()
    resumed = curate(folder, "-q", "run", "p.yaml", "--out", out)
    seconds = time.perf_counter() - started
    if resumed.returncode != 0:
        return Outcome(scenario, False, 0, 0, None, problems + [resumed.stderr[-300:]])
    lost, duplicated, differ = compare(published(folder / out), expected)
    leftovers = [str(p) for p in (folder / out).rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    problems = problems + differ + nothing_half_written(folder / out) + [f"left behind: {p}" for p in leftovers]
    return Outcome(scenario, True, lost, duplicated, seconds, problems)


# Disk full ---------------------------------------------------------------------------------------


def count_write_moments(folder: Path) -> int:
    """Write moments (file writes and fsyncs) of one uninterrupted run from scratch."""
    count = folder / "moments.txt"
    proc = curate(folder, "-q", "run", "p.yaml", "--out", "count", env={"CURATE_TEST_WRITE_COUNT": str(count)})
    assert proc.returncode == 0, proc.stderr
    return int(count.read_text())


def disk_full(folder: Path, moments: int | None = 6, rows: int = 3000) -> list[Outcome]:
    """ENOSPC at `moments` evenly spread write moments (every one when None), each in a fresh run folder, then resume."""
    prepare_cpu_run(folder, rows)
    clean = curate(folder, "-q", "run", "p.yaml", "--out", "clean")
    assert clean.returncode == 0, clean.stderr
    expected = published(folder / "clean")
    total = count_write_moments(folder)
    chosen = range(1, total + 1) if moments is None else \
        sorted({1 + round(i * (total - 1) / max(1, moments - 1)) for i in range(moments)})
    outcomes = []
    for at in chosen:
        out = f"full-{at}"
        failed = curate(folder, "-q", "run", "p.yaml", "--out", out, env={"CURATE_TEST_ENOSPC_AT": str(at)})
        problems = nothing_half_written(folder / out)
        if failed.returncode != 0:
            problems += one_error_line(failed.stderr, "No space left on device")
        outcome = resume(folder, out, expected, "disk full", problems)
        outcome.problems = [f"moment {at}/{total}: {p}" for p in outcome.problems]
        outcomes.append(outcome)
    return outcomes


# Two runs on one folder ----------------------------------------------------------------------------

SLEEP_STAGE = "  - stage: test.sleep\n    id: slow\n"


def two_runs(folder: Path, repeats: int = 1, rows: int = 2000) -> list[Outcome]:
    """Start a run (a stage that sleeps per part keeps it alive), then a second one on the same folder."""
    prepare_cpu_run(folder, rows, part_rows=500, extra_stage=SLEEP_STAGE)
    env = {"CURATE_TEST_SLEEP": "1.0"}  # 4 parts: the first run lives ~4 s past its lock
    clean = curate(folder, "-q", "run", "p.yaml", "--out", "clean", env=env)
    assert clean.returncode == 0, clean.stderr
    expected = published(folder / "clean")
    outcomes = []
    for i in range(repeats):
        out = folder / f"shared-{i}"
        first = curate(folder, "-q", "run", "p.yaml", "--out", out.name, env=env, wait=False)
        deadline = time.time() + 60
        while not (out / "parts").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)  # the first run holds the lock once it writes parts
        started = time.perf_counter()
        second = curate(folder, "-q", "run", "p.yaml", "--out", out.name, env=env)
        refused_in = time.perf_counter() - started
        _, first_err = first.communicate(timeout=300)
        problems = []
        if first.poll() is not None and second.returncode == 0 and first.returncode == 0:
            problems.append("the second run was not refused")
        if second.returncode != 2:
            problems.append(f"second run exit code {second.returncode}")
        problems += one_error_line(second.stderr, "another curate run is using this output folder")
        if first.returncode != 0:
            outcomes.append(Outcome("two runs, one folder", False, 0, 0, None, problems + [first_err[-300:]]))
            continue
        lost, duplicated, differ = compare(published(out), expected)
        outcomes.append(Outcome("two runs, one folder", True, lost, duplicated, refused_in,
                                problems + differ + nothing_half_written(out)))
    return outcomes


# A flaky backend -----------------------------------------------------------------------------------

FAULTS = ("429", "500", "timeout", "truncated", "malformed", "null")
BACKEND_PIPELINE = """name: flaky-backend
source: {{path: prompts.jsonl, part_rows: 8}}
output: out
stages:
  - stage: generators.responses
    id: generate
    params: {{backend: openai, base_url: "{url}", model: remote, max_retries: 3, timeout: 0.5, max_concurrency: 8,
              generation: {{max_tokens: 8, n: 2}}}}
  - stage: filters.nonempty
    params: {{columns: [prompt]}}
"""


def _fault_plan(seed: int, prompts: list[str]) -> dict[str, tuple[str, int]]:
    """prompt -> (fault, attempts it lasts); 'doomed' prompts fail on every attempt."""
    rng = random.Random(seed)
    plan = {}
    for i, prompt in enumerate(prompts):
        if "doomed" in prompt:
            plan[prompt] = (rng.choice(["500", "malformed", "truncated"]), 10**6)
        elif i % 4 != 3:  # a quarter of the prompts meet no fault
            plan[prompt] = (FAULTS[i % len(FAULTS)], rng.choice([1, 2]))
    return plan


def backend_faults(folder: Path, repeats: int = 1, prompts: int = 24) -> list[Outcome]:
    """A run over a faulty loopback server: every row must come back with its responses or a row error."""
    from tests.loopback_openai import loopback_openai

    outcomes = []
    for seed in range(repeats):
        run = folder / f"flaky-{seed}"
        run.mkdir(parents=True)
        texts = [f"{'doomed ' if i % 8 == 5 else ''}prompt {seed}-{i}" for i in range(prompts)]
        (run / "prompts.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "prompt": t}) + "\n"
                                                   for i, t in enumerate(texts)))
        plan = _fault_plan(seed, texts)

        def faults(prompt: str, attempt: int, plan=plan) -> str | None:
            fault, lasts = plan.get(prompt, (None, 0))
            return fault if attempt <= lasts else None

        with loopback_openai(faults) as server:
            (run / "p.yaml").write_text(BACKEND_PIPELINE.format(url=server.url))
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "curate.cli", "-q", "run", "p.yaml"], cwd=run,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)))
            seconds = time.perf_counter() - started
        if proc.returncode != 0:
            outcomes.append(Outcome("flaky backend", False, 0, 0, None, [proc.stderr[-300:]]))
            continue
        rows = published(run / "out").to_pylist()
        ids = [r["id"] for r in rows]
        lost = len({f"r{i}" for i in range(prompts)} - set(ids))
        problems = []
        for r in rows:
            texts_back = [x["text"] for x in r["responses"]]
            doomed = "doomed" in r["prompt"][-1]["content"]
            if any(t is None for t in texts_back):
                problems.append(f"{r['id']}: a silent null response")
            if doomed != (r["generate_error"] is not None):
                problems.append(f"{r['id']}: error {r['generate_error']!r} for a {'doomed' if doomed else 'recoverable'} prompt")
            if not doomed and len(texts_back) != 2:
                problems.append(f"{r['id']}: {len(texts_back)} responses")
        outcomes.append(Outcome("flaky backend", True, lost, len(ids) - len(set(ids)), seconds, problems))
    return outcomes


# A Hub failing mid-push ------------------------------------------------------------------------------

TOKEN = "hf_RESILIENCEtokenDoNotLeak0123"
REPO_ID = "me/resilience"
# (method, path fragment, requests let through first): each refused with a 403 (not retried), so the push stops there.
# Retried 429 / 5xx answers within one push are tested in tests/test_push.py.
HUB_FAILURES = [("POST", "/commit/", 0), ("POST", "/commit/", 1), ("POST", "/commit/", 3), ("PUT", "/lfs-upload/", 0),
                ("PUT", "/lfs-upload/", 2), ("POST", "/preupload/", 1), ("POST", "/lfs/objects/batch", 1)]


def _push(hub, run: Path, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_TOKEN=TOKEN,
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "curate.cli", "-q", "push", str(run), "--repo", REPO_ID,
                           "--commit-files", "1"], env=env, capture_output=True, text=True, timeout=300)


def hub_push(folder: Path, run_dir: Path, failures: list | None = None) -> list[Outcome]:
    """For each failure point: a push that stops there, then a push again; nothing sent twice, everything sent."""
    from tests.hub_stub import HubStub

    local = {f"data/{p.name}": p.read_bytes() for p in sorted((run_dir / "data").glob("*.parquet"))}
    outcomes = []
    for n, (method, path, after) in enumerate(failures or HUB_FAILURES):
        with HubStub(TOKEN) as hub:
            hub.fail(method, path, 403, times=10**6, after=after)
            broken = _push(hub, run_dir, folder / f"home-{n}")
            hub.failures.clear()
            problems = [] if broken.returncode != 0 else [f"{method} {path} failing did not stop the push"]
            problems += one_error_line(broken.stderr, "failed")
            started = time.perf_counter()
            again = _push(hub, run_dir, folder / f"home-{n}")
            seconds = time.perf_counter() - started
            if again.returncode != 0:
                outcomes.append(Outcome("hub fails mid-push", False, 0, 0, None, problems + [again.stderr[-300:]]))
                continue
            remote = hub.files(REPO_ID)
            lost = sum(remote.get(p) != data for p, data in local.items())
            uploads = [r.path.rsplit("/", 1)[1] for r in hub.requests if "/lfs-upload/" in r.path and r.status == 200]
            committed = [op["path"] for c in hub.commits(REPO_ID) for op in c["operations"] if op["path"] in local]
            duplicated = (len(uploads) - len(set(uploads))) + (len(committed) - len(set(committed)))
            for name in ("README.md", "pipeline.yaml", "plan.json", "stats.json"):
                if name not in remote:
                    problems.append(f"{name} missing on the Hub")
            outcomes.append(Outcome("hub fails mid-push", True, lost, duplicated, seconds,
                                    [f"{method} {path} after {after}: {p}" for p in problems]))
    return outcomes
