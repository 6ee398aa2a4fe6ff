"""The typed run record: what a run folder's `stats.json` and `plan.json` say, and their one reader.

`RunStats` / `StageStats` are written by the runner at the end of every run and read back by
`load_run(out_dir)`; `curate push` (the dataset card) and `curate report` read a run only
through here. Stage times say what they measure:
- `compute_seconds`: the time the stage's parts took when they were computed, summed over every
  part of the output, including parts this run reused from the cache;
- `run_seconds`: the time this run spent on the stage (parts computed now, its fit, its model load);
- `load_seconds`: opening the stage's models in this run (0 when nothing was opened);
- `fit_seconds`: a global stage's fit when it was computed (`fit_computed` says whether this run did it).
Leaves out: computing any of it (`curate.stats`), and the dataset card.

Example: load_run("out/quickstart").stats.stage("judge").counters["parse_failures"]
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from curate.errors import ConfigError

STATS_FILE = "stats.json"
PLAN_FILE = "plan.json"
PIPELINE_FILE = "pipeline.yaml"
STATES_DIR = "states"
LENGTH_BIAS_FLAG = 0.7  # METHODS.md §8.2 [ours]: P(chosen longer) above this is flagged


@dataclass
class LengthBias:
    """How often a published pair's chosen reply is longer than its rejected one (characters, METHODS.md §8.2).

    `share_longer` = chosen_longer / pairs; `flagged` when it exceeds `threshold` (0.7, §8.2): a
    model trained on the pairs can learn that longer is better. Computed on every pair dataset a
    run publishes (each part task counts its rows; `curate.stats` sums them).
    Example: LengthBias.from_counts({"chosen_longer": 8, "chosen_shorter": 2, "equal": 0}).flagged -> True
    """

    pairs: int
    chosen_longer: int
    chosen_shorter: int
    equal: int
    share_longer: float | None
    flagged: bool
    threshold: float = LENGTH_BIAS_FLAG
    chosen_mean_chars: float | None = None
    rejected_mean_chars: float | None = None

    @classmethod
    def from_counts(cls, counts: dict[str, int] | None, threshold: float = LENGTH_BIAS_FLAG) -> "LengthBias | None":
        """From summed `length_counts` (None without counts). Example: LengthBias.from_counts(run.stats.output["length"])"""
        if counts is None:
            return None
        longer, shorter, equal = (int(counts.get(k, 0)) for k in ("chosen_longer", "chosen_shorter", "equal"))
        pairs = longer + shorter + equal
        share = longer / pairs if pairs else None
        return cls(pairs=pairs, chosen_longer=longer, chosen_shorter=shorter, equal=equal, share_longer=share,
                   flagged=share is not None and share > threshold, threshold=threshold,
                   chosen_mean_chars=counts.get("chosen_chars", 0) / pairs if pairs else None,
                   rejected_mean_chars=counts.get("rejected_chars", 0) / pairs if pairs else None)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "LengthBias":
        """Example: LengthBias.from_json(stats["length_bias"])"""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class StageStats:
    """One stage's line of the funnel.

    Example: StageStats(stage_id="dedup", stage="filters.dedup_exact", kind="global", key="ab", rows_in=10, rows_out=9)
    """

    stage_id: str
    stage: str
    kind: str
    key: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    compute_seconds: float = 0.0
    run_seconds: float = 0.0
    load_seconds: float = 0.0
    parts_computed: int = 0
    parts_cached: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    fit_seconds: float | None = None
    fit_computed: bool | None = None
    fit: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "StageStats":
        """Read one stage entry, ignoring keys this version does not know. Example: StageStats.from_json(d)"""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class RunStats:
    """The whole funnel of a run: rows in and out, drops per reason, per-stage lines, timings.

    Example: RunStats.from_json(json.load(open("out/q/stats.json"))).rows_out
    """

    pipeline: str | None
    rows_in: int
    rows_out: int
    parts: int
    dropped: dict[str, int]
    run_seconds: float
    stages: list[StageStats]
    executor: str = "local"
    curate_version: str = ""
    output: dict[str, Any] = field(default_factory=dict)  # summaries of the published rows, folded over parts
    length_bias: LengthBias | None = None  # §8.2's check on the published pairs (None: not pair rows)

    def stage(self, stage_id: str) -> StageStats:
        """The entry of one stage by its id. Example: stats.stage("judge").counters"""
        for entry in self.stages:
            if entry.stage_id == stage_id:
                return entry
        raise KeyError(stage_id)

    def to_json(self) -> dict[str, Any]:
        """Plain data for stats.json; empty optional fields are left out. Example: stats.to_json()["rows_out"]"""
        data = asdict(self)
        optional = {"counters", "fit", "resources"}  # left out when empty; `dropped` always stays
        data["stages"] = [{k: v for k, v in s.items() if v is not None and not (k in optional and v == {})}
                          for s in data["stages"]]
        return data

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "RunStats":
        """Read stats.json's content. Example: RunStats.from_json({"pipeline": "q", ...})"""
        known = {f.name for f in fields(cls)} - {"stages", "length_bias"}
        bias = raw.get("length_bias")  # stats.json written before the check was typed: rebuilt from the counts
        length = LengthBias.from_json(bias) if isinstance(bias, dict) else LengthBias.from_counts((raw.get("output") or {}).get("length") or None)
        return cls(stages=[StageStats.from_json(s) for s in raw.get("stages", [])], length_bias=length,
                   **{k: v for k, v in raw.items() if k in known})


@dataclass
class PlannedStageRecord:
    """One stage as plan.json records it: its id, registry name, params, key and output columns.

    Example: PlannedStageRecord(id="judge", stage="judges.self_reward", kind="model", version="1", key="ab")
    """

    id: str
    stage: str
    kind: str
    version: str
    key: str
    segment: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    index: int = 0
    dtype: str | dict[str, str] | None = None  # model stages: the dtype they run in (`auto` resolved)
    reference: str | None = None  # SPA / SCIR: the reference model, or 'none'

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "PlannedStageRecord":
        """Example: PlannedStageRecord.from_json(plan["stages"][0])"""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class PlanRecord:
    """plan.json: the resolved pipeline (source, stages with params and keys, segments).

    Example: load_run("out/q").plan.stages[0].params
    """

    name: str | None
    pipeline: str
    seed: int
    source: dict[str, Any]
    stages: list[PlannedStageRecord]
    segments: list[dict[str, Any]]
    overrides: list[str] = field(default_factory=list)

    def stage(self, stage_id: str) -> PlannedStageRecord:
        """Example: plan.stage("judge").params["samples"]"""
        for entry in self.stages:
            if entry.id == stage_id:
                return entry
        raise KeyError(stage_id)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "PlanRecord":
        """Example: PlanRecord.from_json(json.load(open("out/q/plan.json")))"""
        known = {f.name for f in fields(cls)} - {"stages"}
        stages = [PlannedStageRecord.from_json(s) for s in raw.get("stages", [])]
        return cls(stages=stages, **{k: v for k, v in raw.items() if k in known})


@dataclass
class Run:
    """A finished run folder, read back. Example: run = load_run("out/q"); run.stats.rows_out"""

    out_dir: str
    stats: RunStats
    plan: PlanRecord

    @property
    def data_dir(self) -> str:
        return os.path.join(self.out_dir, "data")

    @property
    def data_files(self) -> list[str]:
        """The published shards, sorted. Example: run.data_files[0] -> 'out/q/data/train-00000-of-00002.parquet'"""
        if not os.path.isdir(self.data_dir):
            return []
        return sorted(os.path.join(self.data_dir, n) for n in os.listdir(self.data_dir) if n.endswith(".parquet"))

    @property
    def pipeline_yaml(self) -> str | None:
        """The exact pipeline file the run was made from (copied into the run folder), or None."""
        path = os.path.join(self.out_dir, PIPELINE_FILE)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()

    def state_path(self, stage_id: str) -> str | None:
        """A global stage's published fitted state, or None. Example: run.state_path("ches")"""
        path = os.path.join(self.out_dir, STATES_DIR, f"{stage_id}.parquet")
        return path if os.path.exists(path) else None


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError("not a finished curate run folder (no such file)", where=path) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"is not valid JSON: {exc.msg} at line {exc.lineno}", where=path) from None


def load_run(out_dir: str) -> Run:
    """Read a run folder's stats.json and plan.json into typed records.

    Example: load_run("out/quickstart").stats.rows_out -> 11
    """
    if not os.path.isdir(out_dir):
        raise ConfigError("no such run folder", where=out_dir)
    stats = RunStats.from_json(_read_json(os.path.join(out_dir, STATS_FILE)))
    plan = PlanRecord.from_json(_read_json(os.path.join(out_dir, PLAN_FILE)))
    return Run(out_dir, stats, plan)
