"""The first segment computed on each source part while ingest writes it (local executor, cheap stages).

A fresh run would otherwise write every source part, wait for the whole source, then read each
part back to run the first segment on it. When that segment has only map and filter stages (no
model, no global fit) and parts run in this process, each part's stages run on an ingest
writer thread beside the part's own write, while the ingest reads on: the same `compute_part` /
`write_attempt` as any task, into an attempt folder of the segment. Measured by
`benchmarks/bench_executor.py` (README, Benchmarks).

The driver commits these attempts only once the source itself is committed, and only where
nothing they were computed from changed: the plan used here is built from the columns of the
first part the feed gets, so the ingested columns must be exactly those, and a part that
ingest rewrote at the end (an id repeat fixed, a column type unified) is computed again. Those
parts, and any part whose stages failed here, are left to the segment's own run, which reports
errors as usual. Leaves out: model stages (they would hold the ingest up) and other executors
(the work belongs where their tasks run).

Example: feed = first_segment_feed(pipeline, store, key, "local"); ingest_source(spec, base, store, key, feed)
"""
from __future__ import annotations

import logging
import os
import shutil
import threading

import pyarrow as pa

from curate.config import Pipeline
from curate.errors import CurateError
from curate.plan import Segment, SourceInfo, build_plan
from curate.store import Store
from curate.task import PartResult, PartTask, StageTask, adopt_planned, compute_part, write_attempt

log = logging.getLogger(__name__)

CHEAP_KINDS = ("map", "filter")


class FirstSegmentFeed:
    """Runs the first segment on each source part as ingest cuts it (module docstring).

    The plan comes from the columns of the first part it gets, so nothing is read twice.
    Example: feed.take(0, part); feed.accepted(info) -> [PartResult(...)]
    """

    def __init__(self, pipeline: Pipeline, root: str, source_key: str):
        self.pipeline = pipeline
        self.root = root
        self.source_key = source_key
        self.schema: pa.Schema | None = None  # the columns the plan was built from
        self.segment: Segment | None = None
        self.stages: tuple[StageTask, ...] = ()
        self.results: dict[int, PartResult] = {}
        self.stopped = False  # not fusable, or a part failed here: the rest are left to the segment's run
        self._lock = threading.Lock()

    def _planned(self, schema: pa.Schema) -> bool:
        """Plan the first segment over these columns once; False when it cannot run here."""
        with self._lock:
            if self.segment is None and not self.stopped:
                source = SourceInfo(self.source_key, schema, -1, -1, -1)
                segment = _cheap_first_segment(self.pipeline, source)
                if segment is None:
                    self.stopped = True
                else:
                    adopt_planned(segment.stages)
                    self.schema, self.segment = schema, segment
                    self.stages = tuple(StageTask.of(planned) for planned in segment.stages)
            return not self.stopped

    def take(self, index: int, part: pa.Table) -> None:
        """Compute and write part `index` of the segment (on an ingest writer thread)."""
        if self.stopped or not self._planned(part.schema):
            return
        segment = self.segment
        task = PartTask(self.root, segment.key, segment.parent_key, index, self.stages, None, part.num_rows)
        try:
            result = write_attempt(compute_part(task, part))
        except Exception as exc:  # noqa: BLE001 - the segment's own run computes it again and reports it
            log.debug("part %d left to the segment's run: %s", index, exc)
            self.stopped = True
            return
        with self._lock:
            self.results[index] = result

    def discard(self, indexes: set[int]) -> None:
        """Forget the parts ingest rewrote after they were taken."""
        with self._lock:
            for index in indexes:
                _remove_attempt(self.results.pop(index, None))

    def accepted(self, info: SourceInfo) -> list[PartResult]:
        """The results to commit, in part order, now that the source is committed; the others are removed."""
        with self._lock:
            results, self.results = self.results, {}
        if self.schema is None or not info.schema.equals(self.schema):
            log.debug("the ingested columns differ from the first part's: the first segment runs on its own")
            for result in results.values():
                _remove_attempt(result)
            return []
        return [results[i] for i in sorted(results)]

    def abandon(self) -> None:
        """The ingest failed: remove every attempt made here."""
        with self._lock:
            results, self.results = self.results, {}
        for result in results.values():
            _remove_attempt(result)


def _remove_attempt(result: PartResult | None) -> None:
    if result is not None:
        shutil.rmtree(os.path.dirname(result.data), ignore_errors=True)


def first_segment_feed(pipeline: Pipeline, store: Store, source_key: str, executor_name: str) -> FirstSegmentFeed | None:
    """A feed for the first segment when its parts may run during ingest (module docstring), else None.

    Example: first_segment_feed(pipeline, store, key, "local")
    """
    if executor_name != "local":
        return None
    return FirstSegmentFeed(pipeline, store.root, source_key)


def _cheap_first_segment(pipeline: Pipeline, source: SourceInfo) -> Segment | None:
    """The plan's first segment when it has only map and filter stages, else None."""
    try:
        plan = build_plan(pipeline, source)
    except CurateError:
        return None  # the run's own plan, over the ingested columns, says what is wrong
    if not plan.segments or not plan.segments[0].stages:
        return None
    segment = plan.segments[0]
    return segment if all(planned.kind in CHEAP_KINDS for planned in segment.stages) else None


__all__ = ["CHEAP_KINDS", "FirstSegmentFeed", "first_segment_feed"]
