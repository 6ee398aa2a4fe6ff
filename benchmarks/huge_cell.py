"""A real 2 GB string in the source: what `curate run` does with it, and its peak memory.

Cases (each `curate run` a fresh process; peak RSS from the kernel's rusage of that process):
1. Parquet, one cell of 2,000,000,000 bytes (large_string) between 1,000 normal rows before and
   after, all in one row group (the writer's default layout): refused by `source.max_cell_bytes`
   (64 MiB by default) with the file and row? How much memory does reading it take (the cell is
   checked after its batch is read)?
2. A JSONL line of 2.2 GiB between normal lines: refused before the line is held whole?
3. Parquet itself: can a cell of 2 GiB or more be written at all (the writer's answer)?
Also a normal run over the same rows without the huge one, for the baseline RSS. Files go to a
temporary folder on disk (about 2.3 GB; the Parquet one compresses to a few MB). Needs about
8 GiB of free memory: refuses to start with less (check `free -g`; the machine is shared).

Usage: .venv/bin/python benchmarks/huge_cell.py [--cell-bytes N --line-bytes N --skip-over --min-free-gib G]
Example: prints a table, one line per case: exit code, the last stderr line, seconds, peak RSS
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HUGE = 2_000_000_000  # "a 2 GB string": 2e9 bytes (1.86 GiB)
NORMAL_ROWS = 1000
PIPELINE = """name: huge-cell
source: {{path: {path}}}
output: out
stages:
  - stage: filters.nonempty
    params: {{columns: [prompt]}}
"""

WRITE_PARQUET = r'''
import sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
path, size, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = [f"r{i}" for i in range(rows)] + ["huge"] + [f"r{i}" for i in range(rows, 2 * rows)]
prompts = lambda a, b: pa.array([f"an ordinary prompt number {i}" for i in range(a, b)], pa.large_string())
big = np.full(size, ord("a"), dtype=np.uint8)  # the huge cell's bytes, one buffer (no Python str)
cell = pa.LargeStringArray.from_buffers(1, pa.array([0, size], pa.int64()).buffers()[1], pa.py_buffer(big))
# One table, the writer's default layout: every row in one row group, the huge cell in the middle.
table = pa.table({"id": pa.array(ids), "prompt": pa.chunked_array([prompts(0, rows), cell, prompts(rows, 2 * rows)])})
pq.write_table(table, path, compression="zstd", use_dictionary=False)  # no dictionary: one copy less in the writer
'''


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / (1 << 20)


def measured(command: list[str], cwd: Path) -> dict:
    """Run a command; its exit code, last stderr line, wall seconds and peak RSS (GiB, from wait4)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    return {"exit": proc.returncode, "last": lines[-1][:300] if lines else "", "traceback": any("Traceback" in x for x in lines),
            "seconds": round(time.perf_counter() - started, 1), "peak_gib": round(usage.ru_maxrss / (1 << 20), 2)}


def run_curate(folder: Path, source: str) -> dict:
    (folder / "p.yaml").write_text(PIPELINE.format(path=source))
    result = measured([sys.executable, "-m", "curate.cli", "-q", "run", "p.yaml", "--out", f"out-{source}"], folder)
    data = folder / f"out-{source}" / "data"
    result["published_files"] = len(list(data.glob("*.parquet"))) if data.exists() else 0
    return result


def write_jsonl(path: Path, line_bytes: int) -> None:
    """Normal lines, one line of `line_bytes` (a 'prompt' of 'a's), normal lines; written in 64 MiB pieces."""
    with open(path, "wb") as f:
        for i in range(NORMAL_ROWS):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"an ordinary prompt number {i}"}).encode() + b"\n")
        f.write(b'{"id": "huge", "prompt": "')
        piece = b"a" * (64 << 20)
        left = line_bytes
        while left > 0:
            f.write(piece[:left])
            left -= len(piece)
        f.write(b'"}\n')
        for i in range(NORMAL_ROWS, 2 * NORMAL_ROWS):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"an ordinary prompt number {i}"}).encode() + b"\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-free-gib", type=float, default=8.0, help="refuse to start with less memory available")
    parser.add_argument("--dir", default=None, help="where the files go (default: a temporary folder)")
    parser.add_argument("--cell-bytes", type=int, default=HUGE, help="size of the huge Parquet cell (a smaller one "
                        "shows how peak memory scales where 2 GB cannot be spared)")
    parser.add_argument("--line-bytes", type=int, default=(2 << 30) + (200 << 20), help="size of the huge JSONL line")
    parser.add_argument("--skip-over", action="store_true", help="leave out the 2 GiB + 16 bytes Parquet write")
    args = parser.parse_args()
    if available_gib() < args.min_free_gib:
        sys.exit(f"only {available_gib():.1f} GiB of memory available (< {args.min_free_gib}): not started")
    with tempfile.TemporaryDirectory(prefix="curate-huge-cell-", dir=args.dir) as tmp:
        folder = Path(tmp)
        rows = []
        (folder / "normal.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"an ordinary prompt number {i}"}) + "\n"
                                                     for i in range(2 * NORMAL_ROWS)))
        rows.append(("baseline: the 2,000 normal rows alone (JSONL)", run_curate(folder, "normal.jsonl")))
        if not args.skip_over:
            over = measured([sys.executable, "-c", WRITE_PARQUET, str(folder / "over.parquet"), str((2 << 30) + 16),
                             str(NORMAL_ROWS)], folder)
            rows.append(("writing a Parquet cell of 2 GiB + 16 bytes (pyarrow writer)", over))
        wrote = measured([sys.executable, "-c", WRITE_PARQUET, str(folder / "big.parquet"), str(args.cell_bytes),
                          str(NORMAL_ROWS)], folder)
        rows.append((f"writing big.parquet: {args.cell_bytes:,}-byte cell (pyarrow writer)", wrote))
        if wrote["exit"] == 0:
            size = (folder / "big.parquet").stat().st_size
            rows.append((f"curate run on big.parquet ({size / 1e6:.1f} MB on disk)", run_curate(folder, "big.parquet")))
        write_jsonl(folder / "big.jsonl", args.line_bytes)
        rows.append((f"curate run on big.jsonl ({(folder / 'big.jsonl').stat().st_size / (1 << 30):.2f} GiB, one line of "
                     f"{args.line_bytes / (1 << 30):.2f} GiB)", run_curate(folder, "big.jsonl")))
    print("| case | exit | last stderr line | traceback | seconds | peak RSS, GiB | published files |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['exit']} | `{r['last']}` | {'yes' if r['traceback'] else 'no'} | {r['seconds']} "
              f"| {r['peak_gib']} | {r.get('published_files', '-')} |")


if __name__ == "__main__":
    main()
