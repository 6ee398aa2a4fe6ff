"""Shared numerics of the margin filters (SPA in `spa`, EM in `noise`): float arrays from Arrow, σ, the DPO loss, fit state.

Example: sigmoid(margin_values(t, "spa_margin"))
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.contract import StageOutput, Verdict

NUMERIC = (pa.float64(), pa.float32(), pa.int64(), pa.int32())


def as_float(values: Any) -> np.ndarray:
    """float64 numpy array of any array-like (Arrow, numpy, list, polars/pandas Series); nulls -> NaN."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pc.fill_null(pc.cast(values, pa.float64()), float("nan"))
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        return values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def sigmoid(x: Any) -> np.ndarray:
    """σ(x), stable for large |x|. Example: sigmoid([0.0]) -> array([0.5])"""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # NaN (a missing margin) stays NaN
        return np.exp(-np.logaddexp(0.0, -x))


def dpo_loss(z: Any) -> np.ndarray:
    """ℓ(z) = −log σ(z) (METHODS.md §0), elementwise. Example: dpo_loss(1.0) -> 0.31326"""
    with np.errstate(invalid="ignore"):
        return np.logaddexp(0.0, -np.asarray(z, dtype=np.float64))


def scalar_or_array(x: np.ndarray) -> Any:
    return float(x) if x.ndim == 0 else x


def float_column(values: np.ndarray) -> pa.Array:
    """float64 Arrow array with NaN turned into null."""
    return pa.array(values, pa.float64(), mask=np.isnan(values))


def with_metadata(table: pa.Table, key: bytes, value: float | None) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[key] = repr(float("nan") if value is None else float(value)).encode()
    return table.replace_schema_metadata(meta)


def margin_values(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        raise KeyError(f"no margin column '{column}' (columns: {', '.join(table.column_names)})")
    return as_float(table.column(column))


def kept_rows(result: StageOutput | Verdict) -> pa.Table:
    if isinstance(result, Verdict):
        return result.table.filter(pc.fill_null(result.keep, False))
    return result.table


def fit_margins(tables: Iterable[pa.Table], column: str) -> np.ndarray:
    """Every part's margins in one float64 array (NaN for nulls), in part order."""
    parts = [as_float(t.column(column)) for t in tables]
    return np.concatenate(parts) if parts else np.zeros(0)


def state_value(state: pa.Table | None, column: str) -> Any:
    if state is None or column not in state.column_names or state.num_rows == 0:
        return None
    return state.column(column)[0].as_py()
