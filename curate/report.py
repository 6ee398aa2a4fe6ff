"""`curate report RUN_DIR`: one self-contained HTML file of a finished run, with its charts inline.

What it shows, each where the run has it: the funnel (rows after every step, drops per reason),
chosen and rejected score histograms, the margin, chosen vs rejected reply lengths, the method
columns (CHES, label confidence and SPA margins, DONOD, CDR, the pairwise judge's scores and
verdicts, SCIR), the judges' measured shares (position consistency, agreement with the label,
parse failures), stage times and the statistics of every numeric column. It reads the run only
through `curate.record.load_run` (stats.json, plan.json) and the published `data/` shards, never
the store. The page has no script and fetches nothing: charts are inline SVG
(`curate.report_charts`), styles are inline. Leaves out: the rejects (dropped rows are counted,
not plotted).

Example: write_report("out/quickstart") -> 'out/quickstart/report.html'
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import report_charts as charts
from curate.card_sections import column_statistics, length_bias, measured_ratios, text_lengths
from curate.errors import ConfigError
from curate.record import Run, load_run

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "templates", "report.html")
# Method columns, grouped as the report shows them: (section id, title, columns, what they mean).
METHODS = [
    ("ches", "CHES (METHODS §5)", ["ln_ches", "ches"],
     "Centered hidden-embedding similarity of chosen and rejected: high means the model sees the two replies "
     "as alike, which predicts that DPO pushes the chosen likelihood down."),
    ("label-confidence", "Label confidence (§6)", ["pref_conf", "spa_margin", "label_smoothing", "noise_weight"],
     "How likely each label is right: the EM posterior that the pair is not flipped (pref_conf), the implicit "
     "reward margin it is computed from (spa_margin) and the label smoothing SPA gives noisy rows."),
    ("donod", "DONOD (§7)", ["donod_don", "donod_nod", "donod_topsis"],
     "Delta of norm (DON) and norm of delta (NOD) of one SGD step on the row, and their TOPSIS closeness; "
     "the filter keeps the rows closest to the ideal."),
    ("cdr", "CDR (§2)", ["cdr_margin"],
     "Reward margin from the strong/weak density ratio: positive when the strong model prefers the chosen reply."),
    ("pairwise", "Pairwise judge (§8.1)", ["fe_score_a", "fe_score_b", "fe_bpde"],
     "The judge's mean scores of answer a and b over both orders, and the entropy of its verdicts (fe_bpde: "
     "high = uncertain, a case to route to people)."),
    ("scir", "SCIR (§1B)", ["scir_p_gen", "scir_p_imp"],
     "The judge's order-averaged preference (p_gen) and the implicit reward's (p_imp); pairs where they "
     "disagree are dropped."),
    ("multi-elo", "Multi-Elo (§8.2)", [f"me_{d}_elo_{side}" for d in ("accuracy", "helpfulness", "language")
                                        for side in ("chosen", "rejected")],
     "One Elo per dimension for the chosen and the rejected reply (K=32, start 1000, averaged over seeded match "
     "orders): a pair selected on accuracy should not owe its win to fluent language."),
    ("rps", "RPS consensus (§6C)", ["rps_consensus", "rps_score_chosen", "rps_score_rejected"],
     "The share of neighbour preference directions under which the pair's winner under the target direction "
     "still wins, and both replies' scores under the target direction."),
]
FIT_MARKS = {("filters.donod", "threshold"): "donod_topsis", ("filters.spa", "tau"): "spa_margin"}
CATEGORIES = {"fe_verdict": "pairwise verdict for the chosen reply", "cdr_domain": "CDR router domain",
              "me_accuracy_verdict": "Multi-Elo accuracy verdict for the chosen reply"}


@dataclass
class Chart:
    """One figure of the report. Example: Chart("Margin", svg, "chosen − rejected score")"""

    title: str
    svg: str
    caption: str = ""


@dataclass
class Section:
    """One part of the report. Example: Section("funnel", "Funnel", [chart])"""

    id: str
    title: str
    charts: list[Chart] = field(default_factory=list)
    intro: str = ""
    table: list[dict[str, Any]] | None = None


def read_columns(files: list[str], names: list[str]) -> dict[str, pa.ChunkedArray]:
    """The named columns present in the shards, read across all of them.

    Example: read_columns(run.data_files, ["margin"])["margin"].length()
    """
    present = [n for n in names if n in pq.read_schema(files[0]).names] if files else []
    if not present:
        return {}
    table = pa.concat_tables(pq.read_table(path, columns=present) for path in files)
    return {name: table.column(name) for name in present}


def numbers(column: pa.ChunkedArray) -> np.ndarray:
    """Non-null, finite values as float64. Example: numbers(pa.chunked_array([[1, None, 2]])) -> array([1., 2.])"""
    values = pc.drop_null(column).to_numpy().astype(np.float64)
    return values[np.isfinite(values)]


def _funnel(run: Run) -> Section:
    stats = run.stats
    steps = [(s.stage_id, s.rows_out, dict(s.dropped)) for s in stats.stages]
    table = [{"step": s.stage_id, "stage": s.stage, "kind": s.kind, "rows in": s.rows_in, "rows out": s.rows_out,
              "dropped": ", ".join(f"{k} {v:,}" for k, v in sorted(s.dropped.items())) or "–"} for s in stats.stages]
    intro = (f"{stats.rows_in:,} rows in, {stats.rows_out:,} rows out "
             f"({100 * stats.rows_out / stats.rows_in:.1f}% kept)." if stats.rows_in else "No input rows.")
    return Section("funnel", "Funnel", [Chart("Rows after each step", charts.funnel(steps),
                                               "Grey: rows the step dropped, with their count.")], intro, table)


def _scores(columns: dict[str, pa.ChunkedArray]) -> Section | None:
    found = []
    if "chosen_score" in columns and "rejected_score" in columns:
        series = {"chosen": numbers(columns["chosen_score"]), "rejected": numbers(columns["rejected_score"])}
        found.append(Chart("Scores of the chosen and rejected replies",
                           charts.histogram(series, "score", colors=(charts.CHOSEN, charts.REJECTED)),
                           "The score each pair's chosen and rejected reply got (shared bins)."))
    if "margin" in columns:
        margin = charts.histogram({"margin": numbers(columns["margin"])}, "chosen − rejected score")
        found.append(Chart("Margin", margin,
                           "How far apart the two replies of a pair were scored."))
    return Section("scores", "Scores and margins", found) if found else None


def _lengths(run: Run, columns: dict[str, pa.ChunkedArray]) -> Section | None:
    if "chosen" not in columns or "rejected" not in columns:
        return None
    chosen = text_lengths(columns["chosen"].combine_chunks())
    rejected = text_lengths(columns["rejected"].combine_chunks())
    bias = length_bias(run.data_files) or {}
    share = bias.get("share_longer")
    intro = ""
    if share is not None:
        verdict = (f"flagged, above {100 * bias['threshold']:.0f}% (METHODS §8.2): a model trained on these pairs can learn "
                   "that longer is better" if bias["flagged"]
                   else "above half: watch for a model learning that longer is better" if share > 0.6
                   else "the chosen reply is mostly the shorter one" if share < 0.4 else "close to half")
        intro = (f"The chosen reply is longer in {bias['chosen_longer']:,} of {bias['pairs']:,} pairs "
                 f"({100 * share:.0f}%): {verdict}.")
    series = {"chosen": chosen.astype(np.float64), "rejected": rejected.astype(np.float64)}
    return Section("lengths", "Chosen vs rejected lengths", [
        Chart("Reply lengths", charts.histogram(series, "characters", colors=(charts.CHOSEN, charts.REJECTED)),
              "Characters per reply (all turns of the reply)."),
        Chart("Per pair", charts.scatter_lengths(chosen, rejected),
              "Above the dotted diagonal: the rejected reply is longer."),
    ], intro)


def _fit_marks(run: Run, column: str) -> dict[str, float]:
    """Cut-offs a global stage fitted on this column (stats.json `fit`), to draw on its histogram."""
    marks = {}
    for stage in run.stats.stages:
        for (name, key), target in FIT_MARKS.items():
            value = (stage.fit or {}).get(key)
            if stage.stage == name and target == column and isinstance(value, (int, float)):
                marks[f"{stage.stage_id} {key} {value:.3g}"] = float(value)
    return marks


def _methods(run: Run, columns: dict[str, pa.ChunkedArray]) -> list[Section]:
    sections = []
    for section_id, title, names, meaning in METHODS:
        present = [n for n in names if n in columns and len(numbers(columns[n]))]
        if not present:
            continue
        found = [Chart(name, charts.histogram({name: numbers(columns[name])}, name, marks=_fit_marks(run, name)))
                 for name in present]
        sections.append(Section(section_id, title, found, meaning))
    for name, meaning in CATEGORIES.items():
        if name in columns:
            values = Counter(v for v in columns[name].to_pylist() if v is not None)
            if values:
                sections.append(Section(name.replace("_", "-"), meaning[0].upper() + meaning[1:],
                                        [Chart(name, charts.counts(dict(sorted(values.items())), name))]))
    return sections


def _judges(run: Run) -> Section | None:
    items = []
    for stage in run.stats.stages:
        for measured in measured_ratios(stage.counters):
            items.append((f"{stage.stage_id}: {measured['counter'].replace('_', ' ')}", int(measured["count"]),
                          int(measured["of"]), measured["meaning"]))
    if not items:
        return None
    intro = " ".join(f"{label}: {meaning}." for label, _, _, meaning in items)
    return Section("judges", "Judges: position consistency and agreement",
                   [Chart("Measured shares", charts.shares([(label, count, of) for label, count, of, _ in items]),
                          "Counted by the judge stages over every pair (stats.json counters).")], intro)


def _timings(run: Run) -> Section:
    stages = [(s.stage_id, max(s.compute_seconds, 0.0), max(s.load_seconds, 0.0)) for s in run.stats.stages]
    return Section("timings", "Time per stage", [Chart("Seconds", charts.timings(stages),
                                                       "Compute time of the published parts (cached parts count the "
                                                       "time they took when computed) and model loading in this run.")])


def build_sections(run: Run) -> list[Section]:
    """Every section the run has data for, in reading order.

    Example: [s.id for s in build_sections(load_run("out/q"))] -> ['funnel', 'scores', ...]
    """
    if not run.data_files:
        raise ConfigError("the run folder has no published shards (data/*.parquet)", where=run.out_dir)
    schema = pq.read_schema(run.data_files[0])
    method_names = [n for _, _, names, _ in METHODS for n in names] + list(CATEGORIES)
    wanted = ["chosen_score", "rejected_score", "margin", "chosen", "rejected"] + method_names
    columns = read_columns(run.data_files, wanted)
    sections = [_funnel(run), _judges(run), _scores(columns), _lengths(run, columns), *_methods(run, columns),
                _timings(run)]
    stats = column_statistics(run.data_files, schema)
    if stats:
        sections.append(Section("statistics", "Numeric columns", table=[
            {"column": r["column"], "count": r["count"], "missing": r["missing"],
             **{k: r[k] for k in ("min", "p25", "median", "mean", "p75", "max")}} for r in stats]))
    return [s for s in sections if s is not None]


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_report(run: Run) -> str:
    """The report's whole HTML text. Example: render_report(load_run("out/q")).startswith("<!doctype html>")"""
    import jinja2
    from markupsafe import Markup

    sections = build_sections(run)
    for section in sections:
        for chart in section.charts:
            chart.svg = Markup(chart.svg)  # our own SVG (matplotlib escapes its text): inserted as it is
    stats = run.stats
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["cell"] = _cell
    with open(TEMPLATE_PATH, encoding="utf-8") as f:
        template = env.from_string(f.read())
    kept = f"{100 * stats.rows_out / stats.rows_in:.1f}%" if stats.rows_in else "–"
    return template.render(
        title=run.plan.name or os.path.basename(os.path.abspath(run.out_dir)), sections=sections,
        pipeline=run.plan.pipeline, version=stats.curate_version, executor=stats.executor,
        figures=[("rows in", f"{stats.rows_in:,}"), ("rows out", f"{stats.rows_out:,}"), ("kept", kept),
                 ("parts", f"{stats.parts:,}"), ("run time", f"{stats.run_seconds:,.1f} s")],
        overrides=list(run.plan.overrides), out_dir=os.path.abspath(run.out_dir),
    )


def write_report(out_dir: str, path: str | None = None) -> str:
    """Write the report of a finished run (default `<run>/report.html`); return its path.

    Example: write_report("out/quickstart") -> 'out/quickstart/report.html'
    """
    from curate.store import write_text_atomic

    run = load_run(out_dir)
    target = path or os.path.join(out_dir, REPORT_FILE)
    write_text_atomic(render_report(run), target)
    log.debug("report written to %s", target)
    return target
