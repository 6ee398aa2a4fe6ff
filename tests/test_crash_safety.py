"""Crash safety: SIGKILL `curate run` at random moments, re-run, and get the uninterrupted output."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

PIPELINE = """
name: crash
source: {path: cands.parquet, part_rows: 1000}
output: OUT
stages:
  - stage: filters.nonempty
    params: {columns: [prompt]}
  - stage: filters.dedup_exact
    params: {level: prompt}
  - stage: pairs.from_scores
    params: {mode: best_random}
  - stage: filters.range
    params: {column: margin, min: 0.5}
  - stage: format.trl
"""


def _write_candidates(path: Path, n: int) -> None:
    rng = random.Random(0)
    prompts = [f"question number {i % (n - n // 10)} about topic {i % 37}" for i in range(n)]  # ~10% repeats
    responses = [[{"text": f"answer {i}.{j} " + "word " * rng.randrange(1, 30), "model": f"m{j}"} for j in range(4)]
                 for i in range(n)]
    scores = [[rng.choice([1.0, 2.0, 3.0, 4.0, 5.0]) for _ in range(4)] for _ in range(n)]
    pq.write_table(pa.table({"prompt": prompts, "responses": responses, "scores": scores}), path)


def _run(cwd: Path, out: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "curate.cli", "-q", "run", "crash.yaml", "--out", out],
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _final(out: Path) -> pa.Table:
    files = sorted((out / "data").iterdir())
    assert all(f.name.startswith("train-") and f.suffix == ".parquet" for f in files), files
    return pa.concat_tables(pq.read_table(f) for f in files)


def _assert_no_partial_files(out: Path) -> None:
    data = out / "data"
    if data.exists():
        for f in data.iterdir():
            assert ".tmp" not in f.name
            pq.read_metadata(f)  # every visible file is a complete Parquet file


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_output(tmp_path):
    _write_candidates(tmp_path / "cands.parquet", 30_000)
    (tmp_path / "crash.yaml").write_text(PIPELINE)
    started = time.perf_counter()
    clean = _run(tmp_path, "clean")
    _, err = clean.communicate(timeout=300)
    assert clean.returncode == 0, err.decode()
    duration = time.perf_counter() - started
    expected = _final(tmp_path / "clean")
    assert expected.num_rows > 1000

    rng = random.Random(1234)
    kills = 0
    for attempt in range(6):
        proc = _run(tmp_path, "killed")
        time.sleep(rng.uniform(0.05, 0.7) * duration)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=300)
        _assert_no_partial_files(tmp_path / "killed")
    assert kills >= 3, "the run finished before most kills: make the input larger"
    final = _run(tmp_path, "killed")
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()

    got = _final(tmp_path / "killed")
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicated ids after resume"
    assert sorted(ids) == sorted(expected.column("id").to_pylist()), "ids missing or extra after resume"
    assert got.sort_by("id").equals(expected.sort_by("id"))
    _assert_no_partial_files(tmp_path / "killed")
    leftovers = [p for p in (tmp_path / "killed").rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []
