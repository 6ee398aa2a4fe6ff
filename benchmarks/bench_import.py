"""Import cost of the package: `import curate` and the lazy method packages, vs importing every export eagerly.

Each case runs in a fresh interpreter (`python -c`), `--repeats` times, in one run; medians in
milliseconds. The lazy packages should cost about as little as `import curate` itself; the eager
line is what `from curate.filters import *` (and the judges') pays, i.e. what every
`import curate.filters` would cost if the exports were imported up front.

Example: python benchmarks/bench_import.py --repeats 7
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CASES = {
    "import curate": "import curate",
    "import curate.filters, .judges, .generators (lazy)":
        "import curate, curate.filters, curate.judges, curate.generators",
    "every export of the three packages (eager)": (
        "import curate.filters as f, curate.judges as j, curate.generators as g\n"
        "for m in (f, j, g):\n    [getattr(m, n) for n in m.__all__]"),
}


def seconds(code: str) -> float:
    """Wall time of `code` in a fresh interpreter, measured inside it (startup excluded)."""
    timed = f"import time\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", timed], capture_output=True, text=True, check=True, cwd="/")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    medians = {}
    for name, code in CASES.items():
        medians[name] = statistics.median(seconds(code) for _ in range(args.repeats))
        print(f"{name:55s} {1000 * medians[name]:8.1f} ms")
    lazy, eager = list(medians.values())[1:]
    print(f"eager / lazy: {eager / lazy:.0f}x")


if __name__ == "__main__":
    main()
