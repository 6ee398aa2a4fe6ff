"""Executor overhead: a no-op curate chain over a 1M-row Parquet dataset vs raw pyarrow read + write.

Both sides read the same file and write the same rows, in one process, alternating, best of
`--repeats`. curate's side is a fresh run (empty run folder): ingest (content hash of the file,
id and type checks), the source stored as parts, the no-op stage (run on each part as ingest
writes it, `curate.fused`), atomic part files with their manifest, publishing in the Hub layout,
stats.json. Goal: ratio <= 1.1.

Example: python benchmarks/bench_executor.py --rows 1000000
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import parse_pipeline
from curate.contract import MESSAGES
from curate.runner import run_pipeline


def make_dataset(path: str, rows: int, seed: int = 0) -> None:
    """Write `rows` pair rows (id, prompt messages, chosen, rejected) to one Parquet file."""
    rng = np.random.default_rng(seed)
    words = np.array("the a model answer prompt data pair chosen rejected score judge token".split())
    def texts(n_words: int) -> list[str]:
        picks = rng.integers(0, len(words), size=(rows, n_words))
        return [" ".join(r) for r in words[picks]]
    prompts = texts(12)
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32))
    turns = pa.StructArray.from_arrays([pa.array(["user"] * rows), pa.array(prompts)], names=["role", "content"])
    table = pa.table({
        "id": pa.array([f"row-{i:08d}" for i in range(rows)]),
        "prompt": pa.ListArray.from_arrays(offsets, turns).cast(MESSAGES),
        "chosen": texts(20),
        "rejected": texts(20),
    })
    pq.write_table(table, path)


def raw_copy(src: str, dst: str) -> float:
    started = time.perf_counter()
    pq.write_table(pq.read_table(src), dst)
    return time.perf_counter() - started


def curate_copy(src: str, out: str, part_rows: int, compress_parts: bool = False) -> float:
    yaml_text = (f"source: {{path: {src}, part_rows: {part_rows}, compress_parts: {str(compress_parts).lower()}}}\n"
                 "stages:\n  - stage: core.identity\n")
    pipeline = parse_pipeline(yaml_text, os.path.join(os.path.dirname(src), "bench.yaml"))
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    stats = run_pipeline(pipeline, out=out)
    elapsed = time.perf_counter() - started
    assert stats["rows_out"] == stats["rows_in"], stats
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--part-rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compress-parts", action="store_true", help="store the source parts LZ4-compressed (not the default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
        src = os.path.join(tmp, "pairs.parquet")
        make_dataset(src, args.rows)
        size_mb = os.path.getsize(src) / 1e6
        raw_times, curate_times = [], []
        for _ in range(args.repeats):
            raw_times.append(raw_copy(src, os.path.join(tmp, "raw.parquet")))
            curate_times.append(curate_copy(src, os.path.join(tmp, "run"), args.part_rows, args.compress_parts))
        raw, cur = min(raw_times), min(curate_times)
        print(f"rows: {args.rows:,}  file: {size_mb:.1f} MB  parts: {-(-args.rows // args.part_rows)}"
              f"  source parts: {'LZ4' if args.compress_parts else 'uncompressed'} Arrow IPC")
        print(f"raw pyarrow read+write: best {raw:.3f} s (median {statistics.median(raw_times):.3f} s)")
        print(f"curate no-op run:       best {cur:.3f} s (median {statistics.median(curate_times):.3f} s)")
        print(f"ratio curate/raw: {cur / raw:.3f}  (goal <= 1.1)")


if __name__ == "__main__":
    main()
