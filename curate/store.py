"""The run folder's content-addressed store: atomic Parquet parts plus a manifest per key.

Layout under the run folder (DESIGN.md §7):
    parts/<key>/part-00000.parquet            one part of a segment's output
    parts/<key>/rejects/<stage key>/part-00000.parquet
    parts/<key>/state.parquet                 a global stage's fitted state
    parts/<key>/manifest.jsonl                one JSON line per committed part
A part counts as finished only once its manifest line is written, after its files were renamed
into place; a line cut short by a crash is ignored and the part recomputed. Leaves out:
garbage collection of keys no plan uses any more.

Example: Store("out/q").commit("ab12", 0, table, {}, {"rows": 3})
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


def write_parquet_atomic(table: pa.Table, path: str) -> None:
    """Write a Parquet file under a temporary name, then rename it into place.

    Example: write_parquet_atomic(t, "out/data/train-00000-of-00001.parquet")
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


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
        self._manifest_lock = threading.Lock()  # parts are committed from several writer threads

    def key_dir(self, key: str) -> str:
        """Folder of one key. Example: store.key_dir("ab12") -> 'out/q/parts/ab12'"""
        return os.path.join(self.root, "parts", key)

    def part_path(self, key: str, index: int) -> str:
        """Path of a part file. Example: store.part_path("ab12", 0)"""
        return os.path.join(self.key_dir(key), part_name(index))

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
                    if isinstance(record, dict) and os.path.exists(self.part_path(key, record.get("part", -1))):
                        records[record["part"]] = record
        except FileNotFoundError:
            pass
        return records

    def commit(self, key: str, index: int, table: pa.Table, rejects: dict[str, pa.Table], record: dict) -> None:
        """Write a part and its rejects atomically, then append its manifest line (fsynced).

        Example: store.commit("ab12", 0, table, {"cd34": rejected_rows}, {"rows": 10})
        """
        for stage_key, rejected in rejects.items():
            write_parquet_atomic(rejected, self.reject_path(key, stage_key, index))
        write_parquet_atomic(table, self.part_path(key, index))
        line = json.dumps({"part": index, **record}, sort_keys=True) + "\n"
        with self._manifest_lock, open(os.path.join(self.key_dir(key), "manifest.jsonl"), "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_part(self, key: str, index: int, columns: list[str] | None = None) -> pa.Table:
        """Read a committed part (optionally only some columns). Example: store.read_part("ab12", 0)"""
        return pq.read_table(self.part_path(key, index), columns=columns)

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
        shutil.rmtree(self.key_dir(key), ignore_errors=True)
