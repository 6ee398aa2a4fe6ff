"""Scenario: a Dask worker SIGKILLed at chosen moments of a real `curate run --executor dask` (a LocalCluster).

The CPU pipeline (tests/resilience/scenarios.py) runs on a LocalCluster of two worker processes
(each under its nanny, which starts a fresh worker when one dies: what `--workers N` gives a user).
Every worker loads `dask_worker_probe`, which logs each task phase and pauses in it; for each
moment the scenario waits for the n-th line of one phase and SIGKILLs the worker process that
wrote it, so kills land in known places spread over the run: a global fit's first pass
(`summarize`), mid-part (`compute`), while the part's output is half committed (`write`: the
attempt's file written, not yet fsynced nor renamed) and just after a task returned (`done`: the
result on its way to the driver, or being committed). The run itself must finish (exit 0, no
re-run), every part committed exactly once, its output equal to an uninterrupted local run, and
nothing temporary left in the run folder. Time to recover: from the kill until the killed task's
part is committed (for `summarize`: until the fitted state is written).

Example: [o.ok for o in dask_worker_kills(tmp_path, moments=4)]
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.resilience.scenarios import REPO, Outcome, compare, curate, nothing_half_written, prepare_cpu_run, published

PHASES = ("compute", "write", "done", "summarize")
PROBE = "tests.resilience.dask_worker_probe"


def _dask_env(events: Path, pause: float) -> dict[str, str]:
    return {"DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([PROBE]), "CURATE_TEST_DASK_EVENTS": str(events),
            "CURATE_TEST_DASK_PAUSE": str(pause), "DASK_LOGGING__DISTRIBUTED": "error", "OMP_NUM_THREADS": "1"}


def _events(path: Path) -> list[tuple[int, str, str, int]]:
    """(pid, phase, key, index) lines written so far (a line still being written is left out)."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [(int(p), phase, key, int(i)) for p, phase, key, i in (line.split() for line in lines)]


def _dask_run(folder: Path, out: str, events: Path, pause: float) -> subprocess.Popen:
    command = [sys.executable, "-m", "curate.cli", "-q", "run", "p.yaml", "--out", out, "--executor", "dask",
               "--workers", "2"]
    return subprocess.Popen(command, cwd=folder, env=dict(os.environ, PYTHONPATH=str(REPO), **_dask_env(events, pause)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def choose_moments(counts: dict[str, int], moments: int) -> list[tuple[str, int]]:
    """`moments` (phase, n-th occurrence) pairs: phases in turn, occurrences spread evenly over each phase's count
    (the middle one when a phase gets a single moment).

    Example: choose_moments({"compute": 24, "write": 24, "done": 24, "summarize": 12}, 4)
             -> [('compute', 13), ('write', 13), ('done', 13), ('summarize', 7)]
    """
    chosen = []
    for i in range(moments):
        phase = PHASES[i % len(PHASES)]
        slots, j, total = len(range(i % len(PHASES), moments, len(PHASES))), i // len(PHASES), counts[phase]
        chosen.append((phase, 1 + round(j * (total - 1) / (slots - 1)) if slots > 1 else 1 + total // 2))
    return chosen


def _committed_lines(out: Path) -> dict[str, list[int]]:
    """Part indexes of every manifest line, per key (a part listed twice would show twice)."""
    lines = {}
    for manifest in (out / "parts").glob("*/manifest.jsonl"):
        lines[manifest.parent.name] = [json.loads(line)["part"] for line in manifest.read_text().splitlines() if line]
    return lines


def _recovered(out: Path, phase: str, key: str, index: int) -> bool:
    if phase == "summarize":
        return (out / "parts" / key / "state.parquet").exists()
    manifest = out / "parts" / key / "manifest.jsonl"
    return manifest.exists() and any(json.loads(line)["part"] == index for line in manifest.read_text().splitlines() if line)


def _kill_at(proc: subprocess.Popen, events: Path, phase: str, nth: int, timeout: float = 300):
    """Wait for the n-th `phase` line and SIGKILL its worker; (pid, key, index, kill time) or None if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        hits = [e for e in _events(events) if e[1] == phase]
        if len(hits) >= nth:
            pid, _, key, index = hits[nth - 1]
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return None
            return pid, key, index, time.perf_counter()
        time.sleep(0.01)
    return None


def dask_worker_kills(folder: Path, moments: int = 4, rows: int = 3000, part_rows: int = 250,
                      pause: float = 0.3) -> list[Outcome]:
    """One fresh run per moment, one worker killed in it; see the module docstring."""
    prepare_cpu_run(folder, rows, part_rows=part_rows)
    clean = curate(folder, "-q", "run", "p.yaml", "--out", "clean")
    assert clean.returncode == 0, clean.stderr
    expected = published(folder / "clean")
    counting = _dask_run(folder, "dask-clean", folder / "events-clean.txt", pause)
    _, err = counting.communicate(timeout=600)
    assert counting.returncode == 0, err[-3000:]
    counts = {p: sum(e[1] == p for e in _events(folder / "events-clean.txt")) for p in PHASES}
    outcomes = []
    for k, (phase, nth) in enumerate(choose_moments(counts, moments)):
        out, events = f"dask-killed-{k}", folder / f"events-{k}.txt"
        proc = _dask_run(folder, out, events, pause)
        killed = _kill_at(proc, events, phase, nth)
        recover = None
        if killed is not None:
            pid, key, index, at = killed
            while proc.poll() is None and not _recovered(folder / out, phase, key, index):
                time.sleep(0.01)
            if _recovered(folder / out, phase, key, index):
                recover = time.perf_counter() - at
        _, err = proc.communicate(timeout=600)
        label = f"kill {k} ({phase} #{nth}/{counts[phase]})"
        if killed is None:
            outcomes.append(Outcome("dask worker killed", False, 0, 0, None, [f"{label}: the kill did not land"]))
            continue
        outcomes.append(_check(folder / out, expected, proc.returncode, err, events, killed, phase, recover, label))
    return outcomes


def _check(out: Path, expected, returncode: int, err: str, events: Path, killed, phase: str,
           recover: float | None, label: str) -> Outcome:
    """The killed run's outcome: finished, rows against the uninterrupted run, parts committed once, no leftovers."""
    pid, key, index, _ = killed
    if returncode != 0:
        return Outcome("dask worker killed", False, 0, 0, None, [f"{label}: exit {returncode}: {err[-400:]}"])
    lost, duplicated, problems = compare(published(out), expected)
    for manifest_key, parts in _committed_lines(out).items():
        if len(parts) != len(set(parts)):
            problems.append(f"{manifest_key}: a part committed twice")
    if phase != "done" and not any(e[1:] == (phase, key, index) and e[0] != pid for e in _events(events)):
        problems.append(f"the killed task ({phase} {key} {index}) never ran again")
    if recover is None:
        problems.append("the killed task's part was never committed")
    problems += nothing_half_written(out)
    problems += [f"left behind: {p.relative_to(out)}" for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    return Outcome("dask worker killed", True, lost, duplicated, recover, [f"{label}: {p}" for p in problems])
