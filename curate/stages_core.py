"""Core plumbing stages that belong to no method.

Leaves out: anything that reads or writes text; those live in `curate.filters` and friends.
Example: - stage: core.identity
"""
from __future__ import annotations

import pyarrow as pa

from curate.contract import Stage, StageOutput
from curate.registry import register


@register
class Identity(Stage):
    """Pass every row through unchanged; measures executor overhead (benchmarks/bench_executor.py).

    Example: Identity().apply(t).table is t -> True
    """

    name = "core.identity"
    kind = "map"

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        return StageOutput(table)
