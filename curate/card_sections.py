"""What the dataset card says, as plain data: stages, funnel, statistics of the published shards.

Every value comes from the run record (`curate.record.load_run`: stats.json, plan.json, the copied
pipeline.yaml) or from the shards themselves; `curate.card` turns it into the README. Stage
params are those that change the output (`Params.key_params`: execution knobs left out). Judge
templates are read again by name when the card is written, at the end of the run that used them.
Leaves out: rendering (the Jinja2 template in `curate/templates/dataset_card.md`).

Example: length_bias(load_run("out/q").data_files)["chosen_longer"] -> 12
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.record import LengthBias, PlannedStageRecord, Run, StageStats

log = logging.getLogger(__name__)

MODEL_PARAMS = ("model", "models", "strong", "weak", "policy", "reference", "judge", "router")
SAMPLE_CHARS = 600  # longer strings in the sample row are cut, with the count of characters left out
# Ratios a judge stage counts (stats.json counters): numerator, denominator(s) and what the share means.
MEASURED = [
    ("swap_consistent", ("pairs_with_both_orders",), "position consistency: verdict unchanged when the two answers swap places"),
    ("agree_with_label", ("agree_with_label", "disagree_with_label"), "agreement with the input's chosen/rejected label"),
    ("consistent", ("rows",), "implicit-reward and judge verdicts agree"),
    ("parse_failures", ("judgments",), "judge outputs that could not be parsed"),
]


@dataclass
class StageSection:
    """One stage as the card describes it. Example: StageSection("judge", "judges.self_reward", "model")"""

    id: str
    stage: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    templates: list[dict[str, str]] = field(default_factory=list)
    fit: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)
    measured: list[dict[str, Any]] = field(default_factory=list)
    rows_in: int = 0
    rows_out: int = 0


def output_params(planned: PlannedStageRecord) -> dict[str, Any]:
    """The stage's params that change its output, None values left out (all params if the stage is unknown).

    Example: output_params(plan.stage("judge")) -> {'model': 'smollm2-135m-instruct', 'samples': 3, ...}
    """
    from curate.registry import get_stage

    try:
        params = get_stage(planned.stage).Params(**planned.params).key_params()
    except (CurateError, ValueError, TypeError):  # a third-party stage no longer installed, or renamed params
        params = dict(planned.params)
    return {k: v for k, v in params.items() if v is not None}


def stage_models(params: dict[str, Any]) -> list[str]:
    """The model references among a stage's params. Example: stage_models({"strong": "a", "weak": "b"}) -> ['a', 'b']"""
    found: list[str] = []
    for name in MODEL_PARAMS:
        value = params.get(name)
        for ref in value if isinstance(value, list) else [value]:
            if isinstance(ref, str) and ref and ref not in found:
                found.append(ref)
    return found


def stage_templates(params: dict[str, Any]) -> list[dict[str, str]]:
    """Name, hash and text of each prompt template a stage uses (`template`, `<x>_template` when `<x>` is set).

    Example: stage_templates({"template": "self_reward"})[0]["hash"] -> '5c1e...'
    """
    from curate.judges.templates import load_template

    found = []
    for name, value in params.items():
        if not isinstance(value, str) or not (name == "template" or name.endswith("_template")):
            continue
        if name != "template" and not params.get(name[: -len("_template")]):
            continue  # e.g. router_template without a router: not used
        try:
            template = load_template(value)
        except CurateError:
            found.append({"param": name, "name": value, "hash": "", "text": "(template file not found when the card was written)"})
            continue
        found.append({"param": name, "name": value, "hash": template.hash, "text": template.text})
    return found


def measured_ratios(counters: dict[str, Any]) -> list[dict[str, Any]]:
    """Shares a stage measured, from its counters (MEASURED). Example: measured_ratios({"swap_consistent": 4, "pairs_with_both_orders": 10})"""
    out = []
    for numerator, denominators, meaning in MEASURED:
        if numerator not in counters:
            continue
        total = sum(counters.get(d, 0) for d in denominators)
        if total:
            out.append({"counter": numerator, "count": counters[numerator], "of": total,
                        "share": counters[numerator] / total, "meaning": meaning})
    return out


def stage_sections(run: Run) -> list[StageSection]:
    """Every planned stage with its output params, models, templates, fit, drops and counters.

    Example: [s.id for s in stage_sections(load_run("out/q"))] -> ['nonempty', ..., 'trl']
    """
    by_id: dict[str, StageStats] = {s.stage_id: s for s in run.stats.stages}
    sections = []
    for planned in run.plan.stages:
        stats = by_id.get(planned.id)
        params = output_params(planned)
        counters = dict(stats.counters) if stats else {}
        sections.append(StageSection(
            id=planned.id, stage=planned.stage, kind=planned.kind, params=params,
            models=stage_models(params), templates=stage_templates(params),
            fit=dict(stats.fit) if stats else {}, dropped=dict(stats.dropped) if stats else {},
            counters=counters, measured=measured_ratios(counters),
            rows_in=stats.rows_in if stats else 0, rows_out=stats.rows_out if stats else 0,
        ))
    return sections


def funnel(run: Run) -> list[dict[str, Any]]:
    """One line per step (the source first): rows in and out, drops per reason, compute seconds.

    Example: funnel(load_run("out/q"))[0] -> {'id': 'source', 'rows_in': 24, 'rows_out': 24, ...}
    """
    return [{"id": s.stage_id, "stage": s.stage, "kind": s.kind, "rows_in": s.rows_in, "rows_out": s.rows_out,
             "dropped": dict(s.dropped), "seconds": s.compute_seconds} for s in run.stats.stages]


# Statistics of the published shards ----------------------------------------------------------


def _batches(files: list[str], columns: list[str]) -> Iterator[pa.RecordBatch]:
    for path in files:
        parquet = pq.ParquetFile(path)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        if present:
            yield from parquet.iter_batches(columns=present)


def numeric_columns(schema: pa.Schema) -> list[str]:
    """Top-level int/float columns (scores, margins, method values). Example: numeric_columns(schema) -> ['margin']"""
    return [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]


def column_statistics(files: list[str], schema: pa.Schema) -> list[dict[str, Any]]:
    """count, missing, min, quartiles, mean and max of every numeric column over all shards.

    Example: column_statistics(files, schema)[0] -> {'column': 'margin', 'count': 19, 'mean': 2.1, ...}
    """
    columns = numeric_columns(schema)
    values: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    missing = dict.fromkeys(columns, 0)
    for batch in _batches(files, columns):
        for name in batch.schema.names:
            array = batch.column(name)
            missing[name] += array.null_count
            data = pc.drop_null(array).to_numpy(zero_copy_only=False).astype(np.float64)
            missing[name] += int(np.isnan(data).sum())
            values[name].append(data[~np.isnan(data)])
    out = []
    for name in columns:
        data = np.concatenate(values[name]) if values[name] else np.array([])
        row: dict[str, Any] = {"column": name, "count": int(data.size), "missing": missing[name],
                               **dict.fromkeys(("min", "p25", "median", "mean", "p75", "max"))}
        if data.size:
            q = np.quantile(data, [0.0, 0.25, 0.5, 0.75, 1.0])
            row.update(min=q[0], p25=q[1], median=q[2], mean=float(data.mean()), p75=q[3], max=q[4])
        out.append(row)
    return out


def text_lengths(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Characters per row: a string, or the summed `content` of a list of {role, content} turns (null = 0).

    Example: text_lengths(pa.array(["ab", None])) -> array([2, 0])
    """
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):  # chunked or not: no copy
        return np.asarray(pc.fill_null(pc.utf8_length(array), 0), dtype=np.int64)
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()  # list parent indices count from each chunk's start
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        contents = pc.struct_field(pc.list_flatten(array), "content")
        lengths = pc.fill_null(pc.utf8_length(contents), 0).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=lengths, minlength=len(array)).astype(np.int64)
    raise TypeError(f"not a text or conversation column: {array.type}")


def length_counts(table: pa.Table) -> dict[str, int] | None:
    """The length-bias counts of one table of pairs (None without chosen/rejected): summed over parts.

    Every part task computes them on the rows it already holds (`curate.task`), so the card does
    not read the published shards again. Example: length_counts(pairs) -> {'chosen_longer': 12, ...}
    """
    if not {"chosen", "rejected"} <= set(table.column_names):
        return None
    chosen, rejected = text_lengths(table.column("chosen")), text_lengths(table.column("rejected"))
    return {"chosen_longer": int((chosen > rejected).sum()), "chosen_shorter": int((chosen < rejected).sum()),
            "equal": int((chosen == rejected).sum()), "chosen_chars": int(chosen.sum()),
            "rejected_chars": int(rejected.sum())}


def length_bias(files: list[str], counts: dict[str, int] | None = None) -> dict[str, Any] | None:
    """How often the chosen reply is longer than the rejected one (characters), over all pairs (`LengthBias`).

    A share far above one half means a model trained on these pairs can learn "longer is better";
    above 0.7 it is flagged (METHODS.md §8.2). `counts` (the run's summed `length_counts`) spares
    reading the shards again. Example: length_bias(files) -> {'pairs': 19, 'chosen_longer': 12, 'share_longer': 0.63, 'flagged': False, ...}
    """
    if counts is None:
        if not files or not {"chosen", "rejected"} <= set(pq.read_schema(files[0]).names):
            return None
        total: dict[str, int] = {}
        for batch in _batches(files, ["chosen", "rejected"]):
            for name, value in length_counts(pa.Table.from_batches([batch])).items():
                total[name] = total.get(name, 0) + value
        counts = total
    return asdict(LengthBias.from_counts(counts))  # type: ignore[arg-type]


def _cut(value: Any) -> Any:
    """Strings longer than SAMPLE_CHARS cut, recursively. Example: _cut("a" * 700)[-30:]"""
    if isinstance(value, str) and len(value) > SAMPLE_CHARS:
        return value[:SAMPLE_CHARS] + f" [... {len(value) - SAMPLE_CHARS} more characters]"
    if isinstance(value, list):
        return [_cut(v) for v in value]
    if isinstance(value, dict):
        return {k: _cut(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def sample_row(files: list[str]) -> str | None:
    """The first row of the first non-empty shard as indented JSON (long strings cut), or None.

    Example: sample_row(files) -> '{\\n  "id": "1ae3...", "prompt": [...]'
    """
    for path in files:
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows:
            row = next(parquet.iter_batches(batch_size=1)).to_pylist()[0]
            return json.dumps(_cut(row), indent=2, ensure_ascii=False, default=str)
    return None
