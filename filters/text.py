"""Cheap text filters: empty replies, length bounds, numeric ranges (row-local, no model).

Each filter returns a keep mask and a reason per dropped row; the runner applies the mask and
keeps the dropped rows under rejects/ (DESIGN.md §2). Lengths are Unicode characters, counted on
the content of a messages column (roles left out). Leaves out: token-based lengths (they need a
tokenizer; see the generators' token counts).

Example: - stage: filters.length
           params: {columns: [chosen, rejected], max_chars: 4000}
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.contract import TEXT_TYPES, Params, Stage, Verdict, keep_all, mark_dropped, require, text_of
from curate.registry import register


class NonEmptyParams(Params):
    """Params of filters.nonempty. Example: NonEmptyParams(columns=["prompt", "chosen"])"""

    columns: list[str] = Field(["prompt"], min_length=1, description="string or messages columns that must not be blank")


@register
class NonEmptyFilter(Stage):
    """Drop rows where any listed column is null, empty or only whitespace (reason `empty_<column>`).

    Example: chosen "  " -> dropped with reason 'empty_chosen'
    """

    name = "filters.nonempty"
    kind = "filter"
    Params = NonEmptyParams

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {c: TEXT_TYPES for c in self.params.columns}, self.name)
        return schema

    def keep(self, table: pa.Table) -> Verdict:
        keep, reason = keep_all(table.num_rows)
        for column in self.params.columns:
            blank = pc.equal(pc.utf8_trim_whitespace(text_of(table, column)), "")
            keep, reason = mark_dropped(keep, reason, blank, f"empty_{column}")
        return Verdict(table, keep, reason)


class LengthParams(Params):
    """Params of filters.length. Example: LengthParams(columns=["chosen"], max_chars=4000)"""

    columns: list[str] = Field(["prompt"], min_length=1, description="string or messages columns to measure")
    min_chars: int | None = Field(None, ge=0, description="drop rows shorter than this (characters)")
    max_chars: int | None = Field(None, ge=1, description="drop rows longer than this (characters)")

    @model_validator(mode="after")
    def _some_bound(self) -> "LengthParams":
        if self.min_chars is None and self.max_chars is None:
            raise ValueError("give min_chars, max_chars or both")
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError("min_chars is larger than max_chars")
        return self


@register
class LengthFilter(Stage):
    """Drop rows whose text is shorter than `min_chars` or longer than `max_chars`.

    Reasons: `<column>_too_short`, `<column>_too_long`. Example: max_chars=3, chosen "abcd" -> 'chosen_too_long'
    """

    name = "filters.length"
    kind = "filter"
    Params = LengthParams

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {c: TEXT_TYPES for c in self.params.columns}, self.name)
        return schema

    def keep(self, table: pa.Table) -> Verdict:
        keep, reason = keep_all(table.num_rows)
        for column in self.params.columns:
            length = pc.utf8_length(text_of(table, column))
            if self.params.min_chars is not None:
                keep, reason = mark_dropped(keep, reason, pc.less(length, self.params.min_chars), f"{column}_too_short")
            if self.params.max_chars is not None:
                keep, reason = mark_dropped(keep, reason, pc.greater(length, self.params.max_chars), f"{column}_too_long")
        return Verdict(table, keep, reason)


class RangeParams(Params):
    """Params of filters.range. Example: RangeParams(column="margin", min=1.0)"""

    column: str = Field("margin", description="numeric column to test")
    min: float | None = Field(None, description="drop rows below this value")
    max: float | None = Field(None, description="drop rows above this value")

    @model_validator(mode="after")
    def _some_bound(self) -> "RangeParams":
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        return self


NUMERIC = (pa.float64(), pa.float32(), pa.int64(), pa.int32())


@register
class RangeFilter(Stage):
    """Drop rows whose numeric column is null or outside [min, max] (e.g. a minimum score margin).

    Reasons: `<column>_missing`, `<column>_below_min`, `<column>_above_max`.
    Example: column=margin, min=1 -> margin 0.5 dropped as 'margin_below_min'
    """

    name = "filters.range"
    kind = "filter"
    Params = RangeParams

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {self.params.column: NUMERIC}, self.name)
        return schema

    def keep(self, table: pa.Table) -> Verdict:
        column = self.params.column
        values = pc.cast(table.column(column), pa.float64())
        keep, reason = keep_all(table.num_rows)
        keep, reason = mark_dropped(keep, reason, pc.or_(pc.is_null(values), pc.is_nan(values)), f"{column}_missing")
        if self.params.min is not None:
            keep, reason = mark_dropped(keep, reason, pc.less(values, self.params.min), f"{column}_below_min")
        if self.params.max is not None:
            keep, reason = mark_dropped(keep, reason, pc.greater(values, self.params.max), f"{column}_above_max")
        return Verdict(table, keep, reason)
