"""Driver peak memory of ingest + a cheap filter chain, at 1M and at 10M generated pair rows.

Each (size, format) runs as its own process (a fresh `curate run` on the local executor, the
defaults a user gets: part_rows 10,000), whose peak RSS (ru_maxrss) is what this prints, with
rows/s. Inputs are generated once into --work (JSONL.gz and Parquet; ~0.3 GB and ~3 GB at 10M),
streaming, so generating them is bounded too. The goal: peak RSS at 10M within 1.5x of 1M.

    python benchmarks/bench_memory.py --work /tmp/curate-mem            # 1M and 10M
    python benchmarks/bench_memory.py --sizes 100000 1000000            # quicker
Example: prints `rss ratio 10M/1M: 1.04`
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PIPELINE = """
name: memory
source: {{path: {input}}}
output: {out}
stages:
  - stage: filters.nonempty
    params: {{columns: [prompt, chosen, rejected]}}
  - stage: filters.length
    params: {{columns: [chosen, rejected], min_chars: 20, max_chars: 400}}
"""
BATCH = 200_000


def _batch(start: int, n: int) -> pa.Table:
    rng = np.random.default_rng(start)
    i = np.arange(start, start + n)
    words = rng.integers(3, 60, size=n)
    return pa.table({
        "id": [f"row-{k}" for k in i],
        "prompt": [f"Question {k}: how would you explain topic {k % 997} to a newcomer?" for k in i],
        "chosen": [f"A careful answer to {k} " + "with detail " * int(w) for k, w in zip(i, words)],
        "rejected": [f"A short answer {k % 5000}" + " meh" * int(w % 7) for k, w in zip(i, words)],
    })


def generate(path: str, rows: int) -> None:
    """Write `rows` generated pair rows to a .parquet or .jsonl.gz file, batch by batch."""
    if os.path.exists(path):
        return
    tmp = path + ".tmp"
    if path.endswith(".parquet"):
        writer = None
        for start in range(0, rows, BATCH):
            table = _batch(start, min(BATCH, rows - start))
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        writer.close()
    else:
        with gzip.open(tmp, "wt", compresslevel=1) as f:
            for start in range(0, rows, BATCH):
                for row in _batch(start, min(BATCH, rows - start)).to_pylist():
                    f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def child(input_path: str, out: str) -> None:
    """Run the pipeline in this process; print peak RSS and rows."""
    from curate.config import parse_pipeline
    from curate.runner import run_pipeline

    text = PIPELINE.format(input=os.path.abspath(input_path), out=out)
    started = time.perf_counter()
    stats = run_pipeline(parse_pipeline(text, os.path.join(os.path.dirname(out), "memory.yaml")))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss": peak, "rows_in": stats["rows_in"], "rows_out": stats["rows_out"], "seconds": seconds,
                      "disk": _folder_bytes(out)}))


def _folder_bytes(folder: str) -> int:
    """Bytes on disk under a folder (the run folder), each file once: published shards are hard links."""
    seen: dict[tuple[int, int], int] = {}
    for root, _, names in os.walk(folder):
        for name in names:
            st = os.lstat(os.path.join(root, name))
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def measure(work: str, rows: int, fmt: str) -> dict:
    path = os.path.join(work, f"pairs-{rows}.{fmt}")
    generate(path, rows)
    out = os.path.join(work, f"out-{rows}-{fmt.replace('.', '')}")
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", path, out], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/curate-bench-memory", help="folder for inputs and runs")
    parser.add_argument("--sizes", type=int, nargs=2, default=[1_000_000, 10_000_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--formats", nargs="+", default=["jsonl.gz", "parquet"])
    parser.add_argument("--child", nargs=2, metavar=("INPUT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    os.makedirs(args.work, exist_ok=True)
    small, large = args.sizes
    label = {small: f"{small // 1_000_000}M" if small >= 1_000_000 else str(small),
             large: f"{large // 1_000_000}M" if large >= 1_000_000 else str(large)}
    ratios = []
    for fmt in args.formats:
        peaks = {}
        for rows in (small, large):
            r = measure(args.work, rows, fmt)
            peaks[rows] = r["peak_rss"]
            print(f"{fmt:9s} {label[rows]:>4s} rows: peak RSS {r['peak_rss'] / 2**20:7.0f} MiB, "
                  f"{r['rows_in'] / r['seconds']:9.0f} rows/s ({r['seconds']:.1f} s, {r['rows_out']} rows out), "
                  f"run folder {r['disk'] / 2**20:,.0f} MiB", flush=True)
        ratio = peaks[large] / peaks[small]
        ratios.append(ratio)
        print(f"{fmt:9s} rss ratio {label[large]}/{label[small]}: {ratio:.2f}", flush=True)
    print(f"rss ratio {label[large]}/{label[small]}: {max(ratios):.2f}  (worst format; goal <= 1.5)")


if __name__ == "__main__":
    main()
