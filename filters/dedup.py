"""Exact deduplication of prompts or of whole pairs, over the whole dataset (a global stage).

The text key is the prompt's role-tagged turns (and, at pair level, the chosen and rejected
replies), optionally case-folded with whitespace collapsed. Among rows with the same key the one
with the smallest `id` stays, so the result does not depend on how the data is sharded
(DESIGN.md §6). Leaves out: near-duplicates (embedding similarity; `filters.near_dup`).

Example: two rows with prompt "Hi  there" and "hi there" -> one kept, one 'duplicate_prompt'
"""
from __future__ import annotations

from typing import Iterable, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.contract import MESSAGES, Params, Stage, Verdict, keep_all, mark_dropped, messages_text, require
from curate.registry import register


class DedupParams(Params):
    """Params of filters.dedup_exact. Example: DedupParams(level="pair")"""

    level: Literal["prompt", "pair"] = Field("prompt", description="compare prompts only, or prompt+chosen+rejected")
    normalize: bool = Field(True, description="case-fold and collapse whitespace before comparing")


def dedup_keys(table: pa.Table, level: str = "prompt", normalize: bool = True) -> pa.Array:
    """One comparison string per row (see the module docstring).

    Example: dedup_keys(t, "pair") -> StringArray
    """
    key = messages_text(table.column("prompt"))
    if level == "pair":
        key = pc.binary_join_element_wise(key, table.column("chosen"), table.column("rejected"), "\x1d")
    if normalize:
        key = pc.utf8_trim_whitespace(pc.replace_substring_regex(pc.utf8_lower(key), r"\s+", " "))
    return key


def first_ids(tables: Iterable[pa.Table], level: str = "prompt", normalize: bool = True) -> pa.Table:
    """The smallest id of every distinct key across all tables: the rows dedup keeps.

    Example: first_ids([t]).column("id") -> ids to keep
    """
    keyed = [pa.table({"id": t.column("id"), "key": dedup_keys(t, level, normalize)}) for t in tables]
    if not keyed:
        return pa.table({"id": pa.array([], pa.string())})
    winners = pa.concat_tables(keyed).group_by("key").aggregate([("id", "min")])
    return pa.table({"id": winners.column("id_min")})


@register
class ExactDedup(Stage):
    """Drop exact duplicates of a prompt (reason `duplicate_prompt`) or of a pair (`duplicate_pair`).

    Example: level=pair keeps one of two rows with equal prompt, chosen and rejected
    """

    name = "filters.dedup_exact"
    kind = "global"
    Params = DedupParams

    def _columns(self) -> dict[str, pa.DataType]:
        columns: dict[str, pa.DataType] = {"id": pa.string(), "prompt": MESSAGES}
        if self.params.level == "pair":
            columns.update(chosen=pa.string(), rejected=pa.string())
        return columns

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, self._columns(), self.name)
        return schema

    def fit_columns(self, schema: pa.Schema) -> list[str]:
        return list(self._columns())

    def summarize(self, part: pa.Table) -> pa.Table:
        """The smallest id of each distinct key within the part: (key, id_min)."""
        keyed = pa.table({"id": part.column("id"), "key": dedup_keys(part, self.params.level, self.params.normalize)})
        return keyed.group_by("key").aggregate([("id", "min")])

    def fit(self, tables: Iterable[pa.Table]) -> pa.Table:
        summaries = list(tables)
        if not summaries:
            return pa.table({"id": pa.array([], pa.string())})
        winners = pa.concat_tables(summaries).group_by("key").aggregate([("id_min", "min")])
        return pa.table({"id": winners.column("id_min_min")})

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> Verdict:
        keep, reason = keep_all(table.num_rows)
        duplicate = pc.invert(pc.is_in(table.column("id"), value_set=state.column("id")))
        keep, reason = mark_dropped(keep, reason, duplicate, f"duplicate_{self.params.level}")
        return Verdict(table, keep, reason)
