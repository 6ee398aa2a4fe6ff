"""The local executor: run a plan part by part, commit each part atomically, resume what is done.

For each segment, part i is read from part i of the parent segment (or sliced from the source),
passed through the segment's stages, and committed with its rejects and a manifest line that
holds its per-stage counts. A part already in the manifest is never recomputed, so a killed run
resumes where it stopped and an edited stage re-runs only its own segment and those after it.
Global stages fit once over their whole input, and the fitted state is stored under their key.
At the end the last segment's parts are published as `data/train-XXXXX-of-NNNNN.parquet`, the
rejects under `rejects/<stage id>/`, and the funnel in `stats.json` (DESIGN.md §6–7).
Leaves out: the Dask executor (DESIGN.md §6), which will call `run_part` on workers.

Example: run_pipeline(load_pipeline("pipelines/quickstart.yaml"))["rows_out"]
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import difflib
import json
import logging
import os
import shutil
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Pipeline
from curate.contract import REASON, StageOutput, Verdict, conform, with_reason
from curate.errors import ConfigError, CurateError, StageError
from curate.keys import chain_key
from curate import __version__
from curate.record import PIPELINE_FILE, PLAN_FILE, STATES_DIR, STATS_FILE, RunStats, StageStats
from curate.plan import Plan, PlannedStage, Segment, SourceInfo, build_plan, rename_in, rename_out
from curate.sources import Ingested, SourceSpec, _is_saved_dataset, files_fingerprint, ingest
from curate.store import Store, part_name, write_parquet_atomic, write_text_atomic

log = logging.getLogger(__name__)

SOURCE_ID = "source"
WRITERS = 2  # background threads that encode and commit parts (Parquet encoding releases the GIL)


# Source ---------------------------------------------------------------------------------------


def source_fingerprint(spec: SourceSpec, base_dir: str) -> str | None:
    """Hash of the source files' bytes, or None where it needs a full load (datasets, Hub).

    Example: source_fingerprint(SourceSpec(path="x.jsonl"), ".") -> 20 hex chars
    """
    if spec.hub is not None:
        return None
    path = spec.path if "://" in spec.path or os.path.isabs(spec.path) else os.path.join(base_dir, spec.path)
    if spec.format == "datasets" or _is_saved_dataset(path):
        return None
    return files_fingerprint(path)


def source_key(spec: SourceSpec, fingerprint: str) -> str:
    """Key of the ingested source: what was read (by content) and how. Example: source_key(spec, fp)"""
    how = spec.model_dump(mode="json", exclude={"path", "hub"})
    return chain_key("", {"source": how, "content": fingerprint})


class SourceParts:
    """The source, ingested at most once per run, sliced into parts of `part_rows`.

    A cached run reads only `source.json` from the store and never re-parses the input.
    Example: SourceParts(pipeline, store).part(0).num_rows
    """

    def __init__(self, pipeline: Pipeline, store: Store):
        self.spec = pipeline.spec.source
        self.base_dir = pipeline.base_dir
        self.store = store
        self._ingested: Ingested | None = None
        fingerprint = source_fingerprint(self.spec, self.base_dir)
        if fingerprint is None:
            self._ingest()
            fingerprint = self._ingested.fingerprint
        self.key = source_key(self.spec, fingerprint)
        self.info = self._cached_info() or self._ingest_info()

    def _info_path(self) -> str:
        return os.path.join(self.store.key_dir(self.key), "source.json")

    def _cached_info(self) -> SourceInfo | None:
        try:
            with open(self._info_path(), encoding="utf-8") as f:
                raw = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(raw["schema"])))
        return SourceInfo(self.key, schema, raw["rows_in"], raw["rows"], raw["n_parts"], raw["dropped"], raw["seconds"])

    def _ingest(self) -> Ingested:
        if self._ingested is None:
            started = time.perf_counter()
            self._ingested = ingest(self.spec, self.base_dir)
            self._ingest_seconds = time.perf_counter() - started
        return self._ingested

    def _ingest_info(self) -> SourceInfo:
        ingested = self._ingest()
        rows = ingested.table.num_rows
        dropped = dict(Counter(ingested.rejected.column(REASON).to_pylist())) if ingested.rejected is not None else {}
        if ingested.rejected is not None:
            write_parquet_atomic(ingested.rejected, self.store.reject_path(self.key, SOURCE_ID, 0))
        info = SourceInfo(
            key=self.key,
            schema=ingested.table.schema,
            rows_in=rows + sum(dropped.values()),
            rows=rows,
            n_parts=max(1, -(-rows // self.spec.part_rows)),
            dropped=dropped,
            seconds=self._ingest_seconds,
        )
        record = {
            "schema": base64.b64encode(info.schema.serialize().to_pybytes()).decode("ascii"),
            "rows_in": info.rows_in, "rows": rows, "n_parts": info.n_parts,
            "dropped": dropped, "seconds": info.seconds,
        }
        write_text_atomic(json.dumps(record), self._info_path())
        return info

    def part(self, index: int, columns: list[str] | None = None) -> pa.Table:
        """Rows of source part `index`. Example: source.part(0, ["id"])"""
        table = self._ingest().table
        part = table.slice(index * self.spec.part_rows, self.spec.part_rows)
        return part.select(columns) if columns is not None else part


# Running one stage on one part -----------------------------------------------------------------


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


# Progress ------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Logs parts done, rows/s and an ETA for one segment. Example: Progress("dedup", 10).tick(500)"""

    label: str
    total: int
    done: int = 0
    rows: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_log: float = 0.0

    def tick(self, rows: int) -> None:
        self.done += 1
        self.rows += rows
        now = time.perf_counter()
        if self.done < self.total and now - self.last_log < 1.0:
            return
        self.last_log = now
        elapsed = now - self.started
        eta = elapsed / self.done * (self.total - self.done)
        log.info("%s: part %d/%d, %d rows, %.3g rows/s, ETA %s", self.label, self.done, self.total, self.rows,
                 self.rows / elapsed if elapsed > 0 else 0.0, _clock(eta))


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# The run ---------------------------------------------------------------------------------------


class LocalRunner:
    """Runs a plan in-process, sequentially (debuggable with pdb). Example: LocalRunner(plan, store, src).run()"""

    def __init__(self, plan: Plan, store: Store, source: SourceParts):
        self.plan = plan
        self.store = store
        self.source = source
        self.computed: Counter[str] = Counter()
        self.cached: Counter[str] = Counter()
        self.fitted: set[str] = set()
        self.opened: set[str] = set()
        self.seconds: Counter[str] = Counter()  # spent in this run, per stage id (parts, fit, load)
        self.load_seconds: Counter[str] = Counter()

    def input_part(self, segment: Segment, index: int, columns: list[str] | None = None) -> pa.Table:
        """Part `index` of a segment's input. Example: runner.input_part(seg, 0)"""
        if segment.parent_key is None:
            return self.source.part(index, columns)
        return self.store.read_part(segment.parent_key, index, columns)

    def fit_state(self, segment: Segment) -> pa.Table:
        """The fitted state of the segment's global stage, computed once and stored under its key."""
        planned = segment.global_stage
        state = self.store.read_state(planned.key)
        if state is not None:
            return state
        stage = planned.bound.stage
        into = rename_in(planned.bound)
        wanted = stage.fit_columns(pa.schema([f.with_name(into.get(f.name, f.name)) for f in planned.input_schema]))
        back = {v: k for k, v in into.items()}
        columns = [back.get(c, c) for c in wanted]
        log.info("%s: fitting over %d parts", planned.id, self.plan.source.n_parts)
        started = time.perf_counter()

        def parts():
            for i in range(self.plan.source.n_parts):
                part = self.input_part(segment, i, columns)
                yield part.rename_columns([into.get(n, n) for n in part.column_names]) if into else part

        state = stage.fit(parts())
        seconds = time.perf_counter() - started
        self.seconds[planned.id] += seconds
        state = state.replace_schema_metadata({"fit_seconds": repr(seconds)})
        self.store.write_state(planned.key, state)
        self.fitted.add(planned.id)
        return state

    def compute_part(self, segment: Segment, index: int, state: pa.Table | None) -> tuple[pa.Table, dict, dict]:
        """Run a segment's stages on one part; return the output, rejects by stage key and the record."""
        table = self.input_part(segment, index)
        record: dict[str, Any] = {"rows_in": table.num_rows, "stages": {}}
        rejects: dict[str, pa.Table] = {}
        for planned in segment.stages:
            started = time.perf_counter()
            rows_in = table.num_rows
            try:
                result = run_stage(planned, table, state if planned is segment.global_stage else None)
            except CurateError as exc:
                exc.where = exc.where or f"stage '{planned.id}'"
                exc.message = f"{exc.message} (part {index})"
                raise
            except Exception as exc:
                raise StageError(f"failed on part {index}: {type(exc).__name__}: {exc}", where=f"stage '{planned.id}'") from exc
            table = result.table
            dropped = Counter(result.rejected.column(REASON).to_pylist()) if result.rejected is not None else Counter()
            if result.rejected is not None:
                rejects[planned.key] = result.rejected
            seconds = time.perf_counter() - started
            record["stages"][planned.key] = {
                "rows_in": rows_in, "rows_out": table.num_rows, "dropped": dict(dropped),
                "seconds": seconds, "counters": result.counters,
            }
            self.seconds[planned.id] += seconds
            self.computed[planned.id] += 1
        record["rows_out"] = table.num_rows
        return table, rejects, record

    def run_segment(self, segment: Segment) -> None:
        """Compute the parts of a segment that are not committed yet.

        Stages run in this thread, one part at a time; committing a part (Parquet encoding and
        the atomic rename) runs on `WRITERS` background threads, so writing part i overlaps
        computing part i+1. At most `WRITERS` computed parts wait in memory.
        """
        n_parts = self.plan.source.n_parts
        done = self.store.finished(segment.key)
        todo = [i for i in range(n_parts) if i not in done]
        label = f"segment {segment.index + 1}/{len(self.plan.segments)} [{' > '.join(s.id for s in segment.stages) or SOURCE_ID}]"
        for planned in segment.stages:
            self.cached[planned.id] += n_parts - len(todo)
        if not todo:
            log.info("%s: all %d parts cached", label, n_parts)
            return
        log.info("%s: %d parts cached, %d to compute", label, n_parts - len(todo), len(todo))
        state = self.fit_state(segment) if segment.global_stage else None
        for planned in segment.stages:
            if planned.id not in self.opened:  # a model loads once per process, never per part
                started = time.perf_counter()
                planned.bound.stage.open()
                self.load_seconds[planned.id] += time.perf_counter() - started
                self.seconds[planned.id] += self.load_seconds[planned.id]
                self.opened.add(planned.id)
        progress = Progress(label, len(todo))
        pending: deque[tuple[Future, int]] = deque()
        with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="curate-commit") as pool:
            try:
                for index in todo:
                    table, rejects, record = self.compute_part(segment, index, state)
                    future = pool.submit(self.store.commit, segment.key, index, table, rejects, record)
                    pending.append((future, table.num_rows))
                    while len(pending) >= WRITERS:
                        self._finish(pending.popleft(), progress)
            finally:
                while pending:  # commit what was computed, even when a later part failed
                    self._finish(pending.popleft(), progress)

    @staticmethod
    def _finish(item: tuple[Future, int], progress: "Progress") -> None:
        future, rows = item
        future.result()
        progress.tick(rows)

    def close(self) -> None:
        """Free what the stages loaded (their models). Example: runner.close()"""
        for planned in self.plan.stages:
            if planned.id in self.opened:
                planned.bound.stage.close()

    def run(self) -> None:
        try:
            for segment in self.plan.segments:
                self.run_segment(segment)
        finally:
            self.close()


# Publishing and stats --------------------------------------------------------------------------


def _link(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _swap_dir(new: str, final: str) -> None:
    """Replace folder `final` by `new` with renames, so no half-written folder is ever visible."""
    old = f"{final}.old-{os.getpid()}"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _clean_stale(out_dir: str) -> None:
    """Remove temporary files and folders a killed run left behind (never a committed file).

    Runs before anything else writes, so no temporary file found here can belong to a live writer.
    """
    for root, dirs, files in os.walk(out_dir):
        for name in [d for d in dirs if ".tmp-" in d or ".old-" in d]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            dirs.remove(name)
        for name in files:
            if ".tmp-" in name:
                os.remove(os.path.join(root, name))


def publish(plan: Plan, store: Store, out_dir: str) -> None:
    """Publish the final dataset (Hub layout) and the rejects of every stage.

    Example: publish(plan, store, "out/q") -> out/q/data/train-00000-of-00001.parquet
    """
    n = plan.source.n_parts
    last = plan.segments[-1].key
    tmp = os.path.join(out_dir, f"data.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for i in range(n):
        _link(store.part_path(last, i), os.path.join(tmp, f"train-{i:05d}-of-{n:05d}.parquet"))
    _swap_dir(tmp, os.path.join(out_dir, "data"))
    tmp = os.path.join(out_dir, f"rejects.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    source_rejects = store.reject_path(plan.source.key, SOURCE_ID, 0)
    if os.path.exists(source_rejects):
        _link(source_rejects, os.path.join(tmp, SOURCE_ID, part_name(0)))
    for planned in plan.stages:
        segment = plan.segments[planned.segment]
        for i in range(n):
            path = store.reject_path(segment.key, planned.key, i)
            if os.path.exists(path):
                _link(path, os.path.join(tmp, planned.id, part_name(i)))
    _swap_dir(tmp, os.path.join(out_dir, "rejects"))
    tmp = os.path.join(out_dir, f"{STATES_DIR}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for planned in plan.stages:
        if planned.kind == "global" and os.path.exists(store.state_path(planned.key)):
            _link(store.state_path(planned.key), os.path.join(tmp, f"{planned.id}.parquet"))
    _swap_dir(tmp, os.path.join(out_dir, STATES_DIR))


def collect_stats(plan: Plan, store: Store, runner: LocalRunner, seconds: float) -> RunStats:
    """The funnel from the manifests: rows in / out, drops per reason and time, per stage.

    Example: collect_stats(plan, store, runner, 1.2).stages[0].stage_id -> 'source'
    """
    source = plan.source
    stages = [StageStats(
        stage_id=SOURCE_ID, stage="source", kind="source", key=source.key, rows_in=source.rows_in,
        rows_out=source.rows, dropped=source.dropped, compute_seconds=round(source.seconds, 4),
    )]
    manifests = {segment.key: store.finished(segment.key) for segment in plan.segments}
    for planned in plan.stages:
        records = manifests[plan.segments[planned.segment].key].values()
        per_part = [r["stages"][planned.key] for r in records if planned.key in r.get("stages", {})]
        dropped: Counter[str] = Counter()
        counters: Counter[str] = Counter()
        for entry in per_part:
            dropped.update(entry["dropped"])
            counters.update(entry.get("counters", {}))
        entry = StageStats(
            stage_id=planned.id, stage=planned.bound.stage.name, kind=planned.kind, key=planned.key,
            rows_in=sum(e["rows_in"] for e in per_part), rows_out=sum(e["rows_out"] for e in per_part),
            dropped=dict(sorted(dropped.items())),
            compute_seconds=round(sum(e["seconds"] for e in per_part), 4),
            run_seconds=round(runner.seconds[planned.id], 4), load_seconds=round(runner.load_seconds[planned.id], 4),
            parts_computed=runner.computed[planned.id], parts_cached=runner.cached[planned.id],
            counters=dict(sorted(counters.items())),
        )
        if planned.kind == "global":
            state = store.read_state(planned.key)
            meta = (state.schema.metadata or {}) if state is not None else {}
            entry.fit_seconds = round(float(meta.get(b"fit_seconds", b"0")), 4)
            entry.fit_computed = planned.id in runner.fitted
            entry.fit = planned.bound.stage.fit_summary(state) if state is not None else {}
        stages.append(entry)
    total_dropped: Counter[str] = Counter()
    for entry in stages:
        total_dropped.update(entry.dropped)
    return RunStats(
        pipeline=plan.pipeline.spec.name, rows_in=source.rows_in, rows_out=stages[-1].rows_out,
        parts=source.n_parts, dropped=dict(sorted(total_dropped.items())), run_seconds=round(seconds, 4),
        stages=stages, executor="local", curate_version=__version__,
    )


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


def _refresh(plan: Plan, store: Store, source: SourceParts, stage_ids: list[str]) -> None:
    """Forget the stored output of each named stage's segment and every segment after it."""
    ids = [s.id for s in plan.stages]
    for stage_id in stage_ids:
        if stage_id == SOURCE_ID:
            first = 0
            store.forget(source.key)
        elif stage_id in ids:
            first = plan.stage(stage_id).segment
        else:
            close = difflib.get_close_matches(stage_id, ids + [SOURCE_ID], n=1)
            raise ConfigError(f"--refresh names no stage '{stage_id}' (stages: {', '.join(ids)})",
                              hint=close[0] if close else None)
        for segment in plan.segments[first:]:
            store.forget(segment.key)
            for planned in segment.stages:
                store.forget(planned.key)


def make_plan(pipeline: Pipeline, store: Store) -> tuple[Plan, SourceParts]:
    """Ingest (or read the cached description of) the source and build the plan.

    Example: plan, source = make_plan(pipeline, Store("out/q"))
    """
    source = SourceParts(pipeline, store)
    return build_plan(pipeline, source.info), source


def run_pipeline(pipeline: Pipeline, out: str | None = None, refresh: list[str] | None = None) -> dict[str, Any]:
    """Run a pipeline on the local executor and return its stats (also written to stats.json).

    Example: run_pipeline(load_pipeline("pipelines/quickstart.yaml"))["rows_out"]
    """
    started = time.perf_counter()
    out_dir = prepare_out_dir(pipeline, out)
    with _exclusive(out_dir):
        return _run_locked(pipeline, out_dir, refresh, started)


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


def _run_locked(pipeline: Pipeline, out_dir: str, refresh: list[str] | None, started: float) -> dict[str, Any]:
    _clean_stale(out_dir)
    store = Store(out_dir)
    plan, source = make_plan(pipeline, store)
    if refresh:
        _refresh(plan, store, source, refresh)
        if SOURCE_ID in refresh:
            plan, source = make_plan(pipeline, store)
    write_text_atomic(json.dumps(plan.to_json(), indent=2), os.path.join(out_dir, PLAN_FILE))
    write_text_atomic(pipeline.text, os.path.join(out_dir, PIPELINE_FILE))
    runner = LocalRunner(plan, store, source)
    try:
        runner.run()
    except CurateError as exc:
        finished = sum(len(store.finished(s.key)) for s in plan.segments)
        exc.message += f"; {finished} finished parts are kept, run again to resume"
        raise
    publish(plan, store, out_dir)
    stats = collect_stats(plan, store, runner, time.perf_counter() - started)
    write_text_atomic(json.dumps(stats.to_json(), indent=2), os.path.join(out_dir, STATS_FILE))
    from curate.judges.icai_library import write_icai_artifacts; write_icai_artifacts(out_dir)  # hook (issue 13): ICAI artifacts
    log.info("done: %d rows in, %d rows out, %s", stats.rows_in, stats.rows_out,
             ", ".join(f"{k}={v}" for k, v in stats.dropped.items()) or "nothing dropped")
    return stats.to_json()

