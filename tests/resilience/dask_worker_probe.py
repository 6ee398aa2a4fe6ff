"""A Dask worker preload for the worker-kill scenario: each task phase logs where it is, then pauses.

Loaded into every worker of a LocalCluster through the Dask config
(`DASK_DISTRIBUTED__WORKER__PRELOAD='["tests.resilience.dask_worker_probe"]'`), it wraps the task
functions of `curate.task` in that worker only. Each phase appends one line
`<pid> <phase> <key> <index>` to $CURATE_TEST_DASK_EVENTS and then pauses
$CURATE_TEST_DASK_PAUSE seconds, so a kill sent when the line appears lands inside that phase:
- `summarize`: a global stage's first fit pass over one part (before it reads the part);
- `compute`: a part task before its stages run (mid-part);
- `write`: a part's output written to a temporary file in its attempt folder, not yet fsynced
  nor renamed (the task's own commit step);
- `done`: the task returned its result, which is on its way to the driver (no pause).
Nothing here changes what a task computes or writes.

Example: DASK_DISTRIBUTED__WORKER__PRELOAD='["tests.resilience.dask_worker_probe"]' curate run p.yaml --workers 2
"""
from __future__ import annotations

import os
import time

import curate.store as store
import curate.task as task

EVENTS = os.environ.get("CURATE_TEST_DASK_EVENTS", "")
PAUSE = float(os.environ.get("CURATE_TEST_DASK_PAUSE", "0.3"))


def log_phase(phase: str, key: str, index: int, pause: bool = True) -> None:
    """Append one event line (one write on an O_APPEND file), then pause. Example: log_phase("compute", "ab12", 3)"""
    if EVENTS:
        fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {phase} {key} {index}\n".encode())
        finally:
            os.close(fd)
    if pause:
        time.sleep(PAUSE)


_compute_part, _write_attempt, _summarize_part = task.compute_part, task.write_attempt, task.summarize_part
_write_table = store.pq.write_table


def compute_part(part: task.PartTask) -> task.Computed:
    log_phase("compute", part.segment_key, part.index)
    return _compute_part(part)


def write_attempt(computed: task.Computed) -> task.PartResult:
    part = computed.task

    def write_table(table, where, *args, **kwargs):  # the attempt's data file: written, then the pause
        _write_table(table, where, *args, **kwargs)
        if isinstance(where, str) and os.path.basename(where).startswith("data.parquet.tmp-"):
            log_phase("write", part.segment_key, part.index)

    store.pq.write_table = write_table
    try:
        return _write_attempt(computed)
    finally:
        store.pq.write_table = _write_table


def run_part(part: task.PartTask) -> task.PartResult:
    result = write_attempt(compute_part(part))
    log_phase("done", part.segment_key, part.index, pause=False)
    return result


def summarize_part(summary: task.SummaryTask) -> str:
    log_phase("summarize", summary.stage.key, summary.index)
    return _summarize_part(summary)


# Tasks arrive pickled by reference (`curate.task.run_part`), so the worker resolves these names.
task.run_part, task.summarize_part, task.compute_part, task.write_attempt = run_part, summarize_part, compute_part, write_attempt
