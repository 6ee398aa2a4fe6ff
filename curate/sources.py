"""Sources: read prompts or preference pairs into one Arrow table that follows the data contract.

Reads a Parquet file, folder or glob; JSONL and JSONL.gz; a `datasets` dataset saved to disk;
or a Hub dataset id (where the Hub is reachable). Any fsspec URL works as a path, so
`hf://datasets/<id>/<file>` reads one file of a Hub repo. `parse: hh` turns Anthropic HH-RLHF
dialogues (`\\n\\nHuman:` / `\\n\\nAssistant:` turns) into a conversational prompt plus the chosen
and rejected final assistant replies.

After ingest every row has a unique string `id` (a content hash of the source row when the source
has none), `prompt` as `list<struct<role, content>>`, `chosen` / `rejected` as strings and
`responses` as `list<struct<text, model, finish_reason, n_tokens>>` where present (DESIGN.md §1).
Leaves out: reading in chunks (`curate.reading`) and storing the source as parts (`curate.ingest`).

Example: ingest(SourceSpec(path="pipelines/data/quickstart.jsonl"), base_dir=".").table.num_rows
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

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
    compress_parts: bool = Field(False, description="LZ4-compress the stored source parts: about half the disk, "
                                 "a slower ingest (README, Benchmarks)")
    max_cell_bytes: int = Field(64 << 20, ge=1, description="longest string (bytes) a cell may hold; a JSONL line "
                                "longer than 4x this is refused before it is parsed")
    max_list_items: int = Field(100_000, ge=1, description="most items a list cell (or a list inside one) may hold")

    @field_validator("path")
    @classmethod
    def _remember_url_secrets(cls, path: str | None) -> str | None:
        """Credentials in an fsspec URL (`https://user:pw@host/x.jsonl`) become secrets (curate.redaction)."""
        if path is not None and "://" in path:
            from curate.redaction import redact_url

            redact_url(path)
        return path

    @field_serializer("path")
    def _path_redacted(self, path: str | None) -> str | None:
        """plan.json and the card get a URL without its credentials."""
        if path is None or "://" not in path:
            return path
        from curate.redaction import redact_url

        return redact_url(path)

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


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def files_fingerprint(path: str) -> str:
    """Content hash of every file behind a file, folder or glob path.

    Example: files_fingerprint("pipelines/data/quickstart.jsonl") -> 20 hex chars
    """
    fs, files = _resolve_files(path)
    return digest(*[file_digest(fs.unstrip_protocol(name)) for name in files])


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
            _check_turns(array, flat, name, where)
            turns = pa.StructArray.from_arrays(
                [pc.cast(flat.field("role"), pa.string()), pc.cast(flat.field("content"), pa.string())],
                fields=list(MESSAGE),
            )
            offsets = pc.subtract(array.offsets, array.offsets[0])
            return pa.ListArray.from_arrays(offsets, turns, type=MESSAGES)
    raise InputError(f"'{name}' must be a string or a list of {{role, content}} messages, found {array.type}")


def _check_turns(array: pa.ListArray, flat: pa.StructArray, name: str, where: Any) -> None:
    """InputError at the first row whose messages break the contract: none at all, a role TRL does
    not know, a null or non-text role or content (a number where text is expected is not cast)."""
    lengths = pc.fill_null(pc.list_value_length(array), 0)
    if len(array) and pc.min(lengths).as_py() == 0:
        raise InputError(f"'{name}' has no messages", where=where(pc.index(lengths, 0).as_py()))
    parents = pc.list_parent_indices(array)
    for part in ("role", "content"):
        values = flat.field(part)
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise InputError(f"'{name}' message {part}s must be text, found {values.type}", where=where(parents[0].as_py()))
        if values.null_count:
            raise InputError(f"'{name}' has a message without {part}",
                             where=where(parents[pc.index(values.is_null(), True).as_py()].as_py()))
    from curate.trl_check import PROMPT_ROLES  # the roles TRL's conversational form accepts

    unknown = pc.invert(pc.is_in(flat.field("role"), pa.array(PROMPT_ROLES)))
    if pc.any(unknown).as_py():
        i = pc.index(unknown, True).as_py()
        raise InputError(f"'{name}' has a message with role {flat.field('role')[i].as_py()!r} (roles: {', '.join(PROMPT_ROLES)})",
                         where=where(parents[i].as_py()))


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
        text_type = children["text"].type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or pa.types.is_null(text_type)):
            raise InputError(f"'responses' texts must be text, found {text_type}")
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
    """Read a whole source into one table (for library use and small data), through the same
    streaming ingest a run uses (`curate.ingest`), so ids, drops and errors are identical.

    Example: ingest(SourceSpec(path="pipelines/data/prompts.jsonl"), ".").table.num_rows -> 12
    """
    import tempfile

    from curate.ingest import ingest_source, source_key
    from curate.store import Store

    with tempfile.TemporaryDirectory(prefix="curate-ingest-") as tmp:
        store = Store(tmp)
        key = source_key(spec, base_dir)
        info = ingest_source(spec, base_dir, store, key)
        parts = [store.read_part(key, i) for i in range(info.n_parts)]
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        rejects = [pq.read_table(path) for i in range(info.n_parts) for path in store.reject_files(key, i).values()]
        rejected = pa.concat_tables(rejects, promote_options="permissive") if rejects else None
    return Ingested(table=table, rejected=rejected, fingerprint=key)
