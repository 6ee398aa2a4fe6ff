"""Sources: read prompts or preference pairs into one Arrow table that follows the data contract.

Reads a Parquet file, folder or glob; JSONL and JSONL.gz; a `datasets` dataset saved to disk;
or a Hub dataset id (where the Hub is reachable). Any fsspec URL works as a path, so
`hf://datasets/<id>/<file>` reads one file of a Hub repo. `parse: hh` turns Anthropic HH-RLHF
dialogues (`\\n\\nHuman:` / `\\n\\nAssistant:` turns) into a conversational prompt plus the chosen
and rejected final assistant replies.

After ingest every row has a unique string `id` (a content hash of the source row when the source
has none), `prompt` as `list<struct<role, content>>`, `chosen` / `rejected` as strings and
`responses` as `list<struct<text, model, finish_reason, n_tokens>>` where present (DESIGN.md §1).
Leaves out: streaming sources larger than memory (the whole source is read once per run).

Example: ingest(SourceSpec(path="pipelines/data/quickstart.jsonl"), base_dir=".").table.num_rows
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate.contract import MESSAGE, MESSAGES, RESPONSE, RESPONSES, with_reason
from curate.errors import InputError
from curate.keys import canonical_json, digest, file_digest

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


class SampleSpec(BaseModel):
    """A seeded sample of `n` rows without replacement (source order is kept).

    Example: SampleSpec(n=100, seed=0)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    n: int = Field(ge=1, description="number of rows to draw")
    seed: int = Field(0, description="seed of the draw")


class SourceSpec(BaseModel):
    """Where the input comes from and how to read it.

    Example: SourceSpec(path="data/*.parquet", limit=1000)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str | None = Field(None, description="file, folder or glob; local (relative to the YAML) or fsspec URL")
    hub: str | None = Field(None, description="Hub dataset id, read with datasets.load_dataset")
    name: str | None = Field(None, description="Hub dataset config name")
    data_dir: str | None = Field(None, description="Hub dataset sub-folder (e.g. harmless-base)")
    split: str = Field("train", description="split to read from a Hub or saved dataset")
    format: Literal["auto", "parquet", "jsonl", "datasets"] = Field("auto", description="file format")
    parse: Literal["none", "hh"] = Field("none", description="'hh' parses HH-RLHF dialogues")
    limit: int | None = Field(None, ge=1, description="keep only the first N source rows")
    sample: SampleSpec | None = Field(None, description="seeded random sample of source rows")
    part_rows: int = Field(10_000, ge=1, description="rows per part; decides the partition layout")

    @model_validator(mode="after")
    def _one_location(self) -> "SourceSpec":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' or 'hub'")
        return self


@dataclass
class Ingested:
    """The ingested table, rows dropped at ingest (with `reason`), and a content fingerprint.

    Example: ingested.table.column("id")
    """

    table: pa.Table
    rejected: pa.Table | None
    fingerprint: str | None
    origins: list[tuple[str, int]] = field(default_factory=list)


# Reading ----------------------------------------------------------------------------------------


def _resolve_files(path: str) -> tuple[Any, list[str]]:
    """The filesystem and sorted file list behind a file, folder or glob path."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(path)
        if any(ch in root for ch in "*?["):
            files = sorted(fs.glob(root))
        elif fs.isdir(root):
            files = sorted(
                p for p in fs.find(root) if p.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES) and "/." not in p
            )
        elif fs.exists(root):
            files = [root]
        else:
            raise InputError("no such file or folder", where=path)
    except InputError:
        raise
    except Exception as exc:  # remote filesystems raise their own types (HTTP, DNS, auth)
        raise InputError(f"cannot read ({type(exc).__name__}: {exc}); is the Hub or server reachable?", where=path) from None
    if not files:
        raise InputError("matches no .parquet or .jsonl files", where=path)
    return fs, files


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")) or (
        os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json"))
    )


def _file_format(name: str, declared: str) -> str:
    if declared != "auto":
        return declared
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise InputError("cannot tell the format from the file name; set source.format", where=name)


def _read_jsonl(fs: Any, name: str) -> pa.Table:
    """Read JSON lines with Arrow; on failure, find the first bad line and name it."""
    with fs.open(name, "rb") as f:
        raw = f.read()
    if name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except OSError as exc:
            raise InputError(f"not a gzip file: {exc}", where=name) from None
    if not raw.strip():
        raise InputError("file is empty", where=name)
    try:
        table = pa_json.read_json(io.BytesIO(raw))
        table.validate(full=True)  # Arrow's JSON reader lets invalid UTF-8 through into strings
        return table
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as arrow_error:
        rows = _parse_lines_strictly(raw, name)
        try:
            return pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"rows do not share one type per column: {exc}", where=name) from None
        finally:
            log.debug("arrow JSON reader failed (%s); parsed %s line by line", arrow_error, name)


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
        if not isinstance(row, dict):
            raise InputError(f"line is a JSON {type(row).__name__}, expected an object", where=f"{name}:{number}")
        rows.append(row)
    return rows


def _read_parquet(fs: Any, name: str) -> pa.Table:
    try:
        if _is_local(fs):
            return pq.read_table(name)  # Arrow's own multi-threaded local reader
        with fs.open(name, "rb") as f:
            return pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet file: {exc}", where=name) from None


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def files_fingerprint(path: str) -> str:
    """Content hash of every file behind a file, folder or glob path.

    Example: files_fingerprint("pipelines/data/quickstart.jsonl") -> 20 hex chars
    """
    fs, files = _resolve_files(path)
    return digest(*[file_digest(fs.unstrip_protocol(name)) for name in files])


def _read_files(spec: SourceSpec, path: str) -> tuple[pa.Table, list[tuple[str, int]], str | None]:
    """Read every file behind `path`; return the table and (file, rows) origins (no fingerprint)."""
    fs, files = _resolve_files(path)
    tables, origins = [], []
    for name in files:
        fmt = _file_format(name, spec.format)
        table = _read_parquet(fs, name) if fmt == "parquet" else _read_jsonl(fs, name)
        tables.append(table)
        origins.append((name, table.num_rows))
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"files do not share one schema: {exc}", where=path) from None
    return table, origins, None


def _read_dataset(spec: SourceSpec, path: str | None) -> tuple[pa.Table, list[tuple[str, int]], str]:
    """Read a `datasets` dataset saved to disk, or one from the Hub."""
    import datasets

    where = path or spec.hub or ""
    try:
        if path is not None:
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.split]
        else:
            ds = datasets.load_dataset(spec.hub, spec.name, data_dir=spec.data_dir, split=spec.split)
    except KeyError:
        raise InputError(f"dataset has no split '{spec.split}'", where=where) from None
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise InputError(f"could not load dataset: {exc}", where=where) from None
    table = ds.data.table if ds._indices is None else ds.flatten_indices().data.table
    return pa.table(table), [(where, ds.num_rows)], digest(ds._fingerprint)


def read_source(spec: SourceSpec, base_dir: str) -> tuple[pa.Table, list[tuple[str, int]], str | None]:
    """Read the raw source table, with row origins and, for datasets, their fingerprint.

    File sources return None as fingerprint: `files_fingerprint` hashes them without parsing.

    Example: read_source(SourceSpec(path="x.jsonl"), ".")[0].num_rows
    """
    if spec.hub is not None:
        return _read_dataset(spec, None)
    path = spec.path if "://" in spec.path or os.path.isabs(spec.path) else os.path.join(base_dir, spec.path)
    if spec.format == "datasets" or _is_saved_dataset(path):
        return _read_dataset(spec, path)
    return _read_files(spec, path)


# Row selection --------------------------------------------------------------------------------


def select_rows(table: pa.Table, spec: SourceSpec) -> tuple[pa.Table, np.ndarray]:
    """Apply `limit` then `sample`; return the rows and their positions in the source.

    Example: select_rows(t, SourceSpec(path="x", limit=2))[1] -> array([0, 1])
    """
    positions = np.arange(table.num_rows)
    if spec.limit is not None:
        positions = positions[: spec.limit]
    if spec.sample is not None and spec.sample.n < len(positions):
        rng = np.random.default_rng(spec.sample.seed)
        positions = np.sort(rng.choice(positions, size=spec.sample.n, replace=False))
    if len(positions) == table.num_rows:
        return table, positions
    return table.take(pa.array(positions)), positions


def _where(origins: list[tuple[str, int]], position: int) -> str:
    """file:line (JSONL) or 'file row N' (others) for a position in the concatenated source."""
    for name, rows in origins:
        if position < rows:
            return f"{name}:{position + 1}" if name.endswith(JSONL_SUFFIXES) else f"{name} row {position}"
        position -= rows
    return f"row {position}"


# HH-RLHF dialogues ----------------------------------------------------------------------------

_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_dialogue(text: str) -> list[tuple[str, str]] | None:
    """Split an HH-RLHF dialogue into (role, content) turns; None when it is not in that form.

    Example: parse_hh_dialogue("\\n\\nHuman: hi\\n\\nAssistant: yo") -> [("user", "hi"), ("assistant", "yo")]
    """
    pieces = _TURN.split(text)
    if pieces[0].strip() or len(pieces) < 3:
        return None
    return [(_ROLES[pieces[i]], pieces[i + 1].strip()) for i in range(1, len(pieces), 2)]


def parse_hh_pair(chosen: str, rejected: str) -> tuple[list[tuple[str, str]], str, str] | str:
    """Shared prompt turns plus the chosen and rejected final replies, or a drop reason.

    Example: parse_hh_pair(c, r) -> ([("user", "hi")], "good reply", "bad reply")
    """
    c, r = parse_hh_dialogue(chosen or ""), parse_hh_dialogue(rejected or "")
    if c is None or r is None:
        return "hh_malformed_dialogue"
    if c[-1][0] != "assistant" or r[-1][0] != "assistant":
        return "hh_no_final_assistant_reply"
    if c[:-1] != r[:-1]:
        return "hh_prompt_mismatch"
    return c[:-1], c[-1][1], r[-1][1]


def _parse_hh(table: pa.Table) -> tuple[pa.Table, pa.Table | None, np.ndarray]:
    """Replace HH `chosen` / `rejected` dialogues with prompt messages and final replies."""
    for column in ("chosen", "rejected"):
        if column not in table.column_names or not pa.types.is_string(table.schema.field(column).type):
            raise InputError(f"parse: hh needs string columns 'chosen' and 'rejected'; found {table.schema}")
    prompts, chosen, rejected, keep, reasons = [], [], [], [], []
    for c, r in zip(table.column("chosen").to_pylist(), table.column("rejected").to_pylist()):
        parsed = parse_hh_pair(c, r)
        if isinstance(parsed, str):
            keep.append(False)
            reasons.append(parsed)
            continue
        turns, good, bad = parsed
        keep.append(True)
        prompts.append([{"role": role, "content": content} for role, content in turns])
        chosen.append(good)
        rejected.append(bad)
    mask = pa.array(keep)
    dropped = table.filter(pc.invert(mask))
    rejected_rows = with_reason(dropped, pa.array(reasons, pa.string())) if dropped.num_rows else None
    kept = table.filter(mask)
    kept = kept.set_column(kept.schema.get_field_index("chosen"), "chosen", pa.array(chosen, pa.string()))
    kept = kept.set_column(kept.schema.get_field_index("rejected"), "rejected", pa.array(rejected, pa.string()))
    prompt = pa.array(prompts, MESSAGES)
    if "prompt" in kept.column_names:
        kept = kept.set_column(kept.schema.get_field_index("prompt"), "prompt", prompt)
    else:
        kept = kept.append_column("prompt", prompt)
    return kept, rejected_rows, np.asarray(keep, dtype=bool)


# Normalisation to the data contract ----------------------------------------------------------


def _row_ids(table: pa.Table) -> pa.Array:
    """Content-hash ids for rows of a source without `id`; repeats get a -2, -3 ... suffix."""
    seen: dict[str, int] = {}
    ids = []
    for row in table.to_pylist():
        base = digest(canonical_json(_jsonable(row)))
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return pa.array(ids, pa.string())


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return repr(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _normalize_ids(table: pa.Table, where: Any) -> pa.Table:
    if "id" not in table.column_names:
        return table.add_column(0, "id", _row_ids(table))
    ids = table.column("id")
    if ids.null_count:
        first = pc.index(pc.is_null(ids), True).as_py()
        raise InputError("'id' is null", where=where(first))
    if not pa.types.is_string(ids.type):
        ids = pc.cast(ids, pa.string())
    series = pl.from_arrow(ids)
    if series.n_unique() != len(ids):  # polars: ~7x faster than Arrow's count_distinct here
        repeat = int((~series.is_first_distinct()).arg_true()[0])  # the first row whose id was seen before
        dup = ids[repeat].as_py()
        first = pc.index(ids, dup).as_py()
        raise InputError(f"'id' {dup!r} is not unique (first at {where(first)})", where=where(repeat))
    index = table.schema.get_field_index("id")
    table = table.remove_column(index)
    return table.add_column(0, "id", ids)


def _as_messages(column: pa.ChunkedArray, name: str, where: Any) -> pa.Array:
    """A string column becomes one user turn per row; a list of {role, content} is cast."""
    array = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if array.null_count:
        raise InputError(f"'{name}' is null", where=where(pc.index(array.is_null(), True).as_py()))
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        array = pc.cast(array, pa.string())
        offsets = pa.array(np.arange(len(array) + 1, dtype=np.int32))
        roles = pa.array(np.full(len(array), "user", dtype=object), pa.string())
        turns = pa.StructArray.from_arrays([roles, array], fields=list(MESSAGE))
        return pa.ListArray.from_arrays(offsets, turns, type=MESSAGES)
    if pa.types.is_list(array.type) and pa.types.is_struct(array.type.value_type):
        fields = {f.name for f in array.type.value_type}
        if {"role", "content"} <= fields:
            flat = array.flatten()
            turns = pa.StructArray.from_arrays(
                [pc.cast(flat.field("role"), pa.string()), pc.cast(flat.field("content"), pa.string())],
                fields=list(MESSAGE),
            )
            offsets = pc.subtract(array.offsets, array.offsets[0])
            return pa.ListArray.from_arrays(offsets, turns, type=MESSAGES)
    raise InputError(f"'{name}' must be a string or a list of {{role, content}} messages, found {array.type}")


def _as_reply(column: pa.ChunkedArray, name: str, where: Any) -> pa.Array:
    """`chosen` / `rejected` as a string: messages keep the content of their last turn."""
    array = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if array.null_count:
        raise InputError(f"'{name}' is null", where=where(pc.index(array.is_null(), True).as_py()))
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return pc.cast(array, pa.string())
    messages = _as_messages(pa.chunked_array([array]), name, where)
    lengths = pc.list_value_length(messages)
    if len(messages) and pc.min(lengths).as_py() == 0:
        raise InputError(f"'{name}' has no messages", where=where(pc.index(lengths, 0).as_py()))
    last = pc.subtract(messages.offsets[1:], 1)  # offsets are zero-based after _as_messages
    return messages.values.take(last).field("content")


def _as_responses(column: pa.ChunkedArray, where: Any) -> pa.Array:
    """`responses` as list<struct<text, model, finish_reason, n_tokens>> (missing fields null)."""
    array = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if not pa.types.is_list(array.type):
        raise InputError(f"'responses' must be a list, found {array.type}")
    flat = array.flatten()
    if pa.types.is_string(flat.type):
        texts = flat
        children = {"text": texts}
    elif pa.types.is_struct(flat.type) and "text" in {f.name for f in flat.type}:
        children = {f.name: flat.field(f.name) for f in flat.type}
    else:
        raise InputError(f"'responses' must hold strings or {{text, ...}} structs, found {array.type}")
    arrays = [
        pc.cast(children[f.name], f.type) if f.name in children else pa.nulls(len(flat), f.type) for f in RESPONSE
    ]
    structs = pa.StructArray.from_arrays(arrays, fields=list(RESPONSE))
    offsets = pc.subtract(array.offsets, array.offsets[0])
    return pa.ListArray.from_arrays(offsets, structs, type=RESPONSES, mask=array.is_null() if array.null_count else None)


def normalize(table: pa.Table, where: Any) -> pa.Table:
    """Bring a raw table to the contract: id first, prompt as messages, typed replies/responses.

    Example: normalize(pa.table({"prompt": ["hi"]}), str).schema.names -> ['id', 'prompt']
    """
    if "prompt" not in table.column_names:
        raise InputError(f"the source has no 'prompt' column (columns: {', '.join(table.column_names)})")
    columns = {"prompt": lambda c: _as_messages(c, "prompt", where)}
    for reply in ("chosen", "rejected"):
        columns[reply] = lambda c, reply=reply: _as_reply(c, reply, where)
    columns["responses"] = lambda c: _as_responses(c, where)
    for name, convert in columns.items():
        if name in table.column_names:
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, convert(table.column(name)))
    if "id" not in table.column_names:
        table = table.add_column(0, "id", _row_ids(table))
    order = ["id", "prompt"] + [n for n in table.column_names if n not in ("id", "prompt")]
    return table.select(order)


def ingest(spec: SourceSpec, base_dir: str) -> Ingested:
    """Read, select, parse and normalise a source; raise InputError naming the file and row.

    Example: ingest(SourceSpec(path="pipelines/data/quickstart.jsonl"), ".").table.num_rows -> 24
    """
    raw, origins, fingerprint = read_source(spec, base_dir)
    table, positions = select_rows(raw, spec)
    if table.num_rows == 0:
        raise InputError("the source has no rows", where=spec.path or spec.hub)

    def where(i: int) -> str:
        return _where(origins, int(positions[i]))

    try:
        table = _normalize_ids(table, where)  # ids hash the source row as read, before any parsing
        rejected = None
        if spec.parse == "hh":
            table, rejected, kept = _parse_hh(table)
            positions = positions[kept]
        table = normalize(table, where)
    except InputError as exc:  # a problem with a whole column names the source, not a row
        exc.where = exc.where or spec.path or spec.hub
        raise
    log.info("ingested %d rows from %s", table.num_rows, spec.path or spec.hub)
    return Ingested(table=table, rejected=rejected, fingerprint=fingerprint, origins=origins)
