"""The first segment computed during ingest (`curate.fused`): the same output as computing it after
the ingest, and every part whose input changed at the end of the ingest computed again."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curate.fused as fused
import curate.runner as runner
from curate import reading
from curate.config import parse_pipeline
from curate.contract import Stage, Verdict
from curate.errors import StageError
from curate.registry import register
from curate.runner import run_pipeline

CHEAP = """
source: {{path: {src}, part_rows: {part_rows}}}
output: {out}
stages:
  - stage: filters.nonempty
    params: {{columns: [prompt, chosen, rejected]}}
  - stage: filters.length
    params: {{columns: [chosen], max_chars: {max_chars}}}
  - stage: core.identity
"""


@register
class FailsOnRow(Stage):
    """Raises on the row whose chosen reply is 'boom' (a bug in a user's stage). Example: - stage: test.fails_on_boom"""

    name = "test.fails_on_boom"
    kind = "filter"

    def keep(self, table: pa.Table) -> Verdict:
        if "boom" in table.column("chosen").to_pylist():
            raise ValueError("cannot handle 'boom'")
        return Verdict(table, pa.array([True] * table.num_rows), pa.nulls(table.num_rows, pa.string()))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i}" if i % 11 else "", "chosen": "c" * (i % 40), "rejected": f"r{i}"} for i in range(n)]


def _run(tmp_path: Path, name: str, src: Path, monkeypatch, fuse: bool, part_rows: int = 50, max_chars: int = 30) -> dict:
    """Run the cheap pipeline into tmp_path/name; `fuse=False` computes the first segment after the ingest."""
    text = CHEAP.format(src=src, out=tmp_path / name, part_rows=part_rows, max_chars=max_chars)
    with monkeypatch.context() as patch:
        if not fuse:
            patch.setattr(runner, "first_segment_feed", lambda *args: None)
        return run_pipeline(parse_pipeline(text, str(tmp_path / f"{name}.yaml")))


@pytest.fixture
def accepted(monkeypatch) -> list[list[int]]:
    """Part indexes the feed handed over for commit, one list per run."""
    seen: list[list[int]] = []
    real = fused.FirstSegmentFeed.accepted

    def spy(self, info):
        results = real(self, info)
        seen.append([r.index for r in results])
        return results

    monkeypatch.setattr(fused.FirstSegmentFeed, "accepted", spy)
    return seen


def _published(out: Path) -> tuple[pa.Table, dict[str, list[str]]]:
    rejects = {d.name: sorted(pq.read_table(d).column("id").to_pylist()) for d in (out / "rejects").iterdir()}
    return pq.read_table(out / "data"), rejects


def _funnel(stats: dict) -> list[tuple]:
    return [(s["stage_id"], s["rows_in"], s["rows_out"], s["dropped"], s["parts_computed"]) for s in stats["stages"]]


def test_first_segment_during_ingest_matches_computing_it_afterwards(tmp_path, monkeypatch, accepted, caplog):
    _write_jsonl(tmp_path / "rows.jsonl", _rows(400))
    with caplog.at_level("INFO", logger="curate.progress"):
        fused_stats = _run(tmp_path, "fused", tmp_path / "rows.jsonl", monkeypatch, fuse=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("✓")]
    assert len(lines) == 3 and not any("cached" in line for line in lines)  # computed in this run, if during ingest
    after_stats = _run(tmp_path, "after", tmp_path / "rows.jsonl", monkeypatch, fuse=False)
    assert accepted == [list(range(8))]  # every part of the first run was computed during its ingest
    data, rejects = _published(tmp_path / "fused")
    data_after, rejects_after = _published(tmp_path / "after")
    assert data.equals(data_after) and rejects == rejects_after
    assert data.num_rows and set(rejects) == {"nonempty", "length"}
    assert _funnel(fused_stats) == _funnel(after_stats)
    again = _run(tmp_path, "fused", tmp_path / "rows.jsonl", monkeypatch, fuse=True)
    assert all(s["parts_computed"] == 0 for s in again["stages"])  # resumed: nothing computed twice
    assert not list((tmp_path / "fused").rglob("attempts/*"))


def test_parts_whose_ids_were_fixed_at_the_end_are_computed_again(tmp_path, monkeypatch, accepted):
    monkeypatch.setattr(reading, "BLOCK_BYTES", 512)  # several chunks per part
    rows = [{"prompt": f"q{i % 60}", "chosen": "fine", "rejected": "bad"} for i in range(100)]  # 60-99 repeat 0-39
    _write_jsonl(tmp_path / "rows.jsonl", rows)
    _run(tmp_path, "fused", tmp_path / "rows.jsonl", monkeypatch, fuse=True, part_rows=25)
    _run(tmp_path, "after", tmp_path / "rows.jsonl", monkeypatch, fuse=False, part_rows=25)
    assert accepted == [[0, 1]]  # parts 2 and 3 hold the repeats: their ids got "-2" after the feed took them
    data, rejects = _published(tmp_path / "fused")
    assert data.equals(_published(tmp_path / "after")[0])
    ids = data.column("id").to_pylist()
    assert sum(i.endswith("-2") for i in ids) == 40 and len(set(ids)) == 100


def test_a_column_typed_only_later_in_the_source_discards_what_the_feed_computed(tmp_path, monkeypatch, accepted):
    monkeypatch.setattr(reading, "BLOCK_BYTES", 512)
    rows = [{"prompt": f"q{i}", "chosen": "fine", "rejected": "bad", "note": None if i < 60 else f"n{i}"} for i in range(100)]
    _write_jsonl(tmp_path / "rows.jsonl", rows)
    _run(tmp_path, "fused", tmp_path / "rows.jsonl", monkeypatch, fuse=True, part_rows=25)
    _run(tmp_path, "after", tmp_path / "rows.jsonl", monkeypatch, fuse=False, part_rows=25)
    assert accepted == [[]]  # planned over a null `note`, ingested as strings: nothing computed early is kept
    data = _published(tmp_path / "fused")[0]
    assert data.schema.field("note").type == pa.string() and data.equals(_published(tmp_path / "after")[0])


def test_a_stage_failing_during_ingest_fails_the_run_as_before_and_keeps_the_source(tmp_path, monkeypatch, accepted):
    rows = [{"prompt": f"q{i}", "chosen": "boom" if i == 130 else "fine", "rejected": "bad"} for i in range(200)]
    _write_jsonl(tmp_path / "rows.jsonl", rows)
    text = f"source: {{path: rows.jsonl, part_rows: 50}}\noutput: {tmp_path / 'out'}\nstages:\n  - stage: test.fails_on_boom\n"
    pipeline = parse_pipeline(text, str(tmp_path / "p.yaml"))
    with pytest.raises(StageError) as err:
        run_pipeline(pipeline)
    assert "fails_on_boom" in str(err.value.where) and "part 2" in err.value.message and "boom" in err.value.message
    assert {0, 1} <= set(accepted[0]) <= {0, 1, 3}  # parts computed before the failing one (or beside it) are kept
    [source] = [p for p in (tmp_path / "out" / "parts").iterdir() if (p / "source.json").exists()]
    assert len((source / "manifest.jsonl").read_text().splitlines()) == 4  # the whole source is committed
    assert not list((tmp_path / "out").rglob("attempts/*"))


def test_compressed_source_parts_change_no_key_and_no_row(tmp_path, monkeypatch):
    rows = [{"prompt": f"q{i}", "chosen": "a long and repetitive reply " * 20, "rejected": "no"} for i in range(200)]
    _write_jsonl(tmp_path / "rows.jsonl", rows)
    runs = {}
    for compress in (False, True):
        out = tmp_path / f"out-{compress}"
        text = (f"source: {{path: rows.jsonl, part_rows: 50, compress_parts: {str(compress).lower()}}}\n"
                f"output: {out}\nstages:\n  - stage: core.identity\n")
        run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")))
        [source] = [p for p in (out / "parts").iterdir() if (p / "source.json").exists()]
        runs[compress] = (source.name, sum(f.stat().st_size for f in source.glob("part-*.arrow")), pq.read_table(out / "data"))
    assert runs[True][0] == runs[False][0]  # the same source key: stored either way, the rows are the same
    assert runs[True][1] < runs[False][1] / 2  # LZ4 on repetitive text
    assert runs[True][2].equals(runs[False][2])
