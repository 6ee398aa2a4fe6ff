"""One task unit: `run_part(task) -> PartResult`, complete by itself, for any executor.

A `PartTask` is small and picklable: the segment's stages as specs (registry name, params,
renames, key and schemas), the part index, the store root and the key of any fitted state. The
task reads its input part from the store, runs the stages (each stage built and opened once per
process, models through the process-level backend cache), writes its output and rejects into a
fresh attempt folder (fsynced), and returns where they are with the part's record. It never
touches a manifest: the driver commits (`curate.store.Store.commit_files`). Generation requests
that finish are kept in a request log next to the attempt (`curate.requests`), so a task retried
after a crash does not redo them. Leaves out: where tasks run (`curate.executors`).

Example: result = run_part(task); result.record["rows_out"]
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curate.config import BoundStage
from curate.contract import REASON, StageOutput, Verdict, conform, with_reason
from curate.errors import CurateError, StageError
from curate.plan import PlannedStage, Segment, rename_in, rename_out
from curate.progress import activity, computing_part
from curate.requests import RequestLog, using_request_log
from curate.store import Store, write_parquet_atomic

log = logging.getLogger(__name__)


def _schema_bytes(schema: pa.Schema) -> bytes:
    return schema.serialize().to_pybytes()


@dataclass(frozen=True)
class StageTask:
    """A planned stage as plain data, rebuilt on the worker. Example: StageTask.of(planned).name"""

    id: str
    name: str
    params: dict[str, Any]
    seed: int
    inputs: dict[str, str]
    outputs: dict[str, str]
    key: str
    kind: str
    input_schema: bytes
    output_schema: bytes
    where: str = ""

    @classmethod
    def of(cls, planned: PlannedStage) -> "StageTask":
        """Example: StageTask.of(plan.stage("judge"))"""
        bound = planned.bound
        return cls(planned.id, bound.stage.name, bound.stage.params.model_dump(mode="json", context={"secrets": True}), bound.stage.seed,
                   dict(bound.inputs), dict(bound.outputs), planned.key, planned.kind,
                   _schema_bytes(planned.input_schema), _schema_bytes(planned.output_schema), bound.where)

    def build(self) -> PlannedStage:
        """The planned stage, from this process's cache or built from the registry."""
        planned = _STAGES.get(self.key)
        if planned is None:
            from curate.registry import get_stage

            cls = get_stage(self.name, where=self.where)
            stage = cls(cls.Params(**self.params), seed=self.seed, stage_id=self.id)
            bound = BoundStage(self.id, stage, dict(self.inputs), dict(self.outputs), self.where)
            planned = PlannedStage(bound, self.key, pa.ipc.read_schema(pa.py_buffer(self.input_schema)),
                                   pa.ipc.read_schema(pa.py_buffer(self.output_schema)))
            _STAGES[self.key] = planned
        return planned


@dataclass(frozen=True)
class PartTask:
    """Everything one part of one segment needs. Example: PartTask(root, seg.key, seg.parent_key, 0, stages)"""

    root: str
    segment_key: str
    parent_key: str
    index: int
    stages: tuple[StageTask, ...]
    state_key: str | None = None  # the fitted state of the segment's global stage
    rows: int = 0  # rows the input part holds (0: not known), for scheduling only

    @property
    def label(self) -> str:
        return f"part {self.index} of [{' > '.join(s.id for s in self.stages)}]"


@dataclass
class PartResult:
    """What a task made: its attempt's files and the record the manifest line will hold.

    Example: PartResult(0, "ab", "…/data.parquet", {}, {"rows_in": 10, "rows_out": 9, "stages": {}})
    """

    index: int
    segment_key: str
    data: str
    rejects: dict[str, str]
    record: dict[str, Any]
    load_seconds: dict[str, float] = field(default_factory=dict)  # stage id -> model load in this task
    worker: str = ""


# The process-level caches of built and opened stages -------------------------------------------

_STAGES: dict[str, PlannedStage] = {}
_OPENED: set[str] = set()
_OPENING = threading.Lock()  # two parts computed at once (curate.executors) open each stage once


def adopt_planned(stages: list[PlannedStage]) -> None:
    """Let tasks in this process use the driver's own stage objects (the local executor).

    Example: adopt_planned(plan.stages)
    """
    for planned in stages:
        _STAGES[planned.key] = planned


def open_stage(planned: PlannedStage) -> float:
    """Open a stage once per process; return the seconds it took (0 when it was open).

    Example: open_stage(plan.stage("judge")) -> 11.8
    """
    with _OPENING:
        if planned.key in _OPENED:
            return 0.0
        started = time.perf_counter()
        planned.bound.stage.open()
        _OPENED.add(planned.key)
        return time.perf_counter() - started


def close_stages(keys: list[str] | None = None) -> None:
    """Close the opened stages with these keys (all when None), freeing their models.

    Example: close_stages()  # at the end of a run
    """
    for key in list(_OPENED if keys is None else keys):
        if key in _OPENED:
            _OPENED.discard(key)
            _STAGES[key].bound.stage.close()
    if keys is None:
        _STAGES.clear()


# Running one stage on one table ----------------------------------------------------------------


def _split_verdict(verdict: Verdict, rows: int, stage_id: str) -> StageOutput:
    """Apply a filter's keep mask; dropped rows keep their reason (every one must have one)."""
    keep = verdict.keep.combine_chunks() if isinstance(verdict.keep, pa.ChunkedArray) else verdict.keep
    if len(keep) != rows or len(verdict.reason) != rows:
        raise StageError(f"returned a mask of {len(keep)} rows for {rows} input rows", where=f"stage '{stage_id}'")
    keep = pc.fill_null(keep, False)
    drop = pc.invert(keep)
    reasons = pc.filter(verdict.reason, drop)
    if reasons.null_count:
        raise StageError("dropped rows without giving a reason", where=f"stage '{stage_id}'")
    dropped = verdict.table.filter(drop)
    return StageOutput(verdict.table.filter(keep), with_reason(dropped, reasons) if dropped.num_rows else None)


def run_stage(planned: PlannedStage, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
    """Run one planned stage on one table, with renames, mask handling and schema conformance.

    Example: run_stage(plan.stage("length"), part).table
    """
    bound, stage = planned.bound, planned.bound.stage
    into = rename_in(bound)
    view = table.rename_columns([into.get(n, n) for n in table.column_names]) if into else table
    if planned.kind == "filter":
        result: StageOutput | Verdict = stage.keep(view)
    elif planned.kind == "global":
        result = stage.apply(view, state)
    else:
        result = stage.apply(view)
    if isinstance(result, Verdict):
        result = _split_verdict(result, view.num_rows, planned.id)
    back = rename_out(bound)
    out = result.table.rename_columns([back.get(n, n) for n in result.table.column_names]) if back else result.table
    out = conform(out, planned.output_schema, planned.id)
    rejected = result.rejected
    if rejected is not None and rejected.num_rows:
        undo = dict(bound.inputs)
        rejected = rejected.rename_columns([undo.get(n, n) for n in rejected.column_names]) if undo else rejected
        # Filters reject rows of their output (with any score columns); maps reject input rows,
        # model stages either (a judge that relabels rejects its annotated output).
        names = set(rejected.column_names) - {REASON}
        base = planned.output_schema if names == set(planned.output_schema.names) else planned.input_schema
        rejected = conform(rejected, base.append(pa.field(REASON, pa.string())), planned.id)
    else:
        rejected = None
    return StageOutput(out, rejected, dict(result.counters))


# The task ---------------------------------------------------------------------------------------


def _run_stages(task: PartTask, stages: list[PlannedStage], table: pa.Table, state: pa.Table | None,
                requests: RequestLog) -> tuple[pa.Table, dict[str, pa.Table], dict[str, Any]]:
    record: dict[str, Any] = {"rows_in": table.num_rows, "stages": {}}
    rejects: dict[str, pa.Table] = {}
    for planned in stages:
        started = time.perf_counter()
        rows_in = table.num_rows
        try:
            with using_request_log(requests.scope(planned.key)):
                result = run_stage(planned, table, state if planned.kind == "global" else None)
        except CurateError as exc:
            exc.where = exc.where or f"stage '{planned.id}'"
            exc.message = f"{exc.message} (part {task.index})"
            raise
        except Exception as exc:
            raise StageError(f"failed on part {task.index}: {type(exc).__name__}: {exc}",
                             where=f"stage '{planned.id}'") from exc
        table = result.table
        dropped = Counter(result.rejected.column(REASON).to_pylist()) if result.rejected is not None else Counter()
        if result.rejected is not None:
            rejects[planned.key] = result.rejected
        counters = dict(result.counters)
        counters.update(requests.scope(planned.key).counters())
        record["stages"][planned.key] = {
            "rows_in": rows_in, "rows_out": table.num_rows, "dropped": dict(dropped),
            "seconds": time.perf_counter() - started, "counters": counters,
        }
    record["rows_out"] = table.num_rows
    from curate.card_sections import length_counts

    lengths = length_counts(table)  # for the dataset card: the rows are here already
    if lengths is not None:
        record["length"] = lengths
    return table, rejects, record


@dataclass
class Computed:
    """A part's output in memory, before it is written. Example: computed = compute_part(task)"""

    task: PartTask
    table: pa.Table
    rejects: dict[str, pa.Table]
    record: dict[str, Any]
    load_seconds: dict[str, float]


def compute_part(task: PartTask, table: pa.Table | None = None) -> Computed:
    """The first half of `run_part`: read the input part (unless `table` is it) and run the stages; write nothing.

    Example: compute_part(task).table.num_rows
    """
    with computing_part(task.segment_key, task.index):  # the stages' work moves the driver's bar (curate.progress)
        return _compute(task, table)


def _compute(task: PartTask, table: pa.Table | None) -> Computed:
    store = Store(task.root)
    stages = [s.build() for s in task.stages]
    with activity("loading models"):
        load = {planned.id: open_stage(planned) for planned in stages}
    state = store.read_state(task.state_key) if task.state_key else None
    if task.state_key and state is None:
        raise StageError(f"the fitted state {task.state_key} is missing from the store", where=task.label)
    if table is None:
        table = store.read_part(task.parent_key, task.index)
    requests = RequestLog(store.request_log_path(task.segment_key, task.index))
    try:
        table, rejects, record = _run_stages(task, stages, table, state, requests)
    finally:
        requests.close()
    return Computed(task, table, rejects, record, {k: v for k, v in load.items() if v})


def write_attempt(computed: Computed) -> PartResult:
    """The second half of `run_part`: write output and rejects into a fresh attempt folder, fsynced.

    Example: write_attempt(compute_part(task)).data -> '…/attempts/00000.tmp-…/data.parquet'
    """
    task = computed.task
    folder = Store(task.root).attempt_dir(task.segment_key, task.index)
    data = os.path.join(folder, "data.parquet")
    write_parquet_atomic(computed.table, data, durable=True)
    reject_files = {}
    for stage_key, rejected in computed.rejects.items():
        path = os.path.join(folder, "rejects", f"{stage_key}.parquet")
        write_parquet_atomic(rejected, path, durable=True)
        reject_files[stage_key] = path
    return PartResult(task.index, task.segment_key, data, reject_files, computed.record, computed.load_seconds,
                      socket.gethostname())


def run_part(task: PartTask) -> PartResult:
    """Compute one part of one segment into a fresh attempt folder; commit nothing.

    Example: run_part(PartTask("out/q", seg_key, parent_key, 0, stages)).data
    """
    return write_attempt(compute_part(task))


@dataclass(frozen=True)
class SummaryTask:
    """First pass of a global stage's fit over one input part. Example: summarize_part(SummaryTask(...))"""

    root: str
    stage: StageTask
    parent_key: str
    index: int
    columns: tuple[str, ...]  # the fit columns, in the table's names


def summarize_part(task: SummaryTask) -> str:
    """Read the fit columns of one part, reduce them with the stage's `summarize`, store the summary.

    Returns the summary file's path (under the stage key), which the driver's `fit` reads.
    Example: summarize_part(task) -> 'out/q/parts/<stage key>/summaries/part-00000.parquet'
    """
    store = Store(task.root)
    planned = task.stage.build()
    into = rename_in(planned.bound)
    part = store.read_part(task.parent_key, task.index, list(task.columns))
    part = part.rename_columns([into.get(n, n) for n in part.column_names]) if into else part
    path = store.summary_path(planned.key, task.index)
    write_parquet_atomic(planned.bound.stage.summarize(part), path)
    return path


def segment_tasks(root: str, segment: Segment, indexes: list[int], state_key: str | None,
                  rows: dict[int, int] | None = None) -> list[PartTask]:
    """The tasks of the given parts of a segment (`rows`: rows in each input part, where known).

    Example: segment_tasks("out/q", seg, [0, 1], None, {0: 16, 1: 16})
    """
    stages = tuple(StageTask.of(p) for p in segment.stages)
    rows = rows or {}
    return [PartTask(root, segment.key, segment.parent_key, i, stages, state_key, rows.get(i, 0)) for i in indexes]


__all__ = ["Computed", "PartResult", "PartTask", "StageTask", "SummaryTask", "summarize_part", "adopt_planned", "close_stages", "compute_part",
           "open_stage", "run_part", "run_stage", "segment_tasks", "write_attempt"]
