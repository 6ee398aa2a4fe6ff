"""Executors decide where part tasks run; what a task does is `curate.task.run_part` alone.

`Executor.map(fn, tasks)` yields each task's result as it is ready (any order) and raises the
first task error after the tasks already running have finished. `LocalExecutor` (the default)
computes tasks in this process, one after the other, so pdb and tracebacks work as usual;
writing a computed part runs on background threads while the next part computes. The Dask
executor lives in `curate.executors_dask`.

Example: for result in LocalExecutor().map(run_part, tasks): store.commit_files(...)
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Protocol

from curate.task import PartResult, PartTask, adopt_planned, compute_part, run_part, write_attempt

WRITERS = 2  # background threads that encode and write parts (Parquet encoding releases the GIL)


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


class LocalExecutor:
    """In this process, sequentially (debuggable with pdb). Example: LocalExecutor().map(run_part, tasks)"""

    name = "local"

    def prepare(self, stages: Iterable[Any], root: str) -> None:
        adopt_planned(list(stages))  # tasks here use the driver's own stage objects

    def map(self, fn: Callable[[PartTask], PartResult], tasks: list[PartTask]) -> Iterator[PartResult]:
        """Compute in this thread, one part after the other; `run_part`'s writing half runs on
        WRITERS background threads, so writing part i overlaps computing part i+1."""
        if fn is not run_part:
            for task in tasks:
                yield fn(task)
            return
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="curate-write") as pool:
            try:
                for task in tasks:
                    pending.append(pool.submit(write_attempt, compute_part(task)))
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


def make_executor(kind: str = "local", workers: int | None = None, scheduler: str | None = None) -> Executor:
    """The executor a run asks for: `local`, or `dask` (a LocalCluster of `workers`, or `scheduler`).

    `DASK_SCHEDULER_ADDRESS` in the environment stands for `scheduler`. Example: make_executor("dask", workers=2)
    """
    if kind == "local":
        return LocalExecutor()
    from curate.executors_dask import DaskExecutor

    return DaskExecutor(scheduler=scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS"), workers=workers)
