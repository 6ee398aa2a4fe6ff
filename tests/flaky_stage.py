"""A deliberately non-deterministic filter for the crash tests: which rows it drops depends on
$CURATE_TEST_SALT, so a retried part can reject other rows than the attempt that crashed."""
from __future__ import annotations

import os
import zlib

import pyarrow as pa

from curate.contract import Stage, Verdict
from curate.registry import register


@register
class FlakyFilter(Stage):
    """Drop about a third of the rows, chosen by hashing the id with $CURATE_TEST_SALT (reason `flaky`).

    Example: salt "a" drops other rows than salt "b"
    """

    name = "test.flaky"
    kind = "filter"

    def keep(self, table: pa.Table) -> Verdict:
        salt = os.environ.get("CURATE_TEST_SALT", "")
        drop = [zlib.crc32(f"{salt}{i}".encode()) % 3 == 0 for i in table.column("id").to_pylist()]
        reasons = pa.array(["flaky" if d else None for d in drop], pa.string())
        return Verdict(table, pa.array([not d for d in drop]), reasons)
