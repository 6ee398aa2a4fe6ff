"""Orchestration of a run: ingest, plan, run each segment's missing parts, commit, publish, stats.

The driver (this module) is the one writer: it ingests the source into stored parts
(`curate.ingest`), fits global stages, hands part tasks (`curate.task.run_part`) to an executor
(`curate.executors`), and commits each result (`Store.commit_files`: renames, then the manifest
line). A part already in a manifest is never recomputed, so a killed run resumes where it
stopped and an edited stage re-runs only its own segment and those after it. At the end it
publishes the output (`curate.publish`) and writes the funnel (`curate.stats`, typed as
`curate.record.RunStats`). Where each piece lives: ingest.py (the source), task.py (one part),
executors.py (where parts run), store.py (the store and its commit), publish.py, stats.py,
record.py (the run record and its reader), requests.py (the request-level cache), fused.py
(the first segment's cheap stages run on each source part as it is ingested).

Example: run_pipeline(load_pipeline("pipelines/quickstart.yaml"))["rows_out"]
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curate.card import write_card
from curate.judges.icai_library import write_icai_artifacts
from curate.config import Pipeline
from curate.errors import ConfigError, CurateError
from curate.executors import Executor, make_executor
from curate.fused import first_segment_feed
from curate.ingest import SOURCE_ID, ingest_source, preview_source, read_source_info, source_key
from curate.plan import Plan, Segment, SourceInfo, build_plan, rename_in
from curate.progress import live_bars, segment_progress
from curate.publish import clean_stale, publish
from curate.redaction import redact
from curate.record import PIPELINE_FILE, PLAN_FILE, STATS_FILE
from curate.stats import RunLog, collect_stats
from curate.store import Store, write_text_atomic
from curate.task import PartResult, StageTask, SummaryTask, run_part, segment_tasks, summarize_part

log = logging.getLogger(__name__)


def fit_state(plan: Plan, store: Store, segment: Segment, executor: Executor, run_log: RunLog) -> str:
    """Fit the segment's global stage once, in two passes; store the state under its key.

    Each part's fit columns are reduced by the stage's `summarize` where tasks run (a summary
    file per part in the store); the driver combines the summaries with `fit`. No global stage
    reads whole rows into the driver. Example: fit_state(plan, store, seg, LocalExecutor(), RunLog())
    """
    planned = segment.global_stage
    if store.read_state(planned.key) is not None:
        return planned.key
    stage = planned.bound.stage
    into = rename_in(planned.bound)
    wanted = stage.fit_columns(pa.schema([f.with_name(into.get(f.name, f.name)) for f in planned.input_schema]))
    back = {v: k for k, v in into.items()}
    columns = tuple(back.get(c, c) for c in wanted)
    log.debug("%s: fitting over %d parts", planned.id, plan.source.n_parts)
    started = time.perf_counter()
    spec = StageTask.of(planned)
    tasks = [SummaryTask(store.root, spec, segment.parent_key, i, columns) for i in range(plan.source.n_parts)]
    paths = sorted(executor.map(summarize_part, tasks))  # part order, whatever order they finished in
    state = stage.fit(pq.read_table(path) for path in paths)
    seconds = time.perf_counter() - started
    store.write_state(planned.key, state.replace_schema_metadata({"fit_seconds": repr(seconds)}))
    shutil.rmtree(os.path.dirname(paths[0]), ignore_errors=True)
    run_log.add_fit(planned.id, seconds)
    return planned.key


def _commit(store: Store, result: PartResult, run_log: RunLog, stage_ids: dict[str, str]) -> None:
    """Commit one task's attempt (once), fold it into this run's log, drop the attempt's leftovers."""
    if store.commit_files(result.segment_key, result.index, result.data, result.rejects, result.record):
        run_log.add(result, stage_ids)
        with contextlib.suppress(FileNotFoundError):
            os.remove(store.request_log_path(result.segment_key, result.index))
    shutil.rmtree(os.path.dirname(result.data), ignore_errors=True)


def run_segment(plan: Plan, store: Store, segment: Segment, executor: Executor, run_log: RunLog,
                ready: list[PartResult] | None = None) -> None:
    """Compute and commit the parts of a segment that are not committed yet.

    `ready`: parts this run computed already (the first segment's, during ingest: `curate.fused`);
    they are committed here and shown as computed, not cached.
    Example: run_segment(plan, store, plan.segments[0], LocalExecutor(), RunLog())
    """
    n_parts = plan.source.n_parts
    done = store.finished(segment.key)
    todo = [i for i in range(n_parts) if i not in done]
    stage_ids = {s.key: s.id for s in segment.stages}
    rows = {i: r.get("rows_out", 0) for i, r in store.finished(segment.parent_key).items()}  # rows into each part
    label = " > ".join(stage_ids.values())
    log.debug("segment %d/%d [%s]: %d parts cached, %d to compute", segment.index + 1, len(plan.segments), label,
              n_parts - len(todo), len(todo))
    with segment_progress(label, stage_ids, {i: rows.get(i, 0) for i in todo}, done,
                          sum(rows.get(i, 0) for i in done), segment.key) as progress:
        if not todo:
            return
        ready = [result for result in ready or [] if result.index in todo]
        for result in ready:
            _commit(store, result, run_log, stage_ids)
            progress.committed(result)
        todo = [i for i in todo if i not in {result.index for result in ready}]
        if todo:
            state_key = fit_state(plan, store, segment, executor, run_log) if segment.global_stage else None
            for result in executor.map(run_part, segment_tasks(store.root, segment, todo, state_key, rows)):
                _commit(store, result, run_log, stage_ids)
                progress.committed(result)
    store.discard_attempts(segment.key)  # every part is committed: what is left there was orphaned by a dead worker
    executor.release(list(stage_ids))


def prepare_out_dir(pipeline: Pipeline, out: str | None) -> str:
    """The run folder (`--out` over the YAML's `output`), created; a file there is an error.

    Example: prepare_out_dir(p, "out/q") -> 'out/q'
    """
    out_dir = out or pipeline.spec.output
    if not out_dir:
        raise ConfigError("no output folder: set 'output:' in the pipeline or pass --out", where=pipeline.path)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError("output path exists and is a file, not a folder", where=out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder: {exc.strerror}", where=out_dir) from None
    return out_dir


def _refresh(plan: Plan, store: Store, stage_ids: list[str]) -> None:
    """Forget the stored output of each named stage's segment and every segment after it."""
    ids = [s.id for s in plan.stages]
    for stage_id in stage_ids:
        if stage_id == SOURCE_ID:
            first = 0
            store.forget(plan.source.key)
        elif stage_id in ids:
            first = plan.stage(stage_id).segment
        else:
            close = difflib.get_close_matches(stage_id, ids + [SOURCE_ID], n=1)
            raise ConfigError(f"--refresh names no stage '{stage_id}' (stages: {', '.join(ids)})",
                              hint=close[0] if close else None)
        for segment in plan.segments[first:]:
            if segment.stages:
                store.forget(segment.key)
            for planned in segment.stages:
                store.forget(planned.key)


def source_info(pipeline: Pipeline, store: Store) -> SourceInfo:
    """The committed source's description, or a preview of its columns (sizes -1) when it is not ingested.

    What `plan` and `validate` use: never more than the first rows. Example: source_info(p, store).schema
    """
    spec, base = pipeline.spec.source, pipeline.base_dir
    key = source_key(spec, base)
    return read_source_info(store, key) or preview_source(spec, base, key)


def make_plan(pipeline: Pipeline, store: Store) -> Plan:
    """The plan over the source's columns, ingesting nothing. Example: make_plan(load_pipeline("p.yaml"), Store(tmp))"""
    return build_plan(pipeline, source_info(pipeline, store))


def run_pipeline(pipeline: Pipeline, out: str | None = None, refresh: list[str] | None = None,
                 executor: Executor | None = None) -> dict[str, Any]:
    """Run a pipeline (on the local executor unless another is given) and return its stats (also in stats.json).

    Example: run_pipeline(load_pipeline("pipelines/quickstart.yaml"))["rows_out"]
    """
    started = time.perf_counter()
    out_dir = prepare_out_dir(pipeline, out)
    if executor is None:
        spec = pipeline.spec.executor
        executor = make_executor(spec.kind, spec.workers, spec.scheduler, spec.overlap_parts)
    try:
        with _exclusive(out_dir):
            return _run_locked(pipeline, out_dir, refresh, started, executor)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc.filename, str):
            exc.filename = os.path.abspath(out_dir)  # Arrow's and fsync's disk-full errors name no file
        raise
    finally:
        executor.close()  # frees every model (and a LocalCluster), also when the run failed


@contextlib.contextmanager
def _exclusive(out_dir: str) -> Iterator[None]:
    """Hold an exclusive lock on the run folder, so two runs never write into one folder."""
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError("another curate run is using this output folder", where=out_dir) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ingest(pipeline: Pipeline, store: Store, run_log: RunLog, executor: Executor) -> tuple[SourceInfo, list[PartResult]]:
    """The committed source (ingested now unless it was), and first-segment parts computed meanwhile (`curate.fused`)."""
    spec, base = pipeline.spec.source, pipeline.base_dir
    key = source_key(spec, base)
    info = read_source_info(store, key)
    if info is not None:
        return info, []
    started = time.perf_counter()
    feed = first_segment_feed(pipeline, store, key, executor.name)
    try:
        info = ingest_source(spec, base, store, key, feed)
    except BaseException:
        if feed is not None:
            feed.abandon()
        raise
    run_log.source_seconds = time.perf_counter() - started
    return info, feed.accepted(info) if feed is not None else []


def _run_locked(pipeline: Pipeline, out_dir: str, refresh: list[str] | None, started: float,
                executor: Executor) -> dict[str, Any]:
    clean_stale(out_dir)
    store = Store(os.path.abspath(out_dir))  # tasks may run in other processes, with another cwd
    run_log = RunLog()
    if refresh:
        _refresh(make_plan(pipeline, store), store, refresh)
    info, ready = _ingest(pipeline, store, run_log, executor)  # ready: first-segment parts computed meanwhile
    plan = build_plan(pipeline, info)
    write_text_atomic(json.dumps(plan.to_json(), indent=2), os.path.join(out_dir, PLAN_FILE))
    write_text_atomic(redact(pipeline.text), os.path.join(out_dir, PIPELINE_FILE))  # no URL credentials or tokens
    executor.prepare(plan.stages, store.root)
    try:
        with live_bars():  # progress bars on a terminal (curate.progress)
            for segment in plan.segments:
                if segment.stages:
                    run_segment(plan, store, segment, executor, run_log, ready if segment.index == 0 else None)
    except CurateError as exc:
        finished = sum(len(store.finished(s.key)) for s in plan.segments)
        exc.message += f"; {finished} finished parts are kept, run again to resume"
        raise
    publish(plan, store, out_dir)
    stats = collect_stats(plan, store, run_log, time.perf_counter() - started, executor.name)
    write_text_atomic(json.dumps(stats.to_json(), indent=2), os.path.join(out_dir, STATS_FILE))
    write_icai_artifacts(out_dir)  # constitution.json and the ICAI tables, when the run mined principles
    write_card(out_dir)  # the dataset card (README.md), written by every run (curate/card.py)
    log.info("done: %d rows in, %d rows out, %s", stats.rows_in, stats.rows_out,
             ", ".join(f"{k}={v}" for k, v in stats.dropped.items()) or "nothing dropped")
    return stats.to_json()
