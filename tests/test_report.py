"""curate report: one self-contained HTML file per run, checked against the run's data and opened in headless Chromium.

Two real runs: pipelines/scored.yaml (scores, margins, no model) and the same pairs annotated by
SmolLM2-135M-Instruct with CHES, SPA margins and EM label confidence, DONOD and a pairwise judge
(both orders, so position consistency is counted). Each report is opened in Chromium (Debian's
`chromium`, started by the test with no network) and a screenshot saved; with
CURATE_SCREENSHOTS=<folder> the screenshots are also copied there (how docs/ got its images).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.cli import main
from curate.config import load_pipeline
from curate.record import load_run
from curate.runner import run_pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _report(out: Path) -> str:
    result = CliRunner().invoke(main, ["-q", "report", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "report.html")
    return (out / "report.html").read_text(encoding="utf-8")


def _assert_self_contained(html: str) -> None:
    assert not re.search(r"<script|<link|<img|<iframe|<object|<embed|@import|url\(\s*['\"]?(?!#)", html, re.I)
    assert not re.search(r"\ssrc\s*=", html, re.I)
    assert all(ref.startswith("#") for ref in re.findall(r'\shref="([^"]*)"', html))  # in-page links only


def _screenshot(html_path: Path, png: Path, tmp_path: Path, height: int) -> np.ndarray:
    """Open the report in headless Chromium with networking off, save a screenshot, return its pixels."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/install-cpu.sh installs Debian's package with apt-get "
                    "where it can); the report itself was checked above")
    from PIL import Image

    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--no-first-run", "--disable-extensions",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--hide-scrollbars",
                           f"--window-size=1280,{height}", f"--screenshot={png}", html_path.resolve().as_uri()],
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert png.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(png).convert("RGB"))
    if os.environ.get("CURATE_SCREENSHOTS"):
        shutil.copy(png, Path(os.environ["CURATE_SCREENSHOTS"]) / png.name)
    return pixels


def _drawn(pixels: np.ndarray, width: int, height: int) -> None:
    """The page rendered: full size, mostly background, with charts' colours in it."""
    assert pixels.shape == (height, width, 3)
    white = (pixels > 245).all(axis=2).mean()
    assert 0.3 < white < 0.97, white
    blue = ((abs(pixels[..., 0].astype(int) - 0x45) < 12) & (abs(pixels[..., 1].astype(int) - 0x7B) < 12)
            & (abs(pixels[..., 2].astype(int) - 0x9D) < 12)).mean()
    assert blue > 0.005, blue  # the bars of the funnel / margin charts (report_charts.NEUTRAL)


def _reply_chars(conversations: list) -> np.ndarray:
    return np.array([sum(len(turn["content"] or "") for turn in turns) for turns in conversations])


def test_report_of_the_scored_run_matches_its_data_and_renders_in_chromium(scored, tmp_path):
    out = scored.parent / "out"
    run_pipeline(load_pipeline(str(scored)), str(out))
    html = _report(out)
    _assert_self_contained(html)
    ids = re.findall(r'<section id="([^"]+)"', html)
    assert ids == ["funnel", "scores", "lengths", "timings", "statistics"]
    assert html.count("<svg") == 6  # funnel, scores, margin, length histogram, length scatter, timings
    data = pq.read_table(out / "data")
    stats = json.loads((out / "stats.json").read_text())
    assert f"{stats['rows_in']} rows in, {stats['rows_out']} rows out" in html
    for name, label in (("chosen_score", "chosen"), ("rejected_score", "rejected"), ("margin", "margin")):
        values = np.array(data.column(name).to_pylist(), dtype=float)
        assert f"{label} (n={len(values)}, mean {values.mean():.3g})" in html, name
    chosen = _reply_chars(data.column("chosen").to_pylist())
    rejected = _reply_chars(data.column("rejected").to_pylist())
    assert f"longer in {(chosen > rejected).sum()} of {len(chosen)} pairs" in html
    for reason, count in stats["dropped"].items():
        assert f"{reason} {count}" in html  # the funnel table names every drop reason
    first = (out / "report.html").read_bytes()
    _report(out)
    assert (out / "report.html").read_bytes() == first  # the same run writes the same report
    pixels = _screenshot(out / "report.html", tmp_path / "report-scored.png", tmp_path, height=2400)
    _drawn(pixels, 1280, 2400)


METHODS_YAML = """name: scored-methods
description: The scored pairs annotated with CHES, label confidence, DONOD and a pairwise judge.
license: apache-2.0
source: {path: data/scored_candidates.jsonl, part_rows: 8, limit: 12}
seed: 0
stages:
  - stage: filters.nonempty
    params: {columns: [prompt]}
  - stage: pairs.from_scores
    id: pairs
    params: {scores: scores, mode: best_worst}
  - stage: filters.ches_score
    params: {model: smollm2-135m-instruct, max_length: 192}
  - stage: filters.ches
    params: {mode: drop_highest, fraction: 0.1}
  - stage: filters.spa_score
    params: {policy: smollm2-135m-instruct, reference: none, backend: transformers}
  - stage: filters.noise_em
    params: {action: weight}
  - stage: filters.donod_score
    params: {model: smollm2-135m-instruct, max_length: 192}
  - stage: filters.donod
    params: {keep_fraction: 0.5, action: mark}
  - stage: judges.pairwise
    id: judge
    params: {model: smollm2-135m-instruct, dtype: bfloat16, samples: 1, max_model_len: 1024,
             generation: {max_tokens: 40, temperature: 0.7, top_p: 0.9}}
  - stage: format.trl
"""


@pytest.mark.slow
def test_report_of_a_run_with_ches_label_confidence_donod_and_a_pairwise_judge(scored, tmp_path):
    pytest.importorskip("vllm")
    path = scored.parent / "methods.yaml"
    path.write_text(METHODS_YAML)
    out = tmp_path / "methods"
    run_pipeline(load_pipeline(str(path)), str(out))
    html = _report(out)
    _assert_self_contained(html)
    ids = re.findall(r'<section id="([^"]+)"', html)
    assert ids == ["funnel", "judges", "scores", "lengths", "ches", "label-confidence", "donod", "pairwise",
                   "fe-verdict", "timings", "statistics"]
    data = pq.read_table(out / "data")
    for name in ("ln_ches", "spa_margin", "pref_conf", "donod_don", "donod_nod", "donod_topsis", "fe_bpde"):
        values = np.array([v for v in data.column(name).to_pylist() if v is not None], dtype=float)
        values = values[np.isfinite(values)]
        assert f"{name} (n={len(values)}, mean {values.mean():.3g})" in html, name
    judge = load_run(str(out)).stats.stage("judge").counters
    consistent, both = int(judge["swap_consistent"]), int(judge["pairs_with_both_orders"])
    assert both > 0 and f"{consistent:,} / {both:,} ({100 * consistent / both:.0f}%)" in html
    assert "judge: swap consistent" in html
    donod_fit = load_run(str(out)).stats.stage("donod").fit
    assert f"donod threshold {donod_fit['threshold']:.3g}" in html  # the fitted cut drawn on its histogram
    pixels = _screenshot(out / "report.html", tmp_path / "report-methods.png", tmp_path, height=5600)
    _drawn(pixels, 1280, 5600)


def test_report_of_a_run_that_dropped_every_row(scored):
    out = scored.parent / "out"
    run_pipeline(load_pipeline(str(scored), ["stages.min_margin.params.min=1000"]), str(out))
    html = _report(out)
    entry = load_run(str(out)).stats.stage("min_margin")
    assert entry.rows_out == 0 and entry.dropped == {"margin_below_min": entry.rows_in} and entry.rows_in > 0
    assert "24 rows in, 0 rows out (0.0% kept)" in html and f"margin_below_min {entry.rows_in}" in html
    assert "chosen (n=0)" in html


def test_report_errors_and_open(scored, tmp_path, monkeypatch):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code != 0 and result.stderr.startswith("error: ") and "stats.json" in result.stderr
    out = scored.parent / "out"
    run_pipeline(load_pipeline(str(scored)), str(out))
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    target = tmp_path / "elsewhere" / "r.html"
    result = CliRunner().invoke(main, ["-q", "report", str(out), "--out", str(target), "--open"])
    assert result.exit_code == 0, result.output
    assert target.exists() and opened == [target.resolve().as_uri()]
