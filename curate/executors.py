"""Executors decide where part tasks run; what a task does is `curate.task.run_part` alone.

`Executor.map(fn, tasks)` yields each task's result as it is ready (any order) and raises the
first task error after the tasks already running have finished. `LocalExecutor` (the default)
computes tasks in this process, one after the other, so pdb and tracebacks work as usual;
writing a computed part runs on background threads while the next part computes. One exception
(`overlap_parts`, off by default): when every model stage of a segment runs on one engine that
takes requests from several threads into one batch (vLLM, `curate.backends.engine_streams`),
several parts compute at once, each on its own thread: as many as fill a batch of BATCH_ROWS
rows (at least 2, at most MAX_AT_ONCE). So small parts still give the engine a full batch, and
the next part's requests join it while the current part's last ones drain. Measured here
(benchmarks/bench_generate.py): a decode step on CPU serves 64 sequences at ~0.88 of the
tokens/s it serves 256 at, and two 64-sequence parts at once gained little; a part boundary
alone costs less than the batch size does. This thread steps the engine for the parts while
it waits for them (torch decodes slower on a thread that did not build the engine).
Off by default: which requests share a batch then depends on thread timing, and a sampled
token can depend on its batch, so runs (and executors) would no longer give identical output.
The Dask executor lives in `curate.executors_dask`.

Example: for result in LocalExecutor().map(run_part, tasks): store.commit_files(...)
"""
from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, Iterator, Protocol

from curate.backends.engine_streams import pump_engines, pumping
from curate.task import Computed, PartResult, PartTask, adopt_planned, compute_part, open_stage, run_part, write_attempt

WRITERS = 2  # background threads that encode and write parts (Parquet encoding releases the GIL)
BATCH_ROWS = 256  # rows of parts computed at once on one engine: vLLM's default batch on CPU (max_num_seqs)
MAX_AT_ONCE = 8  # most parts computed at once (each holds its table in memory)


class Executor(Protocol):
    """Where tasks run. Example: executor.map(run_part, tasks)"""

    name: str

    def map(self, fn: Callable[[PartTask], PartResult], tasks: list[PartTask]) -> Iterator[PartResult]:
        """Run `fn` on every task; yield results as they are ready."""
        ...

    def prepare(self, stages: Iterable[Any], root: str) -> None:
        """Called once per run with the plan's stages and the store's (absolute) root, before any task."""
        ...

    def release(self, stage_keys: list[str]) -> None:
        """A segment is done: its stages may free what they hold where the tasks ran."""
        ...

    def close(self) -> None:
        """The run is over (or failed): free every model and worker."""
        ...


def shares_one_engine(task: PartTask) -> bool:
    """Whether a segment's parts may compute at once: it has model stages, all on one engine that
    takes calls from two threads (a model cache closing one engine for another while a part still
    used it would break a part; stages without a model gain nothing from threads).

    Example: shares_one_engine(tasks[0]) -> True for generator and judge on the same vLLM model
    """
    models = [planned.bound.stage for planned in (s.build() for s in task.stages) if planned.kind == "model"]
    if not models or not all(hasattr(stage, "engines") for stage in models):
        return False
    engines = set().union(*(stage.engines() for stage in models))
    return len(engines) == 1 and all(stage.engines_shared_across_threads() for stage in models)


def parts_at_once(tasks: list[PartTask]) -> int:
    """How many parts to compute at once on one engine: enough to fill BATCH_ROWS rows, 2 to MAX_AT_ONCE.

    Example: parts_at_once(tasks_of_16_rows) -> 8; parts_at_once(tasks_of_10000_rows) -> 2
    """
    rows = max((task.rows for task in tasks), default=0) or BATCH_ROWS
    return max(2, min(MAX_AT_ONCE, -(-BATCH_ROWS // rows)))


def open_stages_here(task: PartTask) -> dict[str, float]:
    """Open a segment's stages on this thread (its engine is built, and stepped, here); load seconds by stage id.

    Example: open_stages_here(tasks[0]) -> {'gen': 11.2}
    """
    loads = {planned.id: open_stage(planned) for planned in (s.build() for s in task.stages)}
    return {stage_id: seconds for stage_id, seconds in loads.items() if seconds}


def computed_together(tasks: list[PartTask], at_once: int = 2, loads: dict[str, float] | None = None) -> Iterator[Computed]:
    """`compute_part` of each task, `at_once` of them running on daemon threads, yielded in task order.

    This thread steps the engines for them while it waits (`curate.backends.engine_streams.pumping`).
    A part starts as soon as an earlier one is handed over; `loads` (model load seconds spent
    before) are added to the first part's. After a failure, the parts already running finish
    before the error is raised (so their requests are logged, `curate.requests`).
    Example: for computed in computed_together(tasks): write_attempt(computed)
    """
    queue = iter(tasks)
    running: deque[Future] = deque(_start(task) for task in itertools.islice(queue, at_once))
    while running:
        head = running.popleft()
        with pumping():
            while not head.done():
                if not pump_engines():
                    wait([head], timeout=0.005)
        try:
            computed = head.result()
        except BaseException:
            for other in running:
                other.exception()  # wait for it; its own error, if any, is not the first one
            raise
        task = next(queue, None)
        if task is not None:
            running.append(_start(task))
        if loads:
            computed.load_seconds = {**loads, **computed.load_seconds}
            loads = None
        yield computed


def _start(task: PartTask) -> Future:
    """compute_part(task) on a daemon thread (an interrupted run does not wait for it to end)."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(compute_part(task))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)

    threading.Thread(target=work, name=f"curate-part-{task.index}", daemon=True).start()
    return future


class LocalExecutor:
    """In this process; one part after the other unless `overlap_parts` applies (module docstring).

    Example: LocalExecutor().map(run_part, tasks)
    """

    name = "local"

    def __init__(self, overlap_parts: bool = False):
        self.overlap_parts = overlap_parts

    def prepare(self, stages: Iterable[Any], root: str) -> None:
        adopt_planned(list(stages))  # tasks here use the driver's own stage objects

    def map(self, fn: Callable[[PartTask], PartResult], tasks: list[PartTask]) -> Iterator[PartResult]:
        """Compute in this thread, one part after the other (or several at once, module docstring);
        `run_part`'s writing half runs on WRITERS background threads, so writing part i overlaps
        computing part i+1."""
        if fn is not run_part:
            for task in tasks:
                yield fn(task)
            return
        together = self.overlap_parts and len(tasks) > 1 and shares_one_engine(tasks[0])
        if together:
            computing = computed_together(tasks, parts_at_once(tasks), open_stages_here(tasks[0]))
        else:
            computing = (compute_part(task) for task in tasks)
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="curate-write") as pool:
            try:
                for computed in computing:
                    pending.append(pool.submit(write_attempt, computed))
                    while len(pending) >= WRITERS:
                        yield pending.popleft().result()
            except Exception:
                while pending:  # parts computed before a failure are still handed over for commit
                    yield pending.popleft().result()
                raise
            while pending:
                yield pending.popleft().result()

    def release(self, stage_keys: list[str]) -> None:
        """Nothing: models stay in the process cache, so a later stage on the same model reuses it;
        the cache closes the least recently used one when a new model would not fit."""

    def close(self) -> None:
        from curate.task import close_stages

        close_stages()


def make_executor(kind: str = "local", workers: int | None = None, scheduler: str | None = None,
                  overlap_parts: bool = False) -> Executor:
    """The executor a run asks for: `local`, or `dask` (a LocalCluster of `workers`, or `scheduler`).

    `DASK_SCHEDULER_ADDRESS` in the environment stands for `scheduler`. Example: make_executor("dask", workers=2)
    """
    if kind == "local":
        return LocalExecutor(overlap_parts=overlap_parts)
    from curate.executors_dask import DaskExecutor

    return DaskExecutor(scheduler=scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS"), workers=workers)
