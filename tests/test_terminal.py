"""The terminal of `curate run` on the real vLLM engine: engine logs stay out unless --debug, live bars
move inside stages on a terminal, one line per stage; `curate plan` numbers stages as `--set` does.

The quickstart itself (pipelines/quickstart.yaml), made small with `--set`: 3 prompts, 2 replies of
at most 16 tokens each, one judge sample of at most 40 tokens.
"""
from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from curate.cli import main

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "pipelines" / "quickstart.yaml")
SMALL = ["--set", "source.limit=3", "--set", "stages.generate.params.generation.max_tokens=16",
         "--set", "stages.generate.params.generation.n=2", "--set", "stages.judge.params.samples=1",
         "--set", "stages.judge.params.generation.max_tokens=40"]
# What vLLM logs at INFO while an engine starts (its own format, or curate's where vLLM's is off).
VLLM_INFO = re.compile(r"Initializing a V1 LLM engine|Resolved architecture|non-default args|Using max model len"
                       r"|Loading weights took|init engine \(profile|KV cache size|Starting to load model"
                       r"|Detected the chat template|world_size=1|INFO \d\d-\d\d \d\d:\d\d:\d\d \[")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STAGES = ["nonempty", "dedup_prompts", "generate", "judge", "pairs", "min_margin", "trl"]

pytestmark = pytest.mark.slow


def _curate(*args: str) -> list[str]:
    return [sys.executable, "-m", "curate.cli", *args]


def _in_terminal(command: list[str], cwd: Path, timeout: float = 900) -> tuple[int, str]:
    """Run a command with stdout and stderr on a pseudo-terminal, as a user's shell would; return exit code and output."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "40"}
    proc = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process has exited
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def _frames(output: str) -> list[str]:
    """The text lines and live-display frames a terminal showed, escape codes removed, in order."""
    parts = re.split(r"\r|\n|\x1b\[2K|\x1b\[1A", output)
    return [ANSI.sub("", p).strip() for p in parts if ANSI.sub("", p).strip()]


def test_default_level_on_a_terminal_shows_live_bars_stage_lines_and_no_engine_info(tmp_path):
    code, output = _in_terminal(_curate("run", QUICKSTART, "--out", str(tmp_path / "run"), *SMALL), tmp_path)
    frames = _frames(output)
    assert code == 0, "\n".join(frames[-30:])
    assert not [f for f in frames if VLLM_INFO.search(f)], [f for f in frames if VLLM_INFO.search(f)]
    for noise in ("Attempted to load weight", "chunked prefill", "Loading safetensors", "enforce_eager", "Triton"):
        assert not [f for f in frames if noise in f], noise
    done = {stage: next((i for i, f in enumerate(frames) if re.search(rf"✓ {stage}\s+\d+ → \d+ rows", f)), None)
            for stage in STAGES}
    assert all(i is not None for i in done.values()), done  # one line per stage, in order
    assert list(done.values()) == sorted(done.values())
    bar = re.compile(r"^(?:\S\s+)?(generate|judge)\s.*?([\d.]+)/3 rows, (?:[\d.]+|–) rows/s, "
                     r"\d:\d\d:\d\d elapsed, ETA (\S+)")
    live = [(m.group(1), float(m.group(2)), m.group(3), i) for i, f in enumerate(frames) if (m := bar.search(f))]
    assert {stage for stage, *_ in live} == {"generate", "judge"}, frames[:40]
    assert all(i < done[stage] for stage, _, _, i in live)  # bars are shown while the stage runs
    inside = [(stage, rows) for stage, rows, _, _ in live if 0 < rows < 3]
    assert inside, "no bar moved inside a stage's (single) part"
    assert any(eta != "–" for stage, rows, eta, _ in live if rows > 0)  # an ETA once rows are done
    assert re.search(r"\d+ rows written to .*run/data", frames[-1])


def test_quiet_prints_only_the_result_line(tmp_path):
    code, output = _in_terminal(_curate("-q", "run", QUICKSTART, "--out", str(tmp_path / "run"), *SMALL), tmp_path)
    frames = _frames(output)
    assert code == 0, frames
    assert not [f for f in frames if VLLM_INFO.search(f)]
    assert not [f for f in frames if "✓" in f or "rows/s" in f]  # no bars, no stage lines
    assert len(frames) == 1 and re.search(r"\d+ rows written to", frames[0]), frames


def test_debug_lets_the_engine_logs_through(tmp_path):
    """The same check sees vLLM's INFO lines when they are asked for, so their absence above means something."""
    (tmp_path / "gen.yaml").write_text(f"""source: {{path: {REPO / 'pipelines' / 'data' / 'prompts.jsonl'}, limit: 2}}
stages:
  - stage: generators.responses
    params: {{model: smollm2-135m-instruct, dtype: bfloat16, generation: {{max_tokens: 4}}}}
""")
    proc = subprocess.run(_curate("--debug", "run", "gen.yaml", "--out", "run"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert VLLM_INFO.search(proc.stderr)
    assert "disabling chunked prefill" in proc.stderr  # the expected CPU warnings are shown with --debug


def test_plan_numbers_stages_as_set_counts_them(scored):
    runner = CliRunner()
    text = runner.invoke(main, ["plan", str(scored)]).output
    lines = [line for line in text.splitlines() if line.startswith("stages.")]
    assert [line.split()[1] for line in lines] == ["nonempty", "length", "dedup_prompts", "pairs", "reply_length",
                                                   "dedup_pairs", "min_margin", "trl"]
    assert [line.split()[0] for line in lines] == [f"stages.{i}" for i in range(8)]
    changed = runner.invoke(main, ["plan", str(scored), "--json", "--set", "stages.6.params.min=2.5"])
    changed = json.loads(changed.stdout)
    assert changed["stages"][6]["id"] == "min_margin" and changed["stages"][6]["params"]["min"] == 2.5
