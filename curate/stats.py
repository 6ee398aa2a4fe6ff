"""The funnel of a run: a fold over the manifests (what every part holds) and this run's log.

Rows in / out, drops per reason and counters come from the manifest records, so they describe
the published output whether its parts were computed now or reused; `RunLog` adds what only
this run knows: parts computed, seconds spent, model load time, fits done. The result is the
typed `curate.record.RunStats`. Leaves out: reading a run folder back (`curate.record.load_run`).

Example: collect_stats(plan, store, run_log, 12.5).stage("judge").parts_computed
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from curate import __version__
from curate.ingest import SOURCE_ID
from curate.plan import Plan
from curate.record import LengthBias, RunStats, StageStats
from curate.store import Store
from curate.task import PartResult


@dataclass
class RunLog:
    """What this run did, per stage id. Example: log.add(result, plan.segments[0])"""

    computed: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)
    load_seconds: Counter[str] = field(default_factory=Counter)
    fitted: set[str] = field(default_factory=set)
    source_seconds: float = 0.0

    def add(self, result: PartResult, stage_ids: dict[str, str]) -> None:
        """Fold one committed result in (stage_ids: stage key -> stage id)."""
        for stage_key, entry in result.record["stages"].items():
            stage_id = stage_ids[stage_key]
            self.computed[stage_id] += 1
            self.seconds[stage_id] += entry["seconds"]
        for stage_id, seconds in result.load_seconds.items():
            self.load_seconds[stage_id] += seconds
            self.seconds[stage_id] += seconds

    def add_fit(self, stage_id: str, seconds: float) -> None:
        self.fitted.add(stage_id)
        self.seconds[stage_id] += seconds


def _stage_entry(plan: Plan, store: Store, planned, records: list[dict], log: RunLog) -> StageStats:
    per_part = [r["stages"][planned.key] for r in records if planned.key in r.get("stages", {})]
    dropped: Counter[str] = Counter()
    counters: Counter[str] = Counter()
    for entry in per_part:
        dropped.update(entry["dropped"])
        counters.update(entry.get("counters", {}))
    stage = planned.bound.stage
    entry = StageStats(
        stage_id=planned.id, stage=stage.name, kind=planned.kind, key=planned.key,
        rows_in=sum(e["rows_in"] for e in per_part), rows_out=sum(e["rows_out"] for e in per_part),
        dropped=dict(sorted(dropped.items())), compute_seconds=round(sum(e["seconds"] for e in per_part), 4),
        run_seconds=round(log.seconds[planned.id], 4), load_seconds=round(log.load_seconds[planned.id], 4),
        parts_computed=log.computed[planned.id], parts_cached=len(records) - log.computed[planned.id],
        counters=dict(sorted(counters.items())), resources=stage.resources(),
    )
    if planned.kind == "global":
        state = store.read_state(planned.key)
        meta = (state.schema.metadata or {}) if state is not None else {}
        entry.fit_seconds = round(float(meta.get(b"fit_seconds", b"0")), 4)
        entry.fit_computed = planned.id in log.fitted
        entry.fit = stage.fit_summary(state) if state is not None else {}
    return entry


def collect_stats(plan: Plan, store: Store, log: RunLog, seconds: float, executor: str = "local") -> RunStats:
    """The funnel from the manifests plus this run's log. Example: collect_stats(plan, store, log, 1.2).rows_out"""
    source = plan.source
    stages = [StageStats(stage_id=SOURCE_ID, stage="source", kind="source", key=source.key, rows_in=source.rows_in,
                         rows_out=source.rows, dropped=source.dropped, compute_seconds=round(source.seconds, 4),
                         run_seconds=round(log.source_seconds, 4), parts_computed=source.n_parts if log.source_seconds else 0,
                         parts_cached=0 if log.source_seconds else source.n_parts)]
    manifests = {segment.key: list(store.finished(segment.key).values()) for segment in plan.segments}
    for planned in plan.stages:
        stages.append(_stage_entry(plan, store, planned, manifests[plan.segments[planned.segment].key], log))
    total_dropped: Counter[str] = Counter()
    for entry in stages:
        total_dropped.update(entry.dropped)
    lengths: Counter[str] = Counter()
    for record in manifests[plan.segments[-1].key] if plan.stages else []:
        lengths.update(record.get("length", {}))
    return RunStats(
        pipeline=plan.pipeline.spec.name, rows_in=source.rows_in, rows_out=stages[-1].rows_out,
        parts=source.n_parts, dropped=dict(sorted(total_dropped.items())), run_seconds=round(seconds, 4),
        stages=stages, executor=executor, curate_version=__version__,
        output={"length": dict(lengths)} if lengths else {}, length_bias=LengthBias.from_counts(dict(lengths)) if lengths else None,
    )
