"""The Dask executor against the local one, measured in one run on this machine.

1. A CPU-bound model stage (CHES scoring of HH pairs with SmolLM2-135M-Instruct on transformers,
   fp32) over the same parts: the local executor, Dask with 1 worker, Dask with 2 workers
   (LocalCluster, one thread per worker). Every process computes with one torch thread
   (OMP_NUM_THREADS=1), so 2 workers can use 2 cores and the 1-worker and local sides are alike.
   Model load is left out (stats.json's load_seconds), and so is starting the executor (the
   cluster, and the imports a task needs on each worker: the local side has them in the driver
   already); that start is printed beside. Prints `speed-up 2 workers vs 1: X`
   (goal >= 1.8 on 2 cores) and `dask 1 worker vs local: Y` (time ratio, goal <= 1.10).
2. `--rows N`: a cheap chain (nonempty, exact dedup, pairing, margin filter, TRL columns) over N
   generated candidate rows on Dask with `--workers` (4) workers: wall time, driver peak RSS, rows/s.

    python benchmarks/bench_dask.py                       # 1.
    python benchmarks/bench_dask.py --rows 1000000        # 2.
Example: prints `speed-up 2 workers vs 1: 1.87`
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported anywhere (workers inherit it)

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from curate.config import parse_pipeline  # noqa: E402
from curate.executors import LocalExecutor  # noqa: E402
from curate.executors_dask import DaskExecutor  # noqa: E402
from curate.runner import run_pipeline  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HH = os.environ.get("CURATE_HH_FILE", os.path.join(HERE, "..", "..", "shared", "data", "hh-rlhf-harmless-test",
                                                   "test.jsonl.gz"))

CHES = """
source: {{path: {hh}, parse: hh, limit: {rows}, part_rows: {part_rows}}}
stages:
  - stage: filters.ches_score
    id: ches
    params: {{model: smollm2-135m-instruct, max_length: 384}}
"""

CHEAP = """
source: {{path: {path}, part_rows: 50000}}
stages:
  - stage: filters.nonempty
    params: {{columns: [prompt]}}
  - stage: filters.dedup_exact
    params: {{level: prompt}}
  - stage: pairs.from_scores
    params: {{mode: best_worst}}
  - stage: filters.range
    params: {{column: margin, min: 1.0}}
  - stage: format.trl
"""


def _stage_seconds(stats: dict, stage_id: str) -> float:
    entry = next(s for s in stats["stages"] if s["stage_id"] == stage_id)
    return entry["run_seconds"] - entry["load_seconds"]


def _warm_worker() -> None:
    """Import on a worker what a CHES task imports (left out of the timed run, like the driver's own imports)."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import curate.task  # noqa: F401


def bench_ches(args: argparse.Namespace, work: str) -> None:
    import torch

    torch.set_num_threads(1)
    text = CHES.format(hh=os.path.abspath(HH), rows=args.pairs, part_rows=args.part_rows)
    pipeline = parse_pipeline(text, os.path.join(work, "ches.yaml"))
    sides = {"local": LocalExecutor, "dask 1 worker": lambda: DaskExecutor(workers=1),
             "dask 2 workers": lambda: DaskExecutor(workers=2)}
    seconds: dict[str, float] = {}
    for name, make in sides.items():
        out = os.path.join(work, name.replace(" ", "-"))
        started = time.perf_counter()
        executor = make()
        client = getattr(executor, "client", None)
        if client is not None:  # worker processes import what a task needs before the clock starts
            client.run(_warm_worker)
        startup = time.perf_counter() - started
        started = time.perf_counter()
        stats = run_pipeline(pipeline, out=out, executor=executor)
        wall = time.perf_counter() - started
        # Stage time on the driver's clock: summed part seconds overlap across workers, so use the
        # wall time minus ingest and the slowest worker's model load (each loads in parallel).
        load = max(s["load_seconds"] for s in stats["stages"] if s["stage_id"] == "ches")
        seconds[name] = wall - load - stats["stages"][0]["run_seconds"]
        rows = stats["stages"][1]["rows_out"]
        print(f"  {name:15s} {seconds[name]:7.1f} s for {rows} pairs ({rows / seconds[name]:.2f} pairs/s; "
              f"model load {load:.1f} s, wall {wall:.1f} s; before it: executor start {startup:.1f} s)", flush=True)
        first = pq.read_table(os.path.join(work, "local", "data")).sort_by("id")
        assert pq.read_table(os.path.join(out, "data")).sort_by("id").equals(first), "outputs differ"
    print(f"speed-up 2 workers vs 1: {seconds['dask 1 worker'] / seconds['dask 2 workers']:.2f}  (goal >= 1.8)")
    print(f"dask 1 worker vs local: {seconds['dask 1 worker'] / seconds['local']:.2f}  (goal <= 1.10)")


def _candidates(path: str, rows: int) -> None:
    rng = random.Random(0)
    writer = None
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        ids = range(start, start + n)
        table = pa.table({
            "id": [f"c{i}" for i in ids],
            "prompt": [f"question {i % (rows - rows // 20)} about topic {i % 101}" for i in ids],
            "responses": [[{"text": f"answer {i}.{j} " + "word " * rng.randrange(1, 20)} for j in range(4)] for i in ids],
            "scores": [[float(rng.randrange(1, 6)) for _ in range(4)] for _ in ids],
        })
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def bench_cheap(args: argparse.Namespace, work: str) -> None:
    path = os.path.join(work, f"candidates-{args.rows}.parquet")
    with ProcessPoolExecutor(1) as pool:  # generated in a child, so the driver's peak RSS is the run's own
        pool.submit(_candidates, path, args.rows).result()
    pipeline = parse_pipeline(CHEAP.format(path=path), os.path.join(work, "cheap.yaml"))
    started = time.perf_counter()
    stats = run_pipeline(pipeline, out=os.path.join(work, "cheap"), executor=DaskExecutor(workers=args.workers))
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": args.rows, "workers": args.workers, "rows_out": stats["rows_out"]}))
    print(f"cheap chain, {args.rows} rows, dask {args.workers} workers: wall {wall:.1f} s, "
          f"{args.rows / wall:.0f} rows/s, driver peak RSS {peak:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48, help="HH pairs of the CHES comparison")
    parser.add_argument("--part-rows", type=int, default=6)
    parser.add_argument("--rows", type=int, default=None, help="run the cheap chain over this many rows instead")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="curate-bench-dask-")
    try:
        if args.rows:
            bench_cheap(args, work)
        else:
            print(f"CHES scoring of {args.pairs} HH pairs in parts of {args.part_rows} (SmolLM2, fp32, 1 thread each):")
            bench_ches(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
