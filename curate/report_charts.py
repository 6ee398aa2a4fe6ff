"""The charts of `curate report`, drawn with matplotlib and returned as inline SVG text.

Why matplotlib to SVG: the report must be one self-contained file that opens with no network;
an SVG is text inside the HTML (no script, no image files), stays sharp at any zoom, and its
labels stay selectable text. matplotlib is the most widely kept plotting library in Python, and
its SVG output is deterministic here (fixed hash salt, no date), so the same run writes the same
report byte for byte. Plotly would add ~3.5 MB of JavaScript to every report for hover tooltips.
Leaves out: what is plotted (`curate.report` picks the data).

Example: histogram({"margin": np.array([1.0, 2.5, 2.0])}, "margin").startswith("<svg")
"""
from __future__ import annotations

import functools
import io
from typing import Any, Callable, Sequence

import numpy as np

CHOSEN, REJECTED, NEUTRAL, DROPPED = "#2a9d8f", "#e76f51", "#457b9d", "#d8dee4"
STYLE = {"svg.fonttype": "none", "svg.hashsalt": "curate", "font.size": 9, "axes.spines.top": False,
         "axes.spines.right": False, "axes.titlesize": 10, "axes.titleweight": "bold", "legend.frameon": False,
         "font.family": ["DejaVu Sans", "sans-serif"]}
MAX_BINS = 40
MAX_POINTS = 2000  # a scatter shows at most this many points (an even sample of the rows)


def styled(chart: Callable[..., str]) -> Callable[..., str]:
    """Draw `chart` with the report's style and the Agg backend, leaving the caller's matplotlib settings alone."""

    @functools.wraps(chart)
    def draw(*args: Any, **kwargs: Any) -> str:
        import matplotlib

        with matplotlib.rc_context({**STYLE, "backend": "Agg"}):
            return chart(*args, **kwargs)

    return draw


def _figure(width: float = 6.4, height: float = 3.0) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")  # no pyplot: no global figure state
    return fig, fig.add_subplot()


def to_svg(fig: Any) -> str:
    """The figure as an inline `<svg>` element (no XML prolog, no date).

    Example: to_svg(fig)[:4] -> '<svg'
    """
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def bins_for(values: Sequence[np.ndarray]) -> np.ndarray:
    """Shared bin edges for several samples: numpy's 'auto' rule over all of them, at most MAX_BINS.

    Example: len(bins_for([np.arange(10.0)])) - 1 -> 10 or fewer
    """
    data = np.concatenate([v for v in values if v.size]) if any(v.size for v in values) else np.array([0.0])
    low, high = float(data.min()), float(data.max())
    if low == high:
        return np.array([low - 0.5, high + 0.5])
    edges = np.histogram_bin_edges(data, bins="auto")
    return edges if len(edges) - 1 <= MAX_BINS else np.linspace(low, high, MAX_BINS + 1)


@styled
def histogram(series: dict[str, np.ndarray], xlabel: str, colors: Sequence[str] = (NEUTRAL, CHOSEN, REJECTED),
              marks: dict[str, float] | None = None) -> str:
    """Overlaid histograms on shared bins (legend with n and mean), optional labelled vertical lines.

    Example: histogram({"chosen": a, "rejected": b}, "score", colors=(CHOSEN, REJECTED))
    """
    fig, ax = _figure(width=5.4, height=2.8)
    edges = bins_for(list(series.values()))
    overlaid = len(series) > 1
    for (label, values), color in zip(series.items(), colors):
        ax.hist(values, bins=edges, color=color, alpha=0.55 if overlaid else 0.9, edgecolor="white", linewidth=0.5,
                label=f"{label} (n={values.size:,}, mean {values.mean():.3g})" if values.size else f"{label} (n=0)")
    for label, value in (marks or {}).items():
        ax.axvline(value, color="#333333", linestyle="--", linewidth=1)
        ax.annotate(f" {label}", (value, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.legend(loc="best", fontsize=8)
    return to_svg(fig)


@styled
def funnel(steps: list[tuple[str, int, dict[str, int]]]) -> str:
    """Rows left after each step (horizontal bars, first step on top), each step's drops stacked in grey.

    Example: funnel([("source", 24, {}), ("pairs", 19, {"tie": 1})])
    """
    fig, ax = _figure(width=5.4, height=0.6 + 0.26 * len(steps))
    labels = [label for label, _, _ in steps]
    kept = np.array([rows for _, rows, _ in steps], dtype=float)
    lost = np.array([sum(dropped.values()) for _, _, dropped in steps], dtype=float)
    y = np.arange(len(steps))
    ax.barh(y, kept, color=NEUTRAL, label="rows out")
    ax.barh(y, lost, left=kept, color=DROPPED, label="dropped here")
    width = float((kept + lost).max()) if len(steps) else 1.0
    for i, (rows, gone) in enumerate(zip(kept, lost)):
        text = f" {int(rows):,}" + (f"  (−{int(gone):,})" if gone else "")
        ax.text(rows + gone, i, text, va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, width * 1.25 or 1)
    ax.set_xlabel("rows")
    ax.legend(loc="lower right", fontsize=8)
    return to_svg(fig)


@styled
def scatter_lengths(chosen: np.ndarray, rejected: np.ndarray) -> str:
    """Chosen vs rejected length per pair, with the diagonal; an even sample of MAX_POINTS when larger.

    Example: scatter_lengths(np.array([10, 40]), np.array([12, 30]))
    """
    fig, ax = _figure(width=4.6, height=3.6)
    step = max(1, int(np.ceil(chosen.size / MAX_POINTS)))
    x, y = chosen[::step], rejected[::step]
    longer = x > y
    ax.scatter(x[longer], y[longer], s=9, color=CHOSEN, alpha=0.7, label="chosen longer")
    ax.scatter(x[~longer], y[~longer], s=9, color=REJECTED, alpha=0.7, label="chosen not longer")
    top = float(max(x.max(initial=1), y.max(initial=1)))
    ax.plot([0, top], [0, top], color="#777777", linewidth=0.8, linestyle=":")
    ax.set_xlabel("chosen reply (characters)")
    ax.set_ylabel("rejected reply (characters)")
    title = "every pair" if step == 1 else f"every {step}th pair ({x.size:,} of {chosen.size:,})"
    ax.set_title(title, fontsize=8, fontweight="normal")
    ax.legend(loc="best", fontsize=8)
    return to_svg(fig)


@styled
def shares(items: list[tuple[str, int, int]]) -> str:
    """Horizontal 0-100% bars, one per (label, count, of), labelled 'count / of (share)'.

    Example: shares([("judge: position consistency", 40, 100)])
    """
    fig, ax = _figure(height=0.6 + 0.42 * len(items))
    y = np.arange(len(items))
    share = np.array([count / of if of else 0.0 for _, count, of in items])
    ax.barh(y, np.ones(len(items)), color=DROPPED)
    ax.barh(y, share, color=NEUTRAL)
    for i, (_, count, of) in enumerate(items):
        ax.text(1.01, i, f"{count:,} / {of:,} ({100 * share[i]:.0f}%)", va="center", fontsize=8)
    ax.set_yticks(y, [label for label, _, _ in items])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.3)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0%", "25%", "50%", "75%", "100%"])
    return to_svg(fig)


@styled
def counts(values: dict[str, int], xlabel: str) -> str:
    """Bars of counts per category (a verdict, a domain). Example: counts({"win": 9, "tie": 2, "lose": 5}, "verdict")"""
    fig, ax = _figure(width=4.6, height=2.8)
    names = list(values)
    ax.bar(names, [values[n] for n in names], color=NEUTRAL)
    for i, name in enumerate(names):
        ax.text(i, values[name], f"{values[name]:,}", ha="center", va="bottom", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    return to_svg(fig)


@styled
def timings(stages: list[tuple[str, float, float]]) -> str:
    """Seconds per stage: computing (blue) and loading models (grey), stacked.

    Example: timings([("generate", 30.2, 11.8), ("judge", 50.1, 0.0)])
    """
    fig, ax = _figure(height=0.5 + 0.3 * len(stages))
    y = np.arange(len(stages))
    compute = np.array([c for _, c, _ in stages])
    load = np.array([lo for _, _, lo in stages])
    ax.barh(y, compute, color=NEUTRAL, label="computing")
    ax.barh(y, load, left=compute, color=DROPPED, label="loading models")
    for i in range(len(stages)):
        ax.text(compute[i] + load[i], i, f" {compute[i] + load[i]:.1f} s", va="center", fontsize=8)
    ax.set_yticks(y, [name for name, _, _ in stages])
    ax.invert_yaxis()
    ax.set_xlim(0, max(float((compute + load).max(initial=0)) * 1.2, 0.1))
    ax.set_xlabel("seconds")
    ax.legend(loc="lower right", fontsize=8)
    return to_svg(fig)
