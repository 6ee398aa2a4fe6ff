"""Progress of a run: rows done, rows/s and an ETA per segment, moving inside long stages; one line per stage.

Three pieces:
- Hooks for the work inside a part: `work_started(n)` and `work_done(k)`. `run_batched` calls them
  per generation request, the scoring backends per request (vLLM) or per length batch
  (transformers); vLLM's generation also reports the decoding share of the requests still running
  (`work_running`). They do nothing when nobody listens (a Dask worker, a library call).
- `computing_part(segment_key, index)`: `compute_part` wraps one part in it, so the hooks know
  whose part they advance; `activity(text)` names what a part is doing meanwhile (loading a model).
- `SegmentProgress`: the driver's view of one segment (`run_segment` opens it). Rows done = rows of
  cached and finished parts + the running part's share of its work items; that share is done / max
  (items the part asked for so far, items per row learned from the segment's first part x rows),
  so a stage that makes several passes (CDR: strong, then weak model) does not read as done after
  its first. Rows/s counts from the first work item, so a model load does not dilute it; the ETA
  waits for a finished part or half of one (see `SegmentProgress.eta`). Shown as a live bar on a
  terminal (`curate.terminal.live_console`), else as a log line every LOG_EVERY seconds; when the
  segment ends, one line per stage.
A Dask executor's tasks run in other processes: there the bar moves per committed part.

Example: with segment_progress("judge", {key: "judge"}, {0: 6}, {}, 0, key) as bar: bar.committed(result)
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

log = logging.getLogger("curate.progress")

LOG_EVERY = 10.0  # seconds between progress log lines where there is no live bar


def clock(seconds: float) -> str:
    """H:MM:SS. Example: clock(3725) -> '1:02:05'"""
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def per_second(rate: float) -> str:
    """A rate, readable at any size. Example: per_second(0.0821) -> '0.082', per_second(2437.2) -> '2,437'"""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"


# Hooks: called where the work happens ------------------------------------------------------------

_LISTENING: dict[str, "SegmentProgress"] = {}  # segment key -> its progress, for parts computed in this process
# the part being computed in this thread (or context), and its segment: two parts may compute at once
_CURRENT: contextvars.ContextVar["tuple[SegmentProgress, int] | None"] = contextvars.ContextVar("curate_part", default=None)


@contextlib.contextmanager
def computing_part(segment_key: str, index: int) -> Iterator[None]:
    """Mark part `index` of a segment as the one this thread's hooks advance (no-op when nobody listens).

    Example: with computing_part(task.segment_key, task.index): run the stages
    """
    segment = _LISTENING.get(segment_key)
    if segment is None:
        yield
        return
    token = _CURRENT.set((segment, index))
    try:
        yield
        segment.part_finished(index)
    finally:
        _CURRENT.reset(token)


def work_started(items: int) -> None:
    """The running part's stage will process `items` more work items. Example: work_started(len(requests))"""
    current = _CURRENT.get()
    if current is not None and items > 0:
        current[0].work(current[1], expected=items)


def work_done(items: int = 1) -> None:
    """`items` work items of the running part are finished. Example: work_done()  # one request answered"""
    current = _CURRENT.get()
    if current is not None and items > 0:
        current[0].work(current[1], done=items)


def work_running(items: float) -> None:
    """How many items' worth the unfinished work of the running part has done (replaces the last value).

    Example: work_running(12 * 0.4)  # 12 requests decoding, 40% of their token budget used
    """
    current = _CURRENT.get()
    if current is not None:
        current[0].work(current[1], running=items)


@contextlib.contextmanager
def activity(text: str) -> Iterator[None]:
    """Name what the running part does meanwhile (shown next to its bar).

    Example: with activity("loading models"): open the stages
    """
    current = _CURRENT.get()
    if current is None:
        yield
        return
    segment = current[0]
    segment.activity = text
    try:
        yield
    finally:
        segment.activity = ""


# The driver's view of a segment ----------------------------------------------------------------


@dataclass
class _Part:
    rows: int
    expected: int = 0
    done: int = 0
    running: float = 0.0  # what unfinished items have done, in items (an engine's decoding share)
    shown: float = 0.0  # rows shown for this part so far (never goes back)


@dataclass
class _StageLine:
    """What one stage did over the segment's parts (cached and computed)."""

    id: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    load_seconds: float = 0.0
    cached: int = 0
    computed: int = 0
    computed_rows: int = 0  # rows into the parts computed in this run (what the time was spent on)

    def add(self, entry: dict[str, Any], cached: bool) -> None:
        self.rows_in += entry.get("rows_in", 0)
        self.rows_out += entry.get("rows_out", 0)
        self.dropped.update(entry.get("dropped", {}))
        if cached:
            self.cached += 1
        else:
            self.computed += 1
            self.computed_rows += entry.get("rows_in", 0)
            self.seconds += entry.get("seconds", 0.0)

    def line(self, parts: int) -> str:
        """Example: '✓ judge          12 → 12 rows   41.2 s, 0.29 rows/s (model load 11.8 s)'"""
        rows = f"{self.rows_in:,} → {self.rows_out:,} rows"
        dropped = ", ".join(f"{reason} {n:,}" for reason, n in sorted(self.dropped.items()))
        if not self.computed:
            when = "cached"
        else:
            total = self.seconds + self.load_seconds
            when = f"{total:.1f} s" if total >= 0.1 else "<0.1 s"
            if total >= 0.1 and self.computed_rows:
                when += f", {per_second(self.computed_rows / total)} rows/s"
            if self.load_seconds >= 0.05:
                when += f" (model load {self.load_seconds:.1f} s)"
            if self.cached:
                when += f"; {self.cached} of {parts} parts cached"
        return f"✓ {self.id:<16} {rows:<22} {when}" + (f"   dropped: {dropped}" if dropped else "")


class SegmentProgress:
    """Rows done, rows/s and ETA of one segment, fed by the hooks and by committed results (module docstring).

    Example: bar = SegmentProgress("judge", {"k1": "judge"}, {0: 6, 1: 6}, {}); bar.committed(result)
    """

    def __init__(self, label: str, stages: dict[str, str], todo_rows: dict[int, int],
                 cached: dict[int, dict[str, Any]], cached_rows: int = 0):
        self.label = label
        self.stage_ids = stages  # stage key -> id, in order
        self.parts = {i: _Part(rows) for i, rows in todo_rows.items()}
        self.n_parts = len(todo_rows) + len(cached)
        self.total = cached_rows + sum(todo_rows.values())
        self.base = cached_rows  # rows of parts cached before this run
        self.finished: set[int] = set()
        self.items_per_row: float | None = None
        self.activity = ""
        self.started = time.perf_counter()
        self.work_began: tuple[float, float] | None = None  # (time, rows) at the first work item
        self.lines = {key: _StageLine(stage_id) for key, stage_id in stages.items()}
        for record in cached.values():
            for key, entry in record.get("stages", {}).items():
                if key in self.lines:
                    self.lines[key].add(entry, cached=True)
        self._lock = threading.Lock()
        self._last_log = self.started
        self._bars: Any = None
        self._task: Any = None

    # Events ---------------------------------------------------------------------------------
    def work(self, index: int, expected: int = 0, done: int = 0, running: float | None = None) -> None:
        """Work items of part `index` asked for / finished / partly done (from the hooks)."""
        part = self.parts.get(index)
        if part is None:
            return
        with self._lock:
            self._began()
            part.expected += expected
            part.done += done
            if running is not None:
                part.running = running
            progress = part.done + part.running
            if progress and part.rows:
                denominator = max(part.expected, (self.items_per_row or 0.0) * part.rows, progress)
                part.shown = max(part.shown, part.rows * progress / denominator)
        self._show()

    def part_finished(self, index: int) -> None:
        """Part `index` is computed (its commit may come later); learns items per row from the first."""
        part = self.parts.get(index)
        if part is None or index in self.finished:
            return
        with self._lock:
            self._began()  # a segment without hooks (cheap stages, other processes) counts from its first part
            if self.items_per_row is None and part.expected and part.rows:
                self.items_per_row = part.expected / part.rows
            self.finished.add(index)
        self._show()

    def committed(self, result: Any) -> None:
        """A part's result is committed (any executor): count it and fold its record into the stage lines."""
        self.part_finished(result.index)
        for key, entry in result.record.get("stages", {}).items():
            if key in self.lines:
                self.lines[key].add(entry, cached=False)
        for stage_id, seconds in result.load_seconds.items():
            for line in self.lines.values():
                if line.id == stage_id:
                    line.load_seconds += seconds

    # Numbers --------------------------------------------------------------------------------
    def _began(self) -> None:
        if self.work_began is None:
            self.work_began = (time.perf_counter(), self.rows_done())

    def rows_done(self) -> float:
        """Rows of cached and finished parts plus the running part's share. Example: bar.rows_done() -> 7.5"""
        return self.base + sum(p.rows if i in self.finished else p.shown for i, p in self.parts.items())

    def rate(self) -> float | None:
        """Rows per second since the first work item (None before any row is done)."""
        if self.work_began is None:
            return None
        began, rows_then = self.work_began
        elapsed = time.perf_counter() - began
        done = self.rows_done() - rows_then
        return done / elapsed if done > 0 and elapsed > 0 else None

    def eta(self) -> float | None:
        """Seconds left at the current rate; None until a part is finished or half of one is done.

        An engine that batches a whole part (vLLM) finishes most requests near the part's end,
        so a rate measured earlier would promise far too long a wait.
        """
        rate = self.rate()
        started = self.finished or any(2 * p.shown >= p.rows for p in self.parts.values() if p.rows)
        return None if rate is None or not started else max(0.0, self.total - self.rows_done()) / rate

    def status(self) -> str:
        """Example: '7.5/12 rows, 0.31 rows/s, 0:00:24 elapsed, ETA 0:00:15'"""
        rate, eta = self.rate(), self.eta()
        text = f"{self.rows_done():,.1f}/{self.total:,} rows, " + (f"{per_second(rate)} rows/s" if rate else "– rows/s")
        elapsed = clock(time.perf_counter() - self.started)
        text += f", {elapsed} elapsed, ETA " + (clock(eta) if eta is not None else "–")
        return text + (f" ({self.activity})" if self.activity else "")

    # Display --------------------------------------------------------------------------------
    def _show(self) -> None:
        if self._task is not None:
            self._bars.update(self._task, completed=self.rows_done())
            return
        now = time.perf_counter()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.info("%s: %s", self.label, self.status())

    def open(self, bars: Any) -> None:
        """Show a live bar in `bars` (a rich Progress), or None for log lines."""
        self._bars = bars
        if bars is not None:
            self._task = bars.add_task(self.label, total=max(self.total, 1), completed=self.rows_done(), segment=self)

    def close(self, failed: bool = False) -> None:
        """Remove the bar and log one line per stage (none when the segment failed: its error says why)."""
        if self._task is not None:
            self._bars.remove_task(self._task)
            self._bars.refresh()  # else the lines below are printed above the removed bar's last frame
            self._task = None
        if not failed:
            for line in self.lines.values():
                log.info("%s", line.line(self.n_parts))


class ReadProgress:
    """A log line every LOG_EVERY seconds while rows are read (ingest): rows so far, rows/s, parts written.

    Example: progress = ReadProgress("ingesting x.jsonl"); progress.read(8192, parts=3)
    """

    def __init__(self, label: str):
        self.label = label
        self.rows = 0
        self.started = self.last = time.perf_counter()

    def read(self, rows: int, parts: int) -> None:
        """`rows` more rows were read; `parts` parts are written so far."""
        self.rows += rows
        now = time.perf_counter()
        if now - self.last >= LOG_EVERY:
            self.last = now
            elapsed = now - self.started
            log.info("%s: %s rows read, %s rows/s, %d parts written, %s elapsed", self.label, f"{self.rows:,}",
                     per_second(self.rows / elapsed), parts, clock(elapsed))


# The live display ---------------------------------------------------------------------------------

_bars: Any = None  # the rich Progress of the running run, on a terminal


def _columns() -> list:
    from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, TextColumn
    from rich.text import Text

    class Status(ProgressColumn):
        """rows done / total, rows/s, elapsed and ETA, computed by the segment at each refresh."""

        def render(self, task: Any) -> Text:
            segment = task.fields.get("segment")
            return Text(segment.status() if segment is not None else "")

    return [SpinnerColumn(), TextColumn("{task.description}", style="bold", markup=False), BarColumn(bar_width=30),
            Status()]


@contextlib.contextmanager
def live_bars() -> Iterator[None]:
    """Keep a live progress display on the terminal while the block runs (nothing elsewhere).

    Example: with live_bars(): run the segments
    """
    global _bars
    from curate.terminal import live_console

    console = live_console()
    if console is None or _bars is not None:
        yield
        return
    from rich.progress import Progress

    _bars = Progress(*_columns(), console=console, transient=True, refresh_per_second=4)
    try:
        with _bars:
            yield
    finally:
        _bars = None


@contextlib.contextmanager
def segment_progress(label: str, stages: dict[str, str], todo_rows: dict[int, int], cached: dict[int, dict[str, Any]],
                     cached_rows: int, segment_key: str) -> Iterator[SegmentProgress]:
    """A segment's progress, listening to the hooks of its parts computed in this process; stage lines at the end.

    Example: with segment_progress("judge", ids, {0: 6}, {}, 0, seg.key) as bar: bar.committed(result)
    """
    progress = SegmentProgress(label, stages, todo_rows, cached, cached_rows)
    progress.open(_bars if todo_rows else None)
    _LISTENING[segment_key] = progress
    failed = True
    try:
        yield progress
        failed = False
    finally:
        _LISTENING.pop(segment_key, None)
        progress.close(failed)
