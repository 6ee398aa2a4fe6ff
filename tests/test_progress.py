"""Progress inside stages: rows done, rows/s and ETA move per request, before a part is committed."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from curate import progress
from curate.progress import SegmentProgress


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    return now


def test_rows_rate_and_eta_by_hand(clock):
    """Two parts of 4 rows; the stage makes two passes of 4 items per part (as CDR does: strong, then weak)."""
    bar = SegmentProgress("cdr", {"k": "cdr"}, {0: 4, 1: 4}, cached={}, cached_rows=0)
    assert bar.rows_done() == 0 and bar.rate() is None and bar.eta() is None
    assert bar.status().endswith("ETA –")
    clock[0] = 110.0  # a model load: not counted in the rate
    bar.work(0, expected=4)
    clock[0] = 112.0
    bar.work(0, done=2)  # 2 of 4 items: half of the part's 4 rows
    assert bar.rows_done() == 2 and bar.rate() == 1.0 and bar.eta() == 6.0
    bar.work(0, expected=4)  # the second pass: 8 items asked for; the bar does not go back
    assert bar.rows_done() == 2
    clock[0] = 114.0
    bar.work(0, done=4)  # 6 of 8 items
    assert bar.rows_done() == 3
    bar.part_finished(0)
    assert bar.rows_done() == 4 and bar.items_per_row == 2.0
    bar.work(1, expected=4)  # part 1's first pass: 4 items, but 2 per row x 4 rows are expected
    clock[0] = 116.0
    bar.work(1, done=4)
    assert bar.rows_done() == 6 and bar.rate() == 1.0 and bar.eta() == 2.0
    assert bar.status() == "6.0/8 rows, 1.0 rows/s, 0:00:16 elapsed, ETA 0:00:02"


def test_the_decoding_share_of_running_requests_moves_the_bar(clock):
    """4 requests (one per row) decoding together: the share of their token budget used counts until they finish."""
    bar = SegmentProgress("generate", {"k": "generate"}, {0: 4}, cached={}, cached_rows=0)
    bar.work(0, expected=4)
    bar.work(0, running=4 * 0.25)  # a quarter of the budget decoded
    assert bar.rows_done() == 1.0
    bar.work(0, running=3 * 0.5)  # one request finished: it leaves the running share first...
    assert bar.rows_done() == 1.5
    bar.work(0, done=1)  # ...then counts as done
    assert bar.rows_done() == 2.5
    bar.work(0, running=0.0)  # the engine call ended early: the bar holds until the rest finishes
    assert bar.rows_done() == 2.5
    bar.work(0, done=3)
    assert bar.rows_done() == 4.0


@dataclass
class _Result:
    index: int
    record: dict
    load_seconds: dict = field(default_factory=dict)


def test_one_line_per_stage_counts_cached_and_computed_parts(clock, caplog):
    cached = {0: {"stages": {"a": {"rows_in": 5, "rows_out": 5, "dropped": {}, "seconds": 9.0},
                             "b": {"rows_in": 5, "rows_out": 4, "dropped": {"tie": 1}, "seconds": 1.0}}}}
    bar = SegmentProgress("gen > pairs", {"a": "gen", "b": "pairs"}, {1: 5}, cached=cached, cached_rows=5)
    assert bar.rows_done() == 5
    bar.committed(_Result(1, {"stages": {"a": {"rows_in": 5, "rows_out": 5, "dropped": {}, "seconds": 3.0},
                                         "b": {"rows_in": 5, "rows_out": 3, "dropped": {"tie": 2}, "seconds": 0.01}}},
                          {"gen": 2.0}))
    assert bar.rows_done() == 10
    with caplog.at_level("INFO", logger="curate.progress"):
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].split() == ["✓", "gen", "10", "→", "10", "rows", "5.0", "s,", "1.0", "rows/s", "(model", "load",
                                "2.0", "s);", "1", "of", "2", "parts", "cached"]
    assert lines[1].split()[:6] == ["✓", "pairs", "10", "→", "7", "rows"] and lines[1].endswith("dropped: tie 3")


def test_hooks_do_nothing_outside_a_listened_part():
    progress.work_started(5)
    progress.work_done(5)
    with progress.computing_part("no-such-segment", 0), progress.activity("loading"):
        progress.work_done()
    assert progress._CURRENT.get() is None


PROMPTS = ["Name a fruit.", "What is 2 + 2?", "Say hi in French.", "Name a colour.", "Why is ice cold?", "Count to 3."]


def test_a_model_stage_moves_the_bar_per_request_before_its_part_is_committed(tmp_path, monkeypatch):
    """One part of 6 prompts through the real vLLM engine: the bar moves as requests finish, and the
    manifest on disk does not list the part yet at any of those moments."""
    pytest.importorskip("vllm")
    from curate.config import parse_pipeline
    from curate.runner import run_pipeline
    from curate.store import Store

    rows = [json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)]
    (tmp_path / "p.jsonl").write_text("".join(rows))
    text = """source: {path: p.jsonl, part_rows: 6}
stages:
  - stage: generators.responses
    id: gen
    params: {model: smollm2-135m-instruct, dtype: bfloat16, max_model_len: 512, batch_size: 2,
             generation: {max_tokens: 16, n: 1, temperature: 0.7}}
"""
    out = tmp_path / "out"
    seen: list[tuple[float, str, bool]] = []
    original = SegmentProgress.work

    def recording(self, index, expected=0, done=0, running=None):
        original(self, index, expected=expected, done=done, running=running)
        key = next(k for k, v in progress._LISTENING.items() if v is self)
        seen.append((self.rows_done(), self.status(), index in Store(str(out)).finished(key)))

    monkeypatch.setattr(SegmentProgress, "work", recording)
    stats = run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(out))
    assert stats["rows_out"] == 6
    before_commit = [(rows, status) for rows, status, committed in seen if not committed]
    assert len(before_commit) == len(seen) >= 6  # a call per request and per engine step, all before the commit
    moving = sorted({rows for rows, _ in before_commit if 0 < rows < 6})
    assert len(moving) >= 4, before_commit  # the bar moved at least 4 times inside the part
    with_eta = [status for rows, status in before_commit if 0 < rows < 6 and "ETA 0:" in status]
    assert with_eta, before_commit  # a rate and an ETA while the part was running
    rows_in_order = [rows for rows, _ in before_commit]
    assert rows_in_order == sorted(rows_in_order)  # never goes back


def test_a_failed_segment_prints_no_stage_lines(caplog):
    with caplog.at_level("INFO", logger="curate.progress"), pytest.raises(RuntimeError):
        with progress.segment_progress("gen", {"k": "gen"}, {0: 3}, {}, 0, "seg-key"):
            assert "seg-key" in progress._LISTENING
            raise RuntimeError("the stage failed")
    assert "seg-key" not in progress._LISTENING and not [r for r in caplog.records if "✓" in r.getMessage()]
    with caplog.at_level("INFO", logger="curate.progress"):
        with progress.segment_progress("gen", {"k": "gen"}, {}, {0: {"stages": {"k": {"rows_in": 3, "rows_out": 3}}}},
                                       3, "seg-key"):
            pass
    assert [r.getMessage().split()[:6] for r in caplog.records] == [["✓", "gen", "3", "→", "3", "rows"]]
    assert caplog.records[0].getMessage().endswith("cached")


def test_a_long_ingest_logs_rows_read_and_parts_written(tmp_path, monkeypatch, caplog):
    from curate.config import parse_pipeline
    from curate.runner import run_pipeline
    from curate import reading

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)  # a line at every chunk
    monkeypatch.setattr(reading, "BLOCK_BYTES", 256)
    (tmp_path / "rows.jsonl").write_text("".join(f'{{"prompt": "q{i}", "chosen": "a", "rejected": "b"}}\n' for i in range(40)))
    text = f"source: {{path: rows.jsonl, part_rows: 10}}\noutput: {tmp_path / 'out'}\nstages:\n  - stage: core.identity\n"
    with caplog.at_level("INFO", logger="curate.progress"):
        run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ingesting rows.jsonl:")]
    assert len(lines) >= 4 and "40 rows read" not in lines[0]  # several chunks, counted as they are read
    counts = [int(line.split(": ")[1].split(" rows read")[0].replace(",", "")) for line in lines]
    assert counts == sorted(counts) and counts[-1] <= 40 and "parts written" in lines[-1]
