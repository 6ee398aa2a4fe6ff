"""The source as stored parts: stream the input into `parts/<source key>/part-NNNNN.parquet`.

Ingest reads the input in chunks (Parquet by record batches of its row groups, JSONL / JSONL.gz
in byte blocks cut at line ends, `datasets` folders and Hub datasets by the batches of their
memory-mapped Arrow files), applies `limit` / `sample`, assigns ids, parses HH dialogues,
normalises each chunk to the data contract (`curate.sources.normalize`) and writes parts of
exactly `part_rows` rows. Peak memory is bounded by a part plus one read chunk, whatever the
size of the source:
- Id repeats are checked with bounded memory (`curate.ingest_ids`): content-hash ids that repeat
  get `-2`, `-3` suffixes in source order, given ids that repeat are an error naming both rows.
  The few parts that hold a repeat are rewritten.
- Chunks of a JSONL file can infer different types for one column (all null in one block):
  the part schemas are unified at the end and the parts that differ are cast.
Parts are staged and committed (with a manifest line each, like every segment) only once the
whole source is ingested, and `source.json` is written last: an ingest cut short is redone from
the start; a committed one is never redone. A `PartFeed` gets each part as it is cut (the
runner computes the first segment on it there and then, `curate.fused`), and the indexes of the
parts rewritten at the end. Leaves out: splitting the ingest of one source
across workers (it runs on the driver; every later task reads its part from the store).

Example: info = ingest_source(spec, ".", store); store.read_part(info.key, 0).num_rows
"""
from __future__ import annotations

import base64
import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from curate.contract import REASON
from curate.errors import InputError
from curate.ingest_ids import IdSpill, apply_fixes, repeat_fixes
from curate.plan import SourceInfo
from curate.progress import ReadProgress
from curate.reading import PREVIEW_ROWS, Chunk, selected_chunks, source_key
from curate.sources import SourceSpec, _parse_hh, _row_ids, normalize
from curate.store import ARROW_SUFFIX, Store, fsync_file, read_table_file, write_arrow_atomic, write_parquet_atomic, write_text_atomic

log = logging.getLogger(__name__)

SOURCE_ID = "source"
WRITERS = 2  # threads writing staged parts (at most this many parts wait in memory besides the one being filled)


# Ids, parsing, normalising one chunk --------------------------------------------------------------


def _chunk_ids(chunk: Chunk, positions: np.ndarray) -> tuple[pa.Table, bool]:
    """The chunk with a string `id` first (content hashes where the source has none); True if hashed."""
    table = chunk.table
    if "id" not in table.column_names:
        return table.add_column(0, "id", _row_ids(table)), True  # repeats across chunks are fixed later
    ids = table.column("id")
    if ids.null_count:
        raise InputError("'id' is null", where=chunk.where(positions[pc.index(pc.is_null(ids), True).as_py()]))
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type) or pa.types.is_integer(ids.type)):
        raise InputError(f"'id' must be a string or an integer, found {ids.type}", where=chunk.where(positions[0]))
    if not pa.types.is_string(ids.type):
        ids = pc.cast(ids, pa.string())
    table = table.remove_column(table.schema.get_field_index("id"))
    return table.add_column(0, "id", ids), False


@dataclass
class Prepared:
    """One chunk after ids, HH parsing and normalisation. Example: prepare_chunk(spec, chunk, pos).kept"""

    kept: pa.Table
    rejected: pa.Table | None
    ids: pa.Array  # every row's id, kept or not, in source order
    kept_mask: np.ndarray
    hashed: bool  # ids are content hashes (repeats get suffixes) rather than given


def prepare_chunk(spec: SourceSpec, chunk: Chunk, positions: np.ndarray) -> Prepared:
    """Ids, HH parsing and normalisation of one chunk (rows at source `positions`).

    Example: prepare_chunk(SourceSpec(path="x.jsonl"), chunk, positions).kept.schema.names[:2] -> ['id', 'prompt']
    """
    table, hashed = _chunk_ids(chunk, positions)
    ids = table.column("id").combine_chunks()
    rejected = None
    kept = np.ones(len(ids), dtype=bool)
    if spec.parse == "hh":
        table, rejected, kept = _parse_hh(table)
    kept_positions = positions[kept]
    try:
        table = normalize(table, lambda i: chunk.where(kept_positions[i]))
    except InputError as exc:
        exc.where = exc.where or chunk.name
        raise
    return Prepared(table, rejected, ids, kept, hashed)


# Writing parts --------------------------------------------------------------------------------


class PartFeed(Protocol):
    """Who else gets each source part as ingest cuts it. Example: ingest_source(spec, ".", store, feed=feed)"""

    def take(self, index: int, part: pa.Table) -> None:
        """Part `index` is cut (staged beside this call, not committed); called on an ingest writer thread."""
        ...

    def discard(self, indexes: set[int]) -> None:
        """These parts were rewritten after `take` (an id repeat fixed, a column type unified)."""
        ...


@dataclass
class _Staging:
    """Parts and rejects written under the source key's staging folder, before they are committed."""

    folder: str
    part_rows: int
    compression: str | None = None  # of the Arrow IPC parts (`source.compress_parts`)
    parts: int = 0
    rows: int = 0
    rejected: int = 0

    def part_path(self, index: int, reject: bool = False) -> str:
        """Staged rejects are Parquet (published as they are); staged parts Arrow IPC (read back by every task)."""
        return os.path.join(self.folder, "rejects" if reject else "data", f"{index:05d}" + (".parquet" if reject else ARROW_SUFFIX))


def _where_in(origins: list[tuple[int, Chunk]]):
    """position -> 'file:line' over the (first position, chunk) origins of the source."""
    starts = [start for start, _ in origins]

    def where(position: int) -> str:
        i = int(np.searchsorted(starts, position, side="right")) - 1
        return origins[i][1].where(position)

    return where


def ingest_source(spec: SourceSpec, base_dir: str, store: Store, key: str | None = None,
                  feed: PartFeed | None = None) -> SourceInfo:
    """Stream the source into committed parts under its key (a no-op when they are already there).

    `feed` also gets every part as it is written (`PartFeed`). Example: ingest_source(SourceSpec(path="x.jsonl", part_rows=1000), ".", Store("out/x")).n_parts
    """
    key = key or source_key(spec, base_dir)
    cached = read_source_info(store, key)
    if cached is not None:
        return cached
    started = time.perf_counter()
    staging = _Staging(os.path.join(store.key_dir(key), f"staging.tmp-{os.getpid()}"), spec.part_rows,
                       "lz4" if spec.compress_parts else None)
    shutil.rmtree(staging.folder, ignore_errors=True)
    spill = IdSpill(os.path.join(staging.folder, "ids"))
    try:
        info = _stream_into(spec, base_dir, staging, spill, key, feed)
        info.seconds = time.perf_counter() - started
        _commit_source(store, key, staging, info)
    finally:
        shutil.rmtree(staging.folder, ignore_errors=True)
    log.info("ingested %d rows from %s into %d parts (%.1f s)", info.rows, spec.path or spec.hub, info.n_parts, info.seconds)
    return info


class _Parts:
    """Cuts the kept rows into parts of exactly `part_rows` and files rejects with the part being filled."""

    def __init__(self, staging: _Staging, feed: PartFeed | None = None):
        self.staging = staging
        self.feed = feed
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.rejects: dict[int, list[pa.Table]] = {}
        self.reject_rows: Counter[int] = Counter()
        self.schemas: dict[int, pa.Schema] = {}
        self.pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="curate-ingest")
        self.writes: deque[list[Future]] = deque()  # each part's jobs run while the next chunk is read

    @property
    def filling(self) -> int:
        """Index of the part the next kept row goes into."""
        return (self.staging.rows + self.buffered) // self.staging.part_rows

    def place(self, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
        """Part and offset of every row of a chunk (kept rows in their part, rejects in the reject file)."""
        rows, size = self.staging.rows + self.buffered, self.staging.part_rows
        kept = prepared.kept_mask
        slot = rows + np.cumsum(kept) - 1
        part = np.where(kept, slot // size, rows // size).astype(np.int64)
        offset = np.where(kept, slot % size, 0).astype(np.int64)
        if prepared.rejected is not None and prepared.rejected.num_rows:
            index = rows // size
            offset[~kept] = self.reject_rows[index] + np.arange((~kept).sum())
            self.reject_rows[index] += prepared.rejected.num_rows
            self.rejects.setdefault(index, []).append(prepared.rejected)
        if prepared.kept.num_rows:
            self.buffer.append(prepared.kept)
            self.buffered += prepared.kept.num_rows
        return part, offset

    def flush(self, final: bool = False) -> None:
        """Write every full part (and, at the end, the last partial one)."""
        size = self.staging.part_rows
        while self.buffered >= size or (final and self.buffered):
            table = pa.concat_tables(self.buffer, promote_options="permissive") if len(self.buffer) > 1 else self.buffer[0]
            part, rest = table.slice(0, size), table.slice(size)
            index = self.staging.parts
            self.writes.append(self._write(part, index))
            while len(self.writes) > WRITERS:  # bounded memory: wait for the oldest part's jobs
                for job in self.writes.popleft():
                    job.result()
            self.schemas[index] = part.schema
            self.staging.parts += 1
            self.staging.rows += part.num_rows
            self.buffer, self.buffered = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
            self._write_rejects(index, index)

    def _write(self, part: pa.Table, index: int) -> list[Future]:
        """A part's jobs on the writer threads: to disk (fsynced, so the commit needs no wait) and to the feed,
        side by side (the last part's two jobs no longer run one after the other)."""
        jobs = [self.pool.submit(write_arrow_atomic, part, self.staging.part_path(index), True, self.staging.compression)]
        if self.feed is not None:
            jobs.append(self.pool.submit(self.feed.take, index, part))
        return jobs

    def abandon(self) -> None:
        """Wait for the writes in flight (their errors are not the first one) and stop the writers."""
        for jobs in self.writes:
            for job in jobs:
                job.exception()
        self.pool.shutdown()

    def close(self) -> dict[tuple[bool, int], tuple[int, int]]:
        """Write the last part; rejects after the last kept row join the last part's file. Returns their remap."""
        self.flush(final=True)
        try:
            for jobs in self.writes:
                for job in jobs:
                    job.result()
        finally:
            self.pool.shutdown()
        remap = {}
        last = max(self.staging.parts - 1, 0)
        for index in sorted(self.rejects):
            remap[(True, index)] = (last, self._existing_rejects(last))
            self._write_rejects(index, last)
        return remap

    def _existing_rejects(self, index: int) -> int:
        path = self.staging.part_path(index, reject=True)
        return pq.read_metadata(path).num_rows if os.path.exists(path) else 0

    def _write_rejects(self, index: int, into: int) -> None:
        tables = self.rejects.pop(index, None)
        if not tables:
            return
        path = self.staging.part_path(into, reject=True)
        if os.path.exists(path):
            tables = [pq.read_table(path)] + tables
        write_parquet_atomic(pa.concat_tables(tables, promote_options="permissive"), path)
        self.staging.rejected += sum(t.num_rows for t in tables)


def _stream_into(spec: SourceSpec, base_dir: str, staging: _Staging, spill: IdSpill, key: str,
                 feed: PartFeed | None) -> SourceInfo:
    parts = _Parts(staging, feed)
    dropped: Counter[str] = Counter()
    origins: list[tuple[int, Chunk]] = []
    hashed = False
    progress = ReadProgress(f"ingesting {spec.path or spec.hub}")
    try:
        for chunk, positions in selected_chunks(spec, base_dir):
            progress.read(len(positions), staging.parts)
            prepared = prepare_chunk(spec, chunk, positions)
            chunk.table = None  # keep only where it came from, for error messages
            origins.append((chunk.start, chunk))
            hashed = hashed or prepared.hashed
            if prepared.rejected is not None:
                dropped.update(prepared.rejected.column(REASON).to_pylist())
            part, offset = parts.place(prepared)
            spill.add(prepared.ids, positions, part, offset, ~prepared.kept_mask)
            parts.flush()
        if not staging.rows and not parts.buffered:
            raise InputError("the source has no rows" if not dropped else "every source row was dropped at ingest",
                             where=spec.path or spec.hub)
        parts.flush(final=True)
        fixes = repeat_fixes(spill, hashed, _where_in(origins))  # while the last parts are still being written
    except BaseException:
        parts.abandon()  # no writer thread still writing into a staging folder about to be removed
        raise
    remap = parts.close()
    for old, (index, shift) in remap.items():
        if old in fixes and old != (True, index):
            moved = {offset + shift: new for offset, new in fixes.pop(old).items()}
            fixes.setdefault((True, index), {}).update(moved)
        elif old in fixes and shift:
            fixes[old] = {offset + shift: new for offset, new in fixes[old].items()}
    rewritten = _finish_parts(staging, parts.schemas, fixes)
    if feed is not None and rewritten:
        feed.discard(rewritten)
    return SourceInfo(key=key, schema=_unified(parts.schemas), rows_in=staging.rows + sum(dropped.values()),
                      rows=staging.rows, n_parts=staging.parts, dropped=dict(dropped))


def _unified(schemas: dict[int, pa.Schema]) -> pa.Schema:
    unique = list({str(s): s for s in schemas.values()}.values())
    if len(unique) == 1:
        return unique[0]
    try:
        return pa.unify_schemas(unique, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"rows do not share one type per column across the source: {exc}") from None


def _finish_parts(staging: _Staging, schemas: dict[int, pa.Schema], fixes: dict[tuple[bool, int], dict[int, str]]) -> set[int]:
    """Rewrite the parts that hold a repeated id or a column type other than the unified one; their indexes."""
    schema = _unified(schemas)
    rewritten = set()
    for index, part_schema in schemas.items():
        fix = fixes.get((False, index))
        if fix is None and part_schema.equals(schema):
            continue
        table = read_table_file(staging.part_path(index))
        if fix:
            table = apply_fixes(table, fix)
        write_arrow_atomic(_cast_to(table, schema), staging.part_path(index), durable=True, compression=staging.compression)
        rewritten.add(index)
    for (reject, index), fix in fixes.items():
        if reject:
            path = staging.part_path(index, reject=True)
            write_parquet_atomic(apply_fixes(pq.read_table(path), fix), path)
    return rewritten


def _cast_to(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


# Committing and reading back ------------------------------------------------------------------------


def _info_path(store: Store, key: str) -> str:
    return os.path.join(store.key_dir(key), "source.json")


def _commit_source(store: Store, key: str, staging: _Staging, info: SourceInfo) -> None:
    """Move staged parts into place with their manifest lines, then write source.json (the marker)."""
    done = store.finished(key)
    for index in range(staging.parts):
        if index in done:
            continue
        files = {"data": staging.part_path(index)}
        reject = staging.part_path(index, reject=True)
        rejects = {SOURCE_ID: reject} if os.path.exists(reject) else {}
        for path in rejects.values():
            fsync_file(path)  # on disk before the manifest names it (parts were fsynced as they were written)
        rows = min(staging.part_rows, info.rows - index * staging.part_rows)
        dropped = dict(Counter(pq.read_table(reject, columns=[REASON]).column(REASON).to_pylist())) if rejects else {}
        store.commit_files(key, index, files["data"], rejects,
                           {"rows_in": rows + sum(dropped.values()), "rows_out": rows, "dropped": dropped})
    record = {
        "schema": base64.b64encode(info.schema.serialize().to_pybytes()).decode("ascii"),
        "rows_in": info.rows_in, "rows": info.rows, "n_parts": info.n_parts,
        "dropped": info.dropped, "seconds": info.seconds,
    }
    write_text_atomic(json.dumps(record), _info_path(store, key))


def read_source_info(store: Store, key: str) -> SourceInfo | None:
    """The description of a committed source, or None when it is not (completely) ingested yet.

    Example: read_source_info(Store("out/q"), key).n_parts
    """
    try:
        with open(_info_path(store, key), encoding="utf-8") as f:
            raw = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if len(store.finished(key)) != raw["n_parts"]:
        return None
    schema = ipc.read_schema(pa.py_buffer(base64.b64decode(raw["schema"])))
    return SourceInfo(key, schema, raw["rows_in"], raw["rows"], raw["n_parts"], raw["dropped"], raw["seconds"])


def preview_source(spec: SourceSpec, base_dir: str, key: str) -> SourceInfo:
    """What `plan` and `validate` need: the columns, from the first rows only (sizes unknown, -1).

    Example: preview_source(spec, ".", key).schema.names
    """
    for chunk, positions in selected_chunks(spec, base_dir, preview=True):
        chunk.table = chunk.table.slice(0, PREVIEW_ROWS)
        prepared = prepare_chunk(spec, chunk, positions[:PREVIEW_ROWS])
        return SourceInfo(key=key, schema=prepared.kept.schema, rows_in=-1, rows=-1, n_parts=-1)
    raise InputError("the source has no rows", where=spec.path or spec.hub)


def source_rejects(store: Store, key: str) -> dict[int, str]:
    """Reject files of the committed source parts, by part index. Example: source_rejects(store, key)"""
    return {i: r["rejects"][SOURCE_ID] for i, r in store.finished(key).items() if SOURCE_ID in r.get("rejects", {})}


__all__ = ["SOURCE_ID", "PartFeed", "ingest_source", "preview_source", "read_source_info", "source_key"]
