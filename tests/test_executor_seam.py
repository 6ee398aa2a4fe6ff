"""The executor seam: the source as stored parts, one committing writer, attempts that never leak,
the model cache policy, and resources."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate import ingest_ids
from curate import reading
from curate.cli import main
from curate.config import parse_pipeline
from curate.errors import InputError
from curate.runner import run_pipeline
from curate.sources import SourceSpec, _row_ids, ingest

TESTS = Path(__file__).resolve().parent

FLAKY = """
name: flaky
source: {path: rows.jsonl, part_rows: 50}
output: out
stages:
  - stage: filters.nonempty
    params: {columns: [prompt]}
  - stage: test.flaky
  - stage: filters.length
    params: {columns: [prompt], max_chars: 1000}
"""

# Runs the pipeline in a subprocess; CURATE_TEST_KILL_AFTER=N SIGKILLs the process inside the
# Nth commit of a segment part: after its files were renamed into place, before its manifest line.
RUNNER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import flaky_stage  # registers test.flaky
import curate.store as store
kill_after = int(os.environ.get("CURATE_TEST_KILL_AFTER", "0"))
seen = [0]
real = store.fsync_dir
def fsync_then_maybe_die(path):
    real(path)
    if os.path.basename(os.path.dirname(path)) == "parts" and os.path.isdir(os.path.join(path, "rejects")):
        seen[0] += 1
        if seen[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
store.fsync_dir = fsync_then_maybe_die
from curate.config import load_pipeline
from curate.runner import run_pipeline
run_pipeline(load_pipeline("p.yaml"))
"""


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i} " + "x" * (i % 7), "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _published(out: Path) -> tuple[list[str], dict[str, list[str]]]:
    data = pq.read_table(out / "data").column("id").to_pylist()
    rejects = {d.name: pq.read_table(d).column("id").to_pylist() for d in (out / "rejects").iterdir()}
    return data, rejects


def _assert_each_row_once(tmp_path: Path, rows: int) -> None:
    data, rejects = _published(tmp_path / "out")
    dropped = [i for ids in rejects.values() for i in ids]
    assert len(data) == len(set(data)) and len(dropped) == len(set(dropped)), "a row is published twice"
    assert not set(data) & set(dropped), "a row is both in data/ and in rejects/"
    every = ingest(SourceSpec(path=str(tmp_path / "rows.jsonl")), ".").table.column("id").to_pylist()
    assert sorted(data + dropped) == sorted(every) and len(every) == rows


def _subprocess(tmp_path: Path, salt: str, kill_after: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, CURATE_TEST_SALT=salt, CURATE_TEST_KILL_AFTER=str(kill_after))
    return subprocess.run([sys.executable, "-c", RUNNER.format(tests=str(TESTS))], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=300)


@pytest.mark.slow
def test_sigkill_between_rename_and_manifest_then_a_different_retry_publishes_each_row_once(tmp_path):
    _write_jsonl(tmp_path / "rows.jsonl", _rows(400))
    (tmp_path / "p.yaml").write_text(FLAKY)
    killed = _subprocess(tmp_path, salt="first", kill_after=3)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    [segment] = [p for p in (tmp_path / "out" / "parts").iterdir() if (p / "rejects").exists()]
    manifest = [json.loads(line) for line in (segment / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 2 and (segment / "part-00002.parquet").exists()  # renamed, never listed
    # The retry drops other rows: the renamed-but-unlisted rejects of part 2 must not be published.
    done = _subprocess(tmp_path, salt="second")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    _assert_each_row_once(tmp_path, 400)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    flaky = next(s for s in stats["stages"] if s["stage_id"] == "flaky")
    assert (flaky["parts_computed"], flaky["parts_cached"]) == (6, 2)


def test_task_failing_after_writing_its_rejects_leaks_nothing(tmp_path, monkeypatch):
    from tests import flaky_stage  # noqa: F401  registers test.flaky
    import curate.task as task

    _write_jsonl(tmp_path / "rows.jsonl", _rows(200))
    text = FLAKY.replace("output: out", f"output: {tmp_path / 'out'}")
    real = task.write_parquet_atomic

    def write_then_fail_on_rejects(table, path, durable=False):
        real(table, path, durable)
        if os.sep + "rejects" + os.sep in path:
            raise OSError(28, "No space left on device")

    monkeypatch.setenv("CURATE_TEST_SALT", "first")
    monkeypatch.setattr(task, "write_parquet_atomic", write_then_fail_on_rejects)
    with pytest.raises(OSError):
        run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")))
    assert list((tmp_path / "out" / "parts").rglob("attempts/*/rejects/*.parquet"))  # the failed attempt's files
    monkeypatch.setattr(task, "write_parquet_atomic", real)
    monkeypatch.setenv("CURATE_TEST_SALT", "second")
    run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")))
    _assert_each_row_once(tmp_path, 200)
    assert not list((tmp_path / "out").rglob("*.tmp-*"))


def test_validate_and_plan_read_only_the_first_rows_and_run_names_the_bad_line(tmp_path, monkeypatch):
    lines = [json.dumps(r) for r in _rows(3000)]
    lines[2499] = '{"prompt": "cut short'
    with gzip.open(tmp_path / "in.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    (tmp_path / "p.yaml").write_text("source: {path: in.jsonl.gz}\noutput: out\nstages:\n  - stage: filters.nonempty\n")
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(main, ["-q", "validate", "p.yaml"]).exit_code == 0
    planned = CliRunner().invoke(main, ["-q", "plan", "p.yaml"])
    assert planned.exit_code == 0 and "rows counted when the run ingests it" in planned.output
    ran = CliRunner().invoke(main, ["-q", "run", "p.yaml"])
    assert ran.exit_code != 0 and "in.jsonl.gz:2500" in ran.stderr


@pytest.mark.parametrize("spill_bytes", [64 << 20, 1], ids=["in_memory", "spilled_to_buckets"])
def test_streamed_ids_match_whole_table_ids_across_many_chunks(tmp_path, monkeypatch, spill_bytes):
    monkeypatch.setattr(reading, "BLOCK_BYTES", 256)  # a few rows per chunk, so repeats cross chunks
    monkeypatch.setattr(ingest_ids, "SPILL_BYTES", spill_bytes)
    rows = [{"prompt": f"p{i % 7}", "note": None if i < 9 else f"n{i % 3}"} for i in range(60)]
    _write_jsonl(tmp_path / "rows.jsonl", rows)
    got = ingest(SourceSpec(path=str(tmp_path / "rows.jsonl"), part_rows=8), ".").table
    expected = _row_ids(pa.Table.from_pylist([{"prompt": r["prompt"], "note": r["note"]} for r in rows]))
    assert got.column("id").to_pylist() == expected.to_pylist()
    assert sum(i.endswith("-2") for i in got.column("id").to_pylist()) >= 7
    assert got.schema.field("note").type == pa.string()  # null in the first chunks, strings later: unified


@pytest.mark.parametrize("spill_bytes", [64 << 20, 1], ids=["in_memory", "spilled_to_buckets"])
def test_a_given_id_repeated_in_another_chunk_names_both_lines(tmp_path, monkeypatch, spill_bytes):
    monkeypatch.setattr(reading, "BLOCK_BYTES", 256)
    monkeypatch.setattr(ingest_ids, "SPILL_BYTES", spill_bytes)
    rows = [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(40)]
    rows[33]["id"] = "r4"
    _write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(InputError) as err:
        ingest(SourceSpec(path=str(tmp_path / "rows.jsonl")), ".")
    assert err.value.where.endswith("rows.jsonl:34") and "rows.jsonl:5" in err.value.message


def test_hh_drops_across_chunks_keep_parts_of_exactly_part_rows(tmp_path, hh_file, monkeypatch):
    monkeypatch.setattr(reading, "BLOCK_BYTES", 64 << 10)
    spec = SourceSpec(path=str(hh_file), parse="hh", part_rows=300)
    got = ingest(spec, ".")
    assert got.table.num_rows == 2312 - got.rejected.num_rows and got.rejected.num_rows == 5
    from curate.ingest import ingest_source
    from curate.store import Store

    info = ingest_source(spec, ".", Store(str(tmp_path)))
    sizes = [Store(str(tmp_path)).read_part(info.key, i).num_rows for i in range(info.n_parts)]
    assert sizes[:-1] == [300] * (info.n_parts - 1) and sum(sizes) == info.rows == got.table.num_rows


def test_model_cache_closes_the_least_recently_used_model_when_a_new_one_would_not_fit(monkeypatch):
    from curate.backends import cache

    closed: list[str] = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    monkeypatch.setattr(cache, "_construct", lambda kind, model, options: Fake(model))
    monkeypatch.setattr(cache, "needed_bytes", lambda kind, model, options: ("cpu", 6))
    free = {"cpu": 20}
    monkeypatch.setattr(cache, "free_bytes", lambda where: free[where])
    cache.close_backends()
    a, b = cache.open_backend("vllm", "a"), cache.open_backend("vllm", "b")
    assert cache.open_backend("vllm", "a") is a and closed == []  # reused, and now the most recent
    free["cpu"] = 4  # the next model would not fit: the least recently used goes first
    cache.open_backend("vllm", "c")
    assert closed == ["b", "a"] and cache.loaded() == [("vllm", "c")]
    cache.close_backends()
    assert closed == ["b", "a", "c"]


def test_resources_and_a_pool_sized_to_share_one_gpu(monkeypatch):
    from curate.backends import cache
    from curate.backends.params import LoadedModels, ModelParams
    from curate.registry import get_stage

    judge = get_stage("judges.self_reward")
    local = judge(judge.Params(model="smollm2-135m-instruct"))
    remote = judge(judge.Params(model="m", backend="openai", base_url="http://127.0.0.1:1/v1"))
    monkeypatch.setattr(cache, "cuda_available", lambda: False)
    assert local.resources() == {} and remote.resources() == {}
    assert "gpu_memory_utilization" not in LoadedModels(ModelParams(), 0, pool_size=2).options()
    monkeypatch.setattr(cache, "cuda_available", lambda: True)
    assert local.resources() == {"GPU": 1} and remote.resources() == {}
    assert get_stage("filters.nonempty")().resources() == {}
    assert LoadedModels(ModelParams(), 0, pool_size=2).options()["gpu_memory_utilization"] == 0.45
    assert "gpu_memory_utilization" not in LoadedModels(ModelParams(), 0, pool_size=1).options()
