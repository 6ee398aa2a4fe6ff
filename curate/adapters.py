"""Run a method written for `pyarrow.Table` on polars, pandas or `datasets` objects, same type back.

Methods are library functions first (DESIGN.md §3): each takes and returns a `pyarrow.Table`.
`@accepts_frames` lets the same function take a polars DataFrame, a pandas DataFrame or a
`datasets.Dataset` and hand back that type, converted through Arrow (zero-copy where the
library allows). A `datasets.Dataset` result gets a fingerprint derived from the input's and
the call's arguments, so `datasets`' own caching keeps working. Leaves out: lazy frames
(collect them first) and streaming (`IterableDataset`).

Example: @accepts_frames def scores(table: pa.Table) -> pa.Table: ...; scores(polars_df) -> polars DataFrame
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import pyarrow as pa

from curate.keys import canonical_json, digest

F = TypeVar("F", bound=Callable[..., Any])


def _plain_type(dtype: pa.DataType) -> pa.DataType:
    """The same type with large / view strings and lists as plain ones (what the contract declares)."""
    if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return pa.string()
    if pa.types.is_large_list(dtype) or pa.types.is_list_view(dtype) or pa.types.is_list(dtype):
        return pa.list_(_plain_type(dtype.value_type))
    if pa.types.is_struct(dtype):
        return pa.struct([pa.field(f.name, _plain_type(f.type), f.nullable) for f in dtype])
    return dtype


def plain_types(table: pa.Table) -> pa.Table:
    """Cast polars' large/view strings and lists back to plain ones, so `MESSAGES` etc. match.

    Example: plain_types(pl.DataFrame({"a": ["x"]}).to_arrow()).schema.field("a").type -> string
    """
    schema = pa.schema([pa.field(f.name, _plain_type(f.type), f.nullable) for f in table.schema])
    return table if schema.equals(table.schema) else table.cast(schema)


def to_arrow(data: Any) -> tuple[pa.Table, str]:
    """The Arrow table behind `data` and the name of its kind.

    Example: to_arrow(pl.DataFrame({"a": [1]})) -> (pyarrow.Table, 'polars')
    """
    if isinstance(data, pa.Table):
        return data, "arrow"
    module = type(data).__module__.split(".")[0]
    if module == "polars":
        return plain_types(data.to_arrow()), "polars"
    if module == "pandas":
        return plain_types(pa.Table.from_pandas(data, preserve_index=False)), "pandas"
    if module == "datasets":
        import datasets

        if isinstance(data, datasets.Dataset):
            table = data.data.table if data._indices is None else data.flatten_indices().data.table
            return pa.table(table), "datasets"
    raise TypeError(f"expected a pyarrow Table, polars or pandas DataFrame or datasets.Dataset, got {type(data).__name__}")


def from_arrow(table: pa.Table, kind: str, like: Any = None, call_key: str = "") -> Any:
    """Convert an Arrow table back to `kind` (see `to_arrow`).

    Example: from_arrow(table, "pandas") -> pandas.DataFrame
    """
    if kind == "arrow":
        return table
    if kind == "polars":
        import polars as pl

        return pl.from_arrow(table)
    if kind == "pandas":
        return table.to_pandas()
    if kind == "datasets":
        import datasets

        fingerprint = digest(getattr(like, "_fingerprint", ""), call_key)
        return datasets.Dataset(table, fingerprint=fingerprint)
    raise ValueError(kind)


def _call_key(func: Callable, args: tuple, kwargs: dict) -> str:
    """A stable description of a call's non-data arguments (for the datasets fingerprint)."""
    try:
        return canonical_json({"f": f"{func.__module__}.{func.__qualname__}", "args": list(args), "kwargs": kwargs})
    except TypeError:
        return f"{func.__module__}.{func.__qualname__}:{id(args)}"


def accepts_frames(func: F) -> F:
    """Decorator: the first argument may be any supported frame; the result has the same type.

    A function that returns `(table, extra, ...)` gets `(frame, extra, ...)` back.

    Example: filtered = ches_filter(datasets_dataset, model="smollm2-135m-instruct")
    """

    @functools.wraps(func)
    def wrapper(data: Any, *args: Any, **kwargs: Any) -> Any:
        table, kind = to_arrow(data)
        result = func(table, *args, **kwargs)
        key = _call_key(func, args, kwargs)
        if isinstance(result, tuple) and result and isinstance(result[0], pa.Table):  # (table, extras...)
            return (from_arrow(result[0], kind, like=data, call_key=key), *result[1:])
        return from_arrow(result, kind, like=data, call_key=key)

    return wrapper  # type: ignore[return-value]
