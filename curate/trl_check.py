"""`curate validate --trl`: do a run's shards have TRL's explicit-prompt conversational preference form?

The form TRL's DPOTrainer reads without conversion: `prompt`, `chosen` and `rejected` are each a
list of `{role, content}` turns (strings); the prompt ends with a user turn (optionally after
system / assistant / tool turns); `chosen` and `rejected` hold assistant turns only; no turn is
null or has empty (or whitespace-only) content; every shard has one schema. Rows are checked
column-wise with Arrow compute, batch by batch (a dataset never has to fit in memory); the
first `max_problems` bad rows are described by shard, row and `id`.
Leaves out: tokenisation and chat templates (a row can pass and still be too long for a model).

Example: check_trl("out/quickstart").ok -> True
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.errors import ConfigError
from curate.record import STATS_FILE, load_run

COLUMNS = ("prompt", "chosen", "rejected")
PROMPT_ROLES = ("system", "user", "assistant", "tool")
BATCH_ROWS = 8192


@dataclass
class Problem:
    """One row (or shard) that breaks the form. Example: Problem("data/x.parquet", 3, "r3", "chosen turn 0 has empty content")"""

    shard: str
    row: int | None
    id: str | None
    message: str

    def __str__(self) -> str:
        where = self.shard if self.row is None else f"{self.shard} row {self.row}"
        return f"{where}{f' (id {self.id})' if self.id is not None else ''}: {self.message}"


@dataclass
class TrlReport:
    """What `check_trl` found. Example: report.ok, report.problems[0].row"""

    path: str
    shards: int = 0
    rows: int = 0
    bad_rows: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """Lines for the CLI. Example: report.summary().splitlines()[0]"""
        if self.ok:
            return (f"{self.path}: ok: {self.rows:,} rows in {self.shards} shard(s) have TRL's explicit-prompt "
                    "conversational preference form (prompt ends with a user turn, chosen/rejected are assistant "
                    "turns, no empty content, one schema)")
        head = f"{self.path}: does not have TRL's conversational preference form"
        if self.bad_rows:
            head += f": {self.bad_rows:,} of {self.rows:,} rows break it"
        lines = [head] + [f"  {p}" for p in self.problems]
        hidden = self.bad_rows - sum(p.row is not None for p in self.problems)
        if hidden > 0:
            lines.append(f"  ... and {hidden:,} more rows")
        return "\n".join(lines)


def shard_files(path: str) -> list[str]:
    """The Parquet shards to check: a run folder's published shards, a folder's *.parquet, or one file.

    Example: shard_files("out/q") -> ['out/q/data/train-00000-of-00002.parquet', ...]
    """
    if os.path.isfile(path):
        return [path]
    if os.path.exists(os.path.join(path, STATS_FILE)):
        files = load_run(path).data_files
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".parquet"))
    else:
        raise ConfigError("no such run folder or Parquet file", where=path)
    if not files:
        raise ConfigError("no Parquet shards found (a run folder's data/*.parquet, or a folder of *.parquet)", where=path)
    return files


def _is_turns(dtype: pa.DataType) -> bool:
    """list<struct<role: string, content: string>> (large variants allowed)."""
    if not (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)):
        return False
    item = dtype.value_type
    if not pa.types.is_struct(item):
        return False
    names = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    return all(n in names and (pa.types.is_string(names[n]) or pa.types.is_large_string(names[n]))
               for n in ("role", "content"))


def schema_problems(schema: pa.Schema, shard: str, first: pa.Schema | None, first_name: str) -> list[Problem]:
    """Missing or mistyped columns, or a schema that differs from the first shard's.

    Example: schema_problems(pa.schema([("prompt", pa.string())]), "a.parquet", None, "")[0].message
    """
    problems = []
    for column in COLUMNS:
        if column not in schema.names:
            problems.append(Problem(shard, None, None, f"has no '{column}' column"))
        elif not _is_turns(schema.field(column).type):
            problems.append(Problem(shard, None, None, f"column '{column}' is {schema.field(column).type}, expected "
                                    "list<struct<role: string, content: string>> (format.trl writes it)"))
    if first is not None and not problems and not schema.equals(first, check_metadata=False):
        theirs = {f.name: f.type for f in first}
        ours = {f.name: f.type for f in schema}
        diff = sorted(n for n in set(theirs) | set(ours) if theirs.get(n) != ours.get(n))
        problems.append(Problem(shard, None, None, f"schema differs from {first_name} in column(s) {', '.join(diff)}"))
    return problems


def bad_rows(column: str, array: pa.Array) -> np.ndarray:
    """Boolean per row: the column's turns break the form (null, no turns, bad role, empty content, prompt end).

    Example: bad_rows("chosen", pa.array([[{"role": "user", "content": "x"}]], MESSAGES)) -> array([ True])
    """
    n = len(array)
    lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False)
    bad = np.asarray(array.is_null().to_numpy(zero_copy_only=False)) | (lengths == 0)
    flat = pc.list_flatten(array)
    if len(flat) == 0:
        return bad
    parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
    roles, contents = pc.struct_field(flat, "role"), pc.struct_field(flat, "content")
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(contents), ""), True)
    wrong_role = pc.invert(pc.is_in(roles, pa.array(PROMPT_ROLES if column == "prompt" else ("assistant",))))
    element_bad = pc.or_(pc.or_(flat.is_null(), pc.fill_null(wrong_role, True)), empty)
    bad[parents[np.asarray(element_bad.to_numpy(zero_copy_only=False))]] = True
    if column == "prompt":
        ends = np.cumsum(lengths) - 1
        has_turns = lengths > 0
        last_roles = pc.take(roles, pa.array(ends[has_turns])).to_numpy(zero_copy_only=False)
        bad[np.nonzero(has_turns)[0][last_roles != "user"]] = True
    return bad


def describe(column: str, turns: list[dict[str, Any]] | None) -> str | None:
    """The first thing wrong with one row's turns, in words, or None.

    Example: describe("prompt", [{"role": "assistant", "content": "hi"}]) -> "prompt ends with a 'assistant' turn; ..."
    """
    if turns is None:
        return f"{column} is null"
    if not turns:
        return f"{column} has no turns"
    for k, turn in enumerate(turns):
        if turn is None:
            return f"{column} turn {k} is null"
        role, content = turn.get("role"), turn.get("content")
        if column == "prompt" and role not in PROMPT_ROLES:
            return f"prompt turn {k} has role {role!r} (expected one of {', '.join(PROMPT_ROLES)})"
        if column != "prompt" and role != "assistant":
            return f"{column} turn {k} has role {role!r}, expected 'assistant' (the prompt holds the turns before the reply)"
        if content is None or not content.strip():
            return f"{column} turn {k} ({role}) has empty content"
    if column == "prompt" and turns[-1]["role"] != "user":
        return f"prompt ends with a {turns[-1]['role']!r} turn; it must end with the user turn the replies answer"
    return None


def check_trl(path: str, max_problems: int = 20) -> TrlReport:
    """Check every shard of a run folder (or a Parquet folder / file) against TRL's conversational form.

    Example: print(check_trl("out/quickstart").summary())
    """
    files = shard_files(path)
    report = TrlReport(path, shards=len(files))
    base = path if os.path.isdir(path) else os.path.dirname(path)
    first: pa.Schema | None = None
    first_name = ""
    for file in files:
        name = os.path.relpath(file, base)
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
        found = schema_problems(schema, name, first, first_name)
        if first is None:
            first, first_name = schema, name
        report.rows += parquet.metadata.num_rows
        if found:
            report.problems.extend(found)
            continue
        columns = list(COLUMNS) + (["id"] if "id" in schema.names else [])
        offset = 0
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            flagged = np.zeros(batch.num_rows, dtype=bool)
            for column in COLUMNS:
                flagged |= bad_rows(column, batch.column(column))
            for row in np.nonzero(flagged)[0]:
                report.bad_rows += 1
                if len(report.problems) >= max_problems:
                    continue
                values = {c: batch.column(c)[int(row)].as_py() for c in columns}
                message = next((m for m in (describe(c, values[c]) for c in COLUMNS) if m), "breaks the form")
                report.problems.append(Problem(name, offset + int(row), values.get("id"), message))
            offset += batch.num_rows
    return report
