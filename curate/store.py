"""The run folder's content-addressed store: atomic Parquet parts plus a manifest per key.

Layout under the run folder (DESIGN.md §7):
    parts/<key>/part-00000.parquet            one part of a segment's output
    parts/<key>/rejects/<stage key>/part-00000.parquet
    parts/<key>/state.parquet                 a global stage's fitted state
    parts/<key>/manifest.jsonl                one JSON line per committed part
    parts/<key>/attempts/<part>.tmp-<id>/     one task's attempt at a part (data and rejects)
A task writes only into a fresh attempt folder and fsyncs its files; the driver, the one writer,
renames them into place and only then appends the part's manifest line (fsynced), which lists
the reject files of that attempt. A part counts as finished only once its manifest line is
written; a line cut short by a crash is ignored and the part recomputed; publish and stats read
only the files a manifest lists, so the rejects of a failed or superseded attempt are never
published. Leaves out: garbage collection of keys no plan uses any more.

Example: Store("out/q").commit_files("ab12", 0, "attempt/data.parquet", {}, {"rows_out": 3})
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

ARROW_SUFFIX = ".arrow"
# Dictionary encoding gives up on a column chunk once its dictionary passes this size (pyarrow's
# default is 1 MiB): low-cardinality columns (roles, model names, reasons) still get a dictionary,
# long unique texts fall back to plain sooner. Writing parts took 6% less (bench_executor's pairs).
DICTIONARY_PAGE_BYTES = 64 << 10


def fsync_file(path: str) -> None:
    """Flush a file's bytes to disk. Example: fsync_file("out/q/parts/ab/part-00000.parquet")"""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make renames inside a folder durable. Example: fsync_dir("out/q/parts/ab")"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # not every filesystem lets a folder be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_parquet_atomic(table: pa.Table, path: str, durable: bool = False) -> None:
    """Write a Parquet file under a temporary name, then rename it into place (fsynced first if durable).

    Example: write_parquet_atomic(t, "out/data/train-00000-of-00001.parquet")
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    pq.write_table(table, tmp, dictionary_pagesize_limit=DICTIONARY_PAGE_BYTES)
    if durable:
        fsync_file(tmp)
    os.replace(tmp, path)


def write_arrow_atomic(table: pa.Table, path: str, durable: bool = False, compression: str | None = None) -> None:
    """Write an Arrow IPC file (uncompressed, or e.g. "lz4") under a temporary name, then rename it into place.

    The source's stored parts use this: uncompressed, writing is a copy and reading a memory map
    that copies nothing, where a Parquet round trip costs as much as the whole no-op run and LZ4
    adds ~40% to it (benchmarks/bench_executor.py; `source.compress_parts`).
    Example: write_arrow_atomic(t, "out/q/parts/ab/part-00000.arrow")
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with pa.OSFile(tmp, "wb") as sink:
        with ipc.new_file(sink, table.schema, options=ipc.IpcWriteOptions(compression=compression)) as writer:
            writer.write_table(table)
    if durable:
        fsync_file(tmp)
    os.replace(tmp, path)


def read_table_file(path: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet or Arrow IPC file (by its suffix), optionally only some columns.

    Example: read_table_file("out/q/parts/ab/part-00000.arrow", ["id"])
    """
    if path.endswith(ARROW_SUFFIX):
        with pa.memory_map(path) as source:
            table = ipc.open_file(source).read_all()
        return table.select(columns) if columns is not None else table
    return pq.read_table(path, columns=columns)


def write_text_atomic(text: str, path: str) -> None:
    """Write a text file under a temporary name, fsync it, then rename it into place.

    Example: write_text_atomic("{}", "out/stats.json")
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def part_name(index: int) -> str:
    """File name of part `index`. Example: part_name(3) -> 'part-00003.parquet'"""
    return f"part-{index:05d}.parquet"


class Store:
    """Parts, rejects, states and manifests of one run folder.

    Example: Store("out/q").finished("ab12") -> {0: {...}, 1: {...}}
    """

    def __init__(self, root: str):
        self.root = root
        self._manifest_lock = threading.Lock()  # the driver may commit from a helper thread
        self._committed: dict[str, set[int]] = {}  # parts this writer knows are in each manifest
        self._files: dict[str, dict[int, str]] = {}  # part file names from the manifests

    def key_dir(self, key: str) -> str:
        """Folder of one key. Example: store.key_dir("ab12") -> 'out/q/parts/ab12'"""
        return os.path.join(self.root, "parts", key)

    def part_path(self, key: str, index: int, suffix: str = ".parquet") -> str:
        """Where a part file goes (`suffix`: .parquet, or .arrow for the source). Example: store.part_path("ab12", 0)"""
        return os.path.join(self.key_dir(key), part_name(index).replace(".parquet", suffix))

    def part_file(self, key: str, index: int) -> str:
        """The committed file of a part, as its manifest line names it. Example: store.part_file("ab12", 0)"""
        names = self._files.get(key)
        if names is None or index not in names:  # manifest lines never change once written: cache them
            names = self._files[key] = {i: r.get("file", part_name(i)) for i, r in self.finished(key).items()}
        return os.path.join(self.key_dir(key), names.get(index, part_name(index)))

    def reject_path(self, key: str, stage_key: str, index: int) -> str:
        """Path of one stage's rejects for a part. Example: store.reject_path("ab12", "cd34", 0)"""
        return os.path.join(self.key_dir(key), "rejects", stage_key, part_name(index))

    def finished(self, key: str) -> dict[int, dict[str, Any]]:
        """Manifest records of the committed parts of a key, by part index (bad lines ignored).

        Example: 0 in store.finished("ab12") -> True once part 0 is committed
        """
        path = os.path.join(self.key_dir(key), "manifest.jsonl")
        records: dict[int, dict[str, Any]] = {}
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash: that part is recomputed
                    if not isinstance(record, dict) or not isinstance(record.get("part"), int):
                        continue
                    name = record.get("file", part_name(record["part"]))
                    if os.path.exists(os.path.join(self.key_dir(key), name)):
                        records[record["part"]] = record
        except FileNotFoundError:
            pass
        return records

    def attempt_dir(self, key: str, index: int) -> str:
        """A fresh folder for one attempt at a part (a task writes only there). Example: store.attempt_dir("ab12", 0)"""
        folder = os.path.join(self.key_dir(key), "attempts", f"{index:05d}.tmp-{uuid.uuid4().hex[:12]}")
        os.makedirs(folder)
        return folder

    def discard_attempts(self, key: str) -> None:
        """Remove the attempt folders a key's finished segment still has: those of tasks whose worker died
        after writing (their part was computed again elsewhere). Example: store.discard_attempts("ab12")"""
        shutil.rmtree(os.path.join(self.key_dir(key), "attempts"), ignore_errors=True)

    def commit_files(self, key: str, index: int, data: str, rejects: dict[str, str], record: dict) -> bool:
        """Move an attempt's files into place, then append the part's manifest line (the one writer's job).

        The files must already be fsynced (the task does it); the renames are made durable before
        the manifest names them. A part already in the manifest is never committed again: the
        attempt is discarded and False returned. Only the driver calls this.
        Example: store.commit_files("ab12", 0, "…/attempt/data.parquet", {"cd34": "…/rejects/cd34.parquet"}, {"rows_out": 9})
        """
        with self._manifest_lock:
            committed = self._committed.get(key)
            if committed is None:
                committed = self._committed[key] = set(self.finished(key))
            if index in committed:
                return False
            folder = self.key_dir(key)
            listed = {}
            for stage_key, path in rejects.items():
                target = self.reject_path(key, stage_key, index)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(path, target)
                fsync_dir(os.path.dirname(target))
                listed[stage_key] = os.path.relpath(target, folder)
            target = self.part_path(key, index, os.path.splitext(data)[1])
            os.replace(data, target)
            fsync_dir(folder)
            line = json.dumps({"part": index, "file": os.path.basename(target), "rejects": listed, **record},
                              sort_keys=True) + "\n"
            with open(os.path.join(folder, "manifest.jsonl"), "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            committed.add(index)
            return True

    def summary_path(self, key: str, index: int) -> str:
        """A global stage's first-pass summary of one part. Example: store.summary_path("cd34", 0)"""
        return os.path.join(self.key_dir(key), "summaries", part_name(index))

    def request_log_path(self, key: str, index: int) -> str:
        """The finished-request log of one part while it is not committed (`curate.requests`)."""
        return os.path.join(self.key_dir(key), "requests", f"part-{index:05d}.jsonl")

    def reject_files(self, key: str, index: int) -> dict[str, str]:
        """The reject files the manifest lists for a committed part, by stage key (absolute paths).

        Example: store.reject_files("ab12", 0) -> {"cd34": "out/q/parts/ab12/rejects/cd34/part-00000.parquet"}
        """
        record = self.finished(key).get(index, {})
        return {k: os.path.join(self.key_dir(key), rel) for k, rel in record.get("rejects", {}).items()}

    def read_part(self, key: str, index: int, columns: list[str] | None = None) -> pa.Table:
        """Read a committed part (optionally only some columns). Example: store.read_part("ab12", 0)"""
        return read_table_file(self.part_file(key, index), columns)

    def state_path(self, key: str) -> str:
        """Path of a global stage's fitted state. Example: store.state_path("ab12")"""
        return os.path.join(self.key_dir(key), "state.parquet")

    def read_state(self, key: str) -> pa.Table | None:
        """A global stage's saved state, or None. Example: store.read_state("ab12")"""
        path = self.state_path(key)
        return pq.read_table(path) if os.path.exists(path) else None

    def write_state(self, key: str, state: pa.Table) -> None:
        """Save a global stage's state atomically. Example: store.write_state("ab12", ids)"""
        write_parquet_atomic(state, self.state_path(key))

    def forget(self, key: str) -> None:
        """Remove everything stored under a key (used by --refresh). Example: store.forget("ab12")"""
        self._committed.pop(key, None)
        self._files.pop(key, None)
        shutil.rmtree(self.key_dir(key), ignore_errors=True)
