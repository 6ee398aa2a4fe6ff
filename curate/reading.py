"""Reading a source in chunks: Parquet by record batches, JSONL / JSONL.gz in byte blocks, datasets by batches.

Every chunk knows the file and the line (JSONL) or row of its first row, so a bad row is named
as `file:line`. `selected_chunks` applies `limit` and a seeded `sample` without holding the
source (a sample counts the rows first: Parquet footers, JSONL lines, dataset length).
`preview=True` reads only the first rows, for `plan` and `validate`. The source key hashes the
input's bytes (or a dataset's fingerprint) and how it is read. Leaves out: ids, parsing and
normalisation (`curate.ingest`, `curate.sources`).

Example: for chunk, positions in selected_chunks(SourceSpec(path="x.jsonl"), "."): chunk.table
"""
from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from curate.errors import InputError
from curate.keys import chain_key
from curate.sources import (
    SourceSpec,
    _file_format,
    _is_local,
    _is_saved_dataset,
    _read_dataset,
    _resolve_files,
    files_fingerprint,
)

BLOCK_BYTES = 8 << 20  # JSONL bytes parsed at a time
BATCH_ROWS = 65_536  # rows per Parquet / Arrow read batch
PREVIEW_ROWS = 1_000  # rows `plan` and `validate` read to learn the columns
MAX_DEPTH = 64  # levels of nested lists / structs a column may have


@dataclass
class Chunk:
    """Rows read from one file, with the file and the line (JSONL) or row of the first one.

    `start` is the source position of the first raw row (positions count over all files).
    Example: Chunk(t, "in.jsonl", first=101, jsonl=True, start=100).where(105) -> 'in.jsonl:106'
    """

    table: pa.Table | None
    name: str
    first: int  # 1-based line of the first row in a JSONL file; 0-based row otherwise
    jsonl: bool
    start: int = 0

    def where(self, position: int) -> str:
        """file:line (JSONL) or 'file row N' of a source position inside this chunk."""
        row = self.first + int(position) - self.start
        return f"{self.name}:{row}" if self.jsonl else f"{self.name} row {row}"


# Source key ------------------------------------------------------------------------------------


def _local_path(spec: SourceSpec, base_dir: str) -> str | None:
    if spec.hub is not None:
        return None
    return spec.path if "://" in spec.path or os.path.isabs(spec.path) else os.path.join(base_dir, spec.path)


def _is_dataset(spec: SourceSpec, path: str | None) -> bool:
    return path is None or spec.format == "datasets" or _is_saved_dataset(path)


def source_key(spec: SourceSpec, base_dir: str) -> str:
    """Key of the ingested source: the input's content (file bytes, or a dataset's fingerprint) and how it is read.

    Example: source_key(SourceSpec(path="x.jsonl"), ".") -> 20 hex chars
    """
    path = _local_path(spec, base_dir)
    if _is_dataset(spec, path):
        _, _, fingerprint = _read_dataset(spec, path)  # memory-mapped: opening reads no rows
    else:
        fingerprint = files_fingerprint(path)
    how = spec.model_dump(mode="json", exclude={"path", "hub", "max_cell_bytes", "max_list_items", "compress_parts"})  # change no row
    return chain_key("", {"source": how, "content": fingerprint})


# Reading in chunks -----------------------------------------------------------------------------


def _jsonl_blocks(fs: Any, name: str, max_line_bytes: int | None = None) -> Iterator[tuple[bytes, int]]:
    """Blocks of whole lines of a JSONL(.gz) file, with the 1-based line number of each block's first line.

    A line still open past `max_line_bytes` is an InputError before it is held whole (no 2 GB line in memory).
    """
    opened = fs.open(name, "rb")
    try:
        stream = gzip.GzipFile(fileobj=opened) if name.endswith(".gz") else opened
        line, rest = 1, b""
        while True:
            try:
                data = stream.read(BLOCK_BYTES)
            except (OSError, EOFError) as exc:
                raise InputError(f"not a gzip file: {exc}", where=name) from None
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
            else:
                block, rest = data[:cut], data[cut:]
                yield block, line
                line += block.count(b"\n")
            if max_line_bytes is not None and len(rest) > max_line_bytes:  # `rest` is the start of line `line`
                raise InputError(f"line is longer than {max_line_bytes} bytes (4 x source.max_cell_bytes); "
                                 "raise max_cell_bytes if it is meant", where=f"{name}:{line}")
        if rest.strip():
            yield rest, line
    finally:
        opened.close()


def _parse_block(block: bytes, name: str, first_line: int) -> pa.Table:
    """Arrow's JSON reader on a block; on failure, name the first bad line of the file."""
    try:
        table = pa_json.read_json(io.BytesIO(block))
        table.validate(full=True)  # Arrow's JSON reader lets invalid UTF-8 through into strings
        return table
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        try:
            rows = _parse_lines_strictly(block, name)
        except InputError as exc:  # renumber the block's line into the file's
            line = int(exc.where.rsplit(":", 1)[1]) + first_line - 1
            raise InputError(exc.message, where=f"{name}:{line}") from None
        try:  # the columns of every row: from_pylist would keep only the keys of the first one
            return pa.Table.from_struct_array(pa.array(rows)) if rows else pa.table({})
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"rows do not share one type per column: {exc}", where=f"{name}:{first_line}") from None
        except OverflowError:
            raise InputError("a number does not fit in 64 bits", where=f"{name}:{first_line}") from None


def _first_lines(block: bytes, lines: int) -> bytes:
    """The first `lines` lines of a block."""
    end = 0
    for _ in range(lines):
        end = block.find(b"\n", end) + 1
        if end == 0:
            return block
    return block[:end]


def _file_chunks(spec: SourceSpec, path: str, preview: bool = False) -> Iterator[Chunk]:
    fs, files = _resolve_files(path)
    for name in files:
        if _file_format(name, spec.format) == "parquet":
            try:
                source = name if _is_local(fs) else fs.open(name, "rb")
                reader = pq.ParquetFile(source)
                row = 0
                # One row group at a time: one iterator over the whole file keeps every row group's
                # pre-buffered bytes until it ends (peak memory grew with the file: 0.8 GB at 10M rows).
                groups = range(min(1, reader.num_row_groups) if preview else reader.num_row_groups)
                batches = (b for g in groups for b in reader.iter_batches(
                    batch_size=PREVIEW_ROWS if preview else BATCH_ROWS, row_groups=[g]))
                for batch in batches:
                    yield Chunk(pa.Table.from_batches([batch]), name, row, False)
                    row += batch.num_rows
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputError(f"not a readable Parquet file: {exc}", where=name) from None
            continue
        empty = True
        for block, line in _jsonl_blocks(fs, name, 4 * spec.max_cell_bytes):
            if block.strip():
                empty = False
                if preview:  # only the first lines are parsed: a bad line further down is the run's to report
                    block = _first_lines(block, PREVIEW_ROWS)
                yield Chunk(_parse_block(block, name, line), name, line, True)
        if empty:
            raise InputError("file is empty", where=name)


def raw_chunks(spec: SourceSpec, base_dir: str, preview: bool = False) -> Iterator[Chunk]:
    """The source's raw rows in chunks, in source order (`preview`: small first chunks only).

    Example: next(raw_chunks(spec, ".")).table
    """
    for chunk in _unchecked_chunks(spec, base_dir, preview):
        check_cell_sizes(chunk, spec.max_cell_bytes, spec.max_list_items)
        yield chunk


def _unchecked_chunks(spec: SourceSpec, base_dir: str, preview: bool) -> Iterator[Chunk]:
    path = _local_path(spec, base_dir)
    if _is_dataset(spec, path):
        table, origins, _ = _read_dataset(spec, path)
        row = 0
        for batch in table.to_batches(max_chunksize=BATCH_ROWS):
            yield Chunk(pa.Table.from_batches([batch]), origins[0][0], row, False)
            row += batch.num_rows
        return
    yield from _file_chunks(spec, path, preview)


# Size limits of one cell -------------------------------------------------------------------------


def check_cell_sizes(chunk: Chunk, max_bytes: int, max_items: int) -> None:
    """InputError naming file:line (or row) and column of the first cell past a size limit.

    Strings and binaries are measured in bytes, lists in items, at every depth (a list of
    structs of lists is walked through). Example: check_cell_sizes(chunk, 64 << 20, 100_000)
    """
    for name in chunk.table.column_names:
        if _depth(chunk.table.schema.field(name).type) > MAX_DEPTH:
            raise InputError(f"column '{name}' is nested more than {MAX_DEPTH} levels deep", where=chunk.where(chunk.start))
        offset = 0
        for array in chunk.table.column(name).chunks:
            found = _first_oversized(array, np.arange(offset, offset + len(array)), max_bytes, max_items)
            if found is not None:
                row, what = found
                raise InputError(f"column '{name}' holds {what}", where=chunk.where(chunk.start + int(row)))
            offset += len(array)


def _depth(kind: pa.DataType, limit: int = MAX_DEPTH + 1) -> int:
    """Levels of nesting of a type, counted up to `limit` (0 for a flat one). Example: _depth(pa.list_(pa.int8())) -> 1"""
    level, layer = 0, [kind]
    while level < limit:
        layer = [t.field(i).type for t in layer for i in range(t.num_fields)]
        if not layer:
            return level
        level += 1
    return level


def _first_oversized(array: pa.Array, rows: np.ndarray, max_bytes: int, max_items: int) -> tuple[int, str] | None:
    """(row, description) of the first value of `array` past a limit; `rows[i]` is the row of value i."""
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
            or pa.types.is_large_binary(kind):
        return _first_over(pc.binary_length(array), rows, max_bytes, "a string of {} bytes (source.max_cell_bytes is {})")
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        found = _first_over(pc.list_value_length(array), rows, max_items, "a list of {} items (source.max_list_items is {})")
        if found is not None:
            return found
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        return _first_oversized(array.flatten(), rows[parents], max_bytes, max_items)
    if pa.types.is_struct(kind):
        for i in range(kind.num_fields):
            found = _first_oversized(array.field(i), rows, max_bytes, max_items)
            if found is not None:
                return found
    return None


def _first_over(lengths: pa.Array, rows: np.ndarray, limit: int, message: str) -> tuple[int, str] | None:
    over = pc.fill_null(pc.greater(lengths, limit), False)
    if not pc.any(over).as_py():
        return None
    i = pc.index(over, True).as_py()
    return int(rows[i]), message.format(lengths[i].as_py(), limit)


def _count_rows(spec: SourceSpec, base_dir: str) -> int:
    """Rows of the whole source (for `sample:`): Parquet metadata, JSONL lines, dataset length."""
    path = _local_path(spec, base_dir)
    if _is_dataset(spec, path):
        return _read_dataset(spec, path)[0].num_rows
    fs, files = _resolve_files(path)
    total = 0
    for name in files:
        if _file_format(name, spec.format) == "parquet":
            total += pq.ParquetFile(name if _is_local(fs) else fs.open(name, "rb")).metadata.num_rows
        else:
            total += sum(sum(1 for line in block.split(b"\n") if line.strip()) for block, _ in _jsonl_blocks(fs, name))
    return total


def selected_chunks(spec: SourceSpec, base_dir: str, preview: bool = False) -> Iterator[tuple[Chunk, np.ndarray]]:
    """Chunks after `limit` then `sample` (the same rows `sources.select_rows` picks), with global positions.

    Example: [len(p) for _, p in selected_chunks(SourceSpec(path="x.jsonl", limit=3), ".")] -> [3]
    """
    keep: np.ndarray | None = None
    if spec.sample is not None and not preview:
        total = _count_rows(spec, base_dir)
        total = min(total, spec.limit) if spec.limit is not None else total
        if spec.sample.n < total:
            rng = np.random.default_rng(spec.sample.seed)
            keep = np.sort(rng.choice(total, size=spec.sample.n, replace=False))
    start = 0
    for chunk in raw_chunks(spec, base_dir, preview):
        n = chunk.table.num_rows
        chunk.start = start
        positions = np.arange(start, start + n)
        start += n
        if spec.limit is not None:
            positions = positions[positions < spec.limit]
        if keep is not None:
            positions = positions[np.isin(positions, keep)]
        if len(positions):
            local = positions - chunk.start
            if len(local) != n:
                chunk.table = chunk.table.take(pa.array(local))
            yield chunk, positions
        if spec.limit is not None and start >= spec.limit:
            return


def _parse_lines_strictly(raw: bytes, name: str) -> list[dict]:
    """Parse JSONL line by line, raising InputError with file:line for the first bad line."""
    rows: list[dict] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"line is not valid UTF-8 (byte {exc.start})", where=f"{name}:{number}") from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"line is not valid JSON: {exc.msg}", where=f"{name}:{number}") from None
        except RecursionError:
            raise InputError("line is nested too deeply", where=f"{name}:{number}") from None
        if not isinstance(row, dict):
            raise InputError(f"line is a JSON {type(row).__name__}, expected an object", where=f"{name}:{number}")
        rows.append(row)
    return rows
