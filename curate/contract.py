"""The data contract: column types every stage agrees on, and the four kinds of stage.

Data moves between stages as `pyarrow.Table`s. A stage declares, from its input schema, the
schema it outputs (`output_schema`); the plan folds that over the whole chain before any model
loads, and the runner casts every output to it, so Parquet schemas and column order never drift
(DESIGN.md §1–2). Leaves out: execution (see `curate.runner`) and config parsing (`curate.config`).

Kinds:
- map:    `apply(table) -> StageOutput` (same rows or, for pairing, one-to-many; may reject rows)
- filter: `keep(table) -> Verdict` (keep mask + reason); the runner applies the mask
- model:  like map, with heavy state loaded once per process (`open()` / `close()`)
- global: `fit(tables) -> state table`, then a row-local `apply(table, state) -> StageOutput`

Example: class Length(Stage): name = "filters.length"; kind = "filter"; Params = LengthParams
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from curate.errors import SchemaError

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
RESPONSE = pa.struct(
    [
        ("text", pa.string()),
        ("model", pa.string()),
        ("finish_reason", pa.string()),
        ("n_tokens", pa.int32()),
    ]
)
RESPONSES = pa.list_(RESPONSE)
SCORES = pa.list_(pa.float64())
REASON = "reason"

Kind = Literal["map", "filter", "model", "global"]


EXECUTION = {"execution": True}  # the mark of an execution knob in a field's json_schema_extra


def execution_field(default: Any, **kwargs: Any) -> Any:
    """A params field that changes how a stage runs (batch sizes, devices, timeouts), never what it
    outputs: it stays out of the stage key, so changing it re-runs nothing.

    Example: batch_size: int = execution_field(64, ge=1, description="texts per embedding batch")
    """
    return Field(default, json_schema_extra=EXECUTION, **kwargs)


class Params(BaseModel):
    """Base of every stage's params: unknown keys are refused, values are validated.

    Fields made with `execution_field` are execution knobs and stay out of the stage key.
    Example: class P(Params): max_chars: int | None = None
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def execution_params(cls) -> set[str]:
        """The names of the execution knobs (fields made with `execution_field`).

        Example: ModelParams.execution_params() -> {'batch_size', 'timeout', ...}
        """
        return {name for name, field in cls.model_fields.items()
                if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("execution")}

    def key_params(self) -> dict[str, Any]:
        """The params that change output, as plain JSON data (execution knobs left out).

        Example: LengthParams(max_chars=5).key_params() -> {'columns': [...], 'max_chars': 5, ...}
        """
        return self.model_dump(mode="json", exclude=self.execution_params())


class NoParams(Params):
    """For stages without parameters. Example: NoParams()"""


@dataclass(frozen=True)
class Verdict:
    """What a filter returns: keep mask, reason per dropped row, and the table (maybe with scores).

    Example: Verdict(table, keep=pa.array([True, False]), reason=pa.array([None, "empty_prompt"]))
    """

    table: pa.Table
    keep: pa.BooleanArray
    reason: pa.StringArray


@dataclass(frozen=True)
class StageOutput:
    """Rows a stage passes on, rows it rejected (with a `reason` column), and counters for stats.json.

    Counters are summed over parts into the stage's `counters` in stats.json (e.g. generated
    tokens, responses cut by max_tokens, row errors). Example: StageOutput(pairs, rejected, {"truncated": 2})
    """

    table: pa.Table
    rejected: pa.Table | None = None
    counters: dict[str, int | float] = field(default_factory=dict)


class Stage:
    """Tiny base of every stage: a registry name, a version, a kind and validated params.

    Subclasses implement `output_schema` and the method of their kind (`keep`, `apply`, `fit`).
    Example: Length(LengthParams(max_chars=100)).output_schema(schema)
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    kind: ClassVar[Kind]
    Params: ClassVar[type[Params]] = NoParams

    def __init__(self, params: Params | None = None, *, seed: int = 0, stage_id: str | None = None):
        self.params = params if params is not None else self.Params()
        self.seed = seed
        self.stage_id = stage_id or self.name.rsplit(".", 1)[-1]  # names per-row columns like `<id>_error`

    @property
    def error_column(self) -> str:
        """Column for row-level failures of model stages: `<stage id>_error` (DESIGN.md §2)."""
        return f"{self.stage_id}_error"

    # Contract -----------------------------------------------------------------------------
    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """Schema of this stage's output for the given input schema; raise SchemaError if unfit.

        Example: Identity().output_schema(s) == s -> True
        """
        return schema

    def key_material(self) -> dict[str, Any]:
        """What goes into this stage's key: name, version, output-relevant params, seed if used.

        Example: Length().key_material()["name"] -> 'filters.length'
        """
        material: dict[str, Any] = {"name": self.name, "version": self.version, "params": self.params.key_params()}
        if self.uses_seed:  # row seeds hash (row id, stage id, seed): two stages of one kind draw apart
            material["seed"] = self.seed
            material["seed_scope"] = self.stage_id
        return material

    uses_seed: ClassVar[bool] = False

    # Lifecycle (model stages load their backend here, once per process) -------------------
    def open(self) -> None:
        """Load heavy state. Example: stage.open()"""

    def close(self) -> None:
        """Free heavy state. Example: stage.close()"""

    def resources(self) -> dict[str, float]:
        """What one task of this stage needs where it runs, for executors that place tasks.

        A model loaded in-process (`backend: vllm` or `transformers`) asks for one GPU when the
        machine has CUDA; a remote server (`backend: openai`) and cheap stages ask for nothing.
        Example: judge.resources() -> {"GPU": 1} on a CUDA machine, {} on a CPU-only one
        """
        from curate.backends.registry import runs_in_process

        if self.kind != "model" or not runs_in_process(getattr(self.params, "backend", None)):
            return {}
        from curate.backends.cache import cuda_available

        return {"GPU": 1} if cuda_available() else {}

    # Kind-specific entry points -------------------------------------------------------------
    def keep(self, table: pa.Table) -> Verdict:  # filter
        """Filter kind: decide which rows stay and why the others go. Example: stage.keep(t).keep"""
        raise NotImplementedError

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:  # map/model/global
        """Map, model and global kinds: transform a part. Example: stage.apply(t).table"""
        raise NotImplementedError

    def fit_columns(self, schema: pa.Schema) -> list[str]:  # global
        """Global kind: columns `fit` needs, so the runner reads only those. Example: ['id']"""
        return schema.names

    def summarize(self, part: pa.Table) -> pa.Table:  # global
        """Global kind, first pass: reduce one part (its `fit_columns`) to what `fit` needs.

        Runs where the part's task runs (a Dask worker); `fit` then combines the summaries of
        every part on the driver. The default passes the projected columns through.
        Example: dedup.summarize(part).column_names -> ['key', 'id']
        """
        return part

    def fit(self, tables: Iterable[pa.Table]) -> pa.Table:  # global
        """Global kind, second pass: compute the state from every part's summary. Example: stage.fit(summaries)"""
        raise NotImplementedError

    def fit_summary(self, state: pa.Table) -> dict[str, Any]:  # global
        """Global kind: dataset-level numbers of the fitted state for stats.json (`fit` of the stage).

        Counters are summed over parts, so a fitted value such as an estimated flip rate goes
        here instead. Plain JSON values. Example: {"eps_hat": 0.19, "n": 20000}
        """
        return {}


# Schema helpers -----------------------------------------------------------------------------


def require(schema: pa.Schema, columns: dict[str, pa.DataType | tuple[pa.DataType, ...]], stage: str) -> None:
    """Raise SchemaError unless every column exists with (one of) the given type(s).

    Example: require(schema, {"chosen": pa.string()}, "length")
    """
    for column, types in columns.items():
        allowed = types if isinstance(types, tuple) else (types,)
        if column not in schema.names:
            raise SchemaError(
                f"needs column '{column}' ({' or '.join(map(str, allowed))}); "
                f"the input has: {', '.join(schema.names)}",
                where=f"stage '{stage}'",
            )
        actual = schema.field(column).type
        if not any(actual.equals(t) for t in allowed):
            raise SchemaError(
                f"column '{column}' is {actual}, expected {' or '.join(map(str, allowed))}",
                where=f"stage '{stage}'",
            )


def with_fields(schema: pa.Schema, fields: dict[str, pa.DataType]) -> pa.Schema:
    """Replace columns in place or append them at the end, keeping column order stable.

    Example: with_fields(pa.schema([("a", pa.int64())]), {"b": pa.string()}).names -> ['a', 'b']
    """
    for name, dtype in fields.items():
        index = schema.get_field_index(name)
        if index >= 0:
            schema = schema.set(index, pa.field(name, dtype))
        else:
            schema = schema.append(pa.field(name, dtype))
    return schema


def conform(table: pa.Table, schema: pa.Schema, stage: str) -> pa.Table:
    """Select and cast a table to a declared schema; raise StageError naming what differs.

    Example: conform(t, stage_schema, "pairs").schema == stage_schema -> True
    """
    from curate.errors import StageError

    if table.schema.equals(schema):
        return table
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise StageError(
            f"output columns differ from the declared schema (missing {missing}, undeclared {extra})",
            where=f"stage '{stage}'",
        )
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise StageError(f"output does not cast to the declared schema: {exc}", where=f"stage '{stage}'") from exc


def put_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """Replace columns in place or append them at the end (the table version of `with_fields`).

    Example: put_columns(t, {"sr_scores": scores}).column_names[-1] -> 'sr_scores'
    """
    for name, array in columns.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, array) if index >= 0 else table.append_column(name, array)
    return table


def with_reason(table: pa.Table, reason: pa.Array | str) -> pa.Table:
    """Append the `reason` column that every rejected row carries.

    Example: with_reason(rows, "tie").column("reason")[0].as_py() -> 'tie'
    """
    if isinstance(reason, str):
        reason = pa.array([reason] * table.num_rows, pa.string())
    return table.append_column(pa.field(REASON, pa.string()), reason)


def messages_text(messages: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One string per row: the concatenated contents of a messages column (role-tagged).

    Used by length, empty and dedup filters. Example: [[{user, "hi"}]] -> ["user\x1fhi"]
    """
    offsets, flat, mask = _list_parts(messages)
    turns = pc.binary_join_element_wise(flat.field("role"), flat.field("content"), "\x1f")
    return pc.binary_join(pa.ListArray.from_arrays(offsets, turns, mask=mask), "\x1e")


def messages_content(messages: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One string per row: the contents of a messages column joined by a newline (no roles).

    Example: [[{user, "hi"}, {assistant, "yo"}]] -> ["hi\nyo"]
    """
    offsets, flat, mask = _list_parts(messages)
    return pc.binary_join(pa.ListArray.from_arrays(offsets, flat.field("content"), mask=mask), "\n")


def _list_parts(array: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array, pa.Array | None]:
    """Zero-based offsets, flat values and null mask of a list array (sliced arrays included)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks else pa.array([], array.type)
    offsets = pc.subtract(array.offsets, array.offsets[0])
    mask = array.is_null() if array.null_count else None
    return offsets, array.flatten(), mask


def text_of(table: pa.Table, column: str) -> pa.Array:
    """A string view of a text-like column (string as is, messages as their contents).

    Example: text_of(t, "prompt") -> StringArray
    """
    col = table.column(column)
    if col.type.equals(MESSAGES):
        return messages_content(col)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


TEXT_TYPES = (pa.string(), MESSAGES)


def mark_dropped(
    keep: pa.BooleanArray, reason: pa.StringArray, failing: pa.BooleanArray, label: str
) -> tuple[pa.BooleanArray, pa.StringArray]:
    """Drop rows that fail a check, giving `label` as reason where no earlier check dropped them.

    Nulls in `failing` count as failing. Example: mark_dropped(keep, reason, is_empty, "empty_prompt")
    """
    failing = pc.fill_null(failing, True)
    newly = pc.and_(keep, failing)
    reason = pc.if_else(newly, pa.scalar(label, pa.string()), reason)
    return pc.and_not(keep, failing), reason


def keep_all(n: int) -> tuple[pa.BooleanArray, pa.StringArray]:
    """A keep mask with every row kept and no reasons, to start a filter's checks from.

    Example: keep_all(2) -> ([true, true], [null, null])
    """
    return pa.array([True] * n, pa.bool_()), pa.nulls(n, pa.string())


def inside_cut(values: pa.Array, ids: pa.Array | pa.ChunkedArray, cut_value: pa.Scalar, cut_id: pa.Scalar,
               side: Literal["below", "above"]) -> pa.BooleanArray:
    """Rows on the kept side of a global (score, id) cut, as the quantile filters fit it: a score
    strictly below (or above) the cut value, or equal to it with an id at most the cut's, so ties
    at the cut go to the smaller ids whatever the parts. A null cut keeps nothing; null scores are False.

    Example: inside_cut(pa.array([1., 2., 2.]), pa.array(["a", "b", "c"]), pa.scalar(2.), pa.scalar("b"), "below") -> [T, T, F]
    """
    if not cut_value.is_valid:
        return pa.array([False] * len(values), pa.bool_())
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    beyond = (pc.less if side == "below" else pc.greater)(values, cut_value)
    tied = pc.and_(pc.equal(values, cut_value), pc.less_equal(ids, cut_id))
    return pc.fill_null(pc.or_(beyond, tied), False)
