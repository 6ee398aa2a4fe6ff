"""The id repeat check of ingest: every row's id, held in bounded memory, checked for repeats.

`(id, position, part, offset, is_reject)` of every row is held in memory up to SPILL_BYTES and
beyond that spilled into ID_BUCKETS files by a hash of the id, then checked one bucket at a
time. Content-hash ids that repeat get `-2`, `-3` suffixes in source order (as
`curate.sources._row_ids` gives); given ids that repeat are an error naming both rows.

Example: spill = IdSpill(folder); spill.add(ids, pos, part, offset, reject); fixes = repeat_fixes(spill, True, where)
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from curate.errors import InputError

ID_BUCKETS = 64  # spill files of the id repeat check (each holds ~1/64 of the ids)
SPILL_BYTES = 64 << 20  # ids held in memory before the repeat check spills them to bucket files


class IdSpill:
    """(id, position, part, offset, is_reject) of every row: held in memory up to SPILL_BYTES, then
    spilled to ID_BUCKETS files by a hash of the id, so the repeat check holds one bucket at a time.

    Example: IdSpill("out/q/parts/ab/staging/ids").add(ids, positions, part, offset, reject)
    """

    SCHEMA = pa.schema([("id", pa.string()), ("pos", pa.int64()), ("part", pa.int32()), ("offset", pa.int32()),
                        ("reject", pa.bool_())])

    def __init__(self, folder: str):
        self.folder = folder
        self.held: list[pa.RecordBatch] = []
        self.held_bytes = 0
        self.writers: dict[int, ipc.RecordBatchStreamWriter] = {}

    def add(self, ids: pa.Array, positions: np.ndarray, part: np.ndarray, offset: np.ndarray, reject: np.ndarray) -> None:
        batch = pa.record_batch([ids, pa.array(positions, pa.int64()), pa.array(part, pa.int32()),
                                 pa.array(offset, pa.int32()), pa.array(reject, pa.bool_())], schema=self.SCHEMA)
        self.held.append(batch)
        self.held_bytes += batch.nbytes
        if self.held_bytes > SPILL_BYTES:
            for held in self.held:
                self._spill(held)
            self.held, self.held_bytes = [], 0

    def _spill(self, batch: pa.RecordBatch) -> None:
        buckets = pl.from_arrow(batch.column(0)).hash(seed=0).to_numpy() % ID_BUCKETS
        batch = batch.take(pa.array(np.argsort(buckets, kind="stable")))  # grouped by bucket: one slice each
        ends = np.cumsum(np.bincount(buckets, minlength=ID_BUCKETS))
        start = 0
        for bucket, end in enumerate(ends):
            if end > start:
                self._writer(bucket).write_batch(batch.slice(start, end - start))
            start = end

    def _writer(self, bucket: int) -> ipc.RecordBatchStreamWriter:
        writer = self.writers.get(bucket)
        if writer is None:
            os.makedirs(self.folder, exist_ok=True)
            sink = pa.OSFile(os.path.join(self.folder, f"{bucket:03d}.arrow"), "wb")
            writer = self.writers[bucket] = ipc.new_stream(sink, self.SCHEMA)
        return writer

    def buckets(self) -> Iterator[pl.DataFrame]:
        """Every row's record, one bucket at a time (everything at once when nothing was spilled)."""
        if not self.writers:
            if self.held:
                yield pl.from_arrow(pa.Table.from_batches(self.held, self.SCHEMA))
            return
        for held in self.held:
            self._spill(held)
        self.held = []
        for writer in self.writers.values():
            writer.close()
        for bucket in sorted(self.writers):
            with pa.OSFile(os.path.join(self.folder, f"{bucket:03d}.arrow"), "rb") as f:
                yield pl.from_arrow(ipc.open_stream(f).read_all())


def repeat_fixes(spill: IdSpill, hashed: bool, where: Callable[[int], str]) -> dict[tuple[bool, int], dict[int, str]]:
    """New ids for repeated content-hash ids, by (is_reject, part) and offset; a repeated given id is an error.

    Example: repeat_fixes(spill, True, where) -> {(False, 0): {7: "3f2a…-2"}}
    """
    fixes: dict[tuple[bool, int], dict[int, str]] = {}
    for frame in spill.buckets():
        if frame.height == frame["id"].hash().n_unique():  # distinct hashes mean distinct ids (~4x faster)
            continue
        frame = frame.sort("pos").with_columns(occurrence=pl.int_range(1, pl.len() + 1).over("id"))
        repeats = frame.filter(pl.col("occurrence") > 1)
        if not hashed:
            first = repeats.row(0, named=True)
            seen = frame.filter((pl.col("id") == first["id"]) & (pl.col("occurrence") == 1)).row(0, named=True)
            raise InputError(f"'id' {first['id']!r} is not unique (first at {where(seen['pos'])})", where=where(first["pos"]))
        for row in repeats.iter_rows(named=True):
            fixes.setdefault((row["reject"], row["part"]), {})[row["offset"]] = f"{row['id']}-{row['occurrence']}"
    return fixes


def apply_fixes(table: pa.Table, fixes: dict[int, str]) -> pa.Table:
    """The table with the ids at these offsets replaced. Example: apply_fixes(t, {3: "ab-2"})"""
    ids = table.column("id").to_pylist()
    for offset, new in fixes.items():
        ids[offset] = new
    return table.set_column(0, "id", pa.array(ids, pa.string()))


__all__ = ["ID_BUCKETS", "SPILL_BYTES", "IdSpill", "apply_fixes", "repeat_fixes"]
