"""The plan: the resolved chain with every stage's key, input and output schema, cut into segments.

Built before any model loads (`curate plan`, `curate validate`). Segments are the units the
runner stores: the chain is cut *before* every global stage (its fit needs its whole input
materialised) and *after* every model or global stage (their output is what is expensive to
redo). Cheap map and filter stages fuse into the segment they sit in, so a chain of cheap stages
costs one read and one write (DESIGN.md §6, refined: cutting after a model stage keeps an edit to
a later filter from re-running the model). Leaves out: running anything (`curate.runner`).

Example: build_plan(pipeline, source).segments[0].key -> '4c0e…'
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from curate.config import BoundStage, Pipeline
from curate.contract import REASON
from curate.errors import ConfigError, SchemaError
from curate.keys import chain_key
from curate.redaction import redact


@dataclass
class SourceInfo:
    """What the plan needs of the ingested source: its key, schema, sizes and ingest drops.

    Example: SourceInfo(key="ab", schema=s, rows_in=10, rows=9, n_parts=1, dropped={"x": 1})
    """

    key: str
    schema: pa.Schema
    rows_in: int
    rows: int
    n_parts: int
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class PlannedStage:
    """A bound stage with its key and its input / output schemas (in the table's column names).

    Example: planned.key, planned.output_schema.names
    """

    bound: BoundStage
    key: str
    input_schema: pa.Schema
    output_schema: pa.Schema
    segment: int = 0

    @property
    def id(self) -> str:
        return self.bound.id

    @property
    def kind(self) -> str:
        return self.bound.stage.kind

    @property
    def reject_schema(self) -> pa.Schema:
        """Schema of this stage's rejected rows: its input plus `reason`."""
        return self.input_schema.append(pa.field(REASON, pa.string()))


@dataclass
class Segment:
    """Stages stored together: part i is computed from part i of `parent_key` (or the source).

    Example: segment.key, [s.id for s in segment.stages]
    """

    index: int
    stages: list[PlannedStage]
    key: str
    parent_key: str  # the source key for the first segment

    @property
    def global_stage(self) -> PlannedStage | None:
        return self.stages[0] if self.stages and self.stages[0].kind == "global" else None

    @property
    def schema(self) -> pa.Schema | None:
        return self.stages[-1].output_schema if self.stages else None


@dataclass
class Plan:
    """The whole resolved pipeline. Example: plan.stage("length").key"""

    pipeline: Pipeline
    source: SourceInfo
    stages: list[PlannedStage]
    segments: list[Segment]

    @property
    def output_schema(self) -> pa.Schema:
        return self.stages[-1].output_schema if self.stages else self.source.schema

    def stage(self, stage_id: str) -> PlannedStage:
        for planned in self.stages:
            if planned.id == stage_id:
                return planned
        raise KeyError(stage_id)

    def to_json(self) -> dict[str, Any]:
        """Plan as plain data for plan.json and `curate plan --json`."""
        return {
            "name": self.pipeline.spec.name,
            "pipeline": self.pipeline.path,
            "seed": self.pipeline.spec.seed,
            "overrides": [redact(item) for item in self.pipeline.overrides],  # a --set base_url=… keeps no credentials
            "source": {
                "spec": self.pipeline.spec.source.model_dump(mode="json", exclude_none=True),
                "key": self.source.key,
                "rows": self.source.rows,
                "parts": self.source.n_parts,
                "columns": schema_json(self.source.schema),
            },
            "stages": [
                {
                    "id": s.id,
                    "index": i,
                    "stage": s.bound.stage.name,
                    "kind": s.kind,
                    "version": s.bound.stage.version,
                    "key": s.key,
                    "segment": s.segment,
                    "params": s.bound.stage.params.model_dump(mode="json"),
                    **model_run_info(s.bound.stage),
                    "columns": schema_json(s.output_schema),
                }
                for i, s in enumerate(self.stages)
            ],
            "segments": [{"index": g.index, "key": g.key, "stages": [s.id for s in g.stages]} for g in self.segments],
        }


def model_run_info(stage: Any) -> dict[str, Any]:
    """What a model stage really runs with: `dtype` (`auto` resolved as its engine resolves it; a
    {model: dtype} map when its models differ) and, for stages with a `reference` (SPA, SCIR), the
    reference model or `none`. Other stages: {}.

    Example: model_run_info(spa_stage) -> {'dtype': 'float32', 'reference': 'none'}
    """
    if stage.kind != "model":
        return {}
    from curate.backends.params import REFERENCE_FREE, reference_model, run_dtype

    params = stage.params
    refs = stage.model_refs() if hasattr(stage, "model_refs") else [getattr(params, "model", None)]  # curate.model_stage
    models = [m for m in dict.fromkeys(refs) if isinstance(m, str) and reference_model(m) is not None]
    dtypes = {model: run_dtype(params, model) for model in models} or {"": run_dtype(params)}
    distinct = set(dtypes.values())
    info: dict[str, Any] = {"dtype": distinct.pop() if len(distinct) == 1 else dtypes}
    if "reference" in type(params).model_fields:
        info["reference"] = reference_model(params.reference) or REFERENCE_FREE
    return info


def schema_json(schema: pa.Schema) -> dict[str, str]:
    """Column name -> type string. Example: schema_json(pa.schema([("id", pa.string())])) -> {'id': 'string'}"""
    return {f.name: str(f.type) for f in schema}


def _renamed(schema: pa.Schema, mapping: dict[str, str], where: str) -> pa.Schema:
    """Rename schema columns (old -> new), refusing a rename onto a column that stays."""
    names = [mapping.get(n, n) for n in schema.names]
    if len(set(names)) != len(names):
        clash = sorted({n for n in names if names.count(n) > 1})
        raise SchemaError(f"renaming columns would give duplicate names {clash}", where=where)
    return pa.schema([f.with_name(n) for f, n in zip(schema, names)])


def rename_in(bound: BoundStage) -> dict[str, str]:
    """Table column -> stage column, from `inputs:`. Example: {'question': 'prompt'}"""
    return {table_col: stage_col for stage_col, table_col in bound.inputs.items()}


def rename_out(bound: BoundStage) -> dict[str, str]:
    """Stage column -> table column after the stage: `outputs:` first, else undo `inputs:`."""
    mapping = dict(bound.inputs)
    mapping.update(bound.outputs)
    return mapping


def plan_stage(bound: BoundStage, schema: pa.Schema, parent_key: str) -> PlannedStage:
    """Check one stage against its input schema; compute its key and output schema.

    Example: plan_stage(bound, source_schema, source_key).output_schema
    """
    where = bound.where or f"stage '{bound.id}'"
    missing = [c for c in bound.inputs.values() if c not in schema.names]
    if missing:
        raise SchemaError(f"inputs: names columns the table does not have: {missing}", where=where)
    stage_view = _renamed(schema, rename_in(bound), where)
    try:
        out = bound.stage.output_schema(stage_view)
    except SchemaError as exc:
        raise SchemaError(f"stage '{bound.id}' ({bound.stage.name}) {exc.message}", where=bound.where or exc.where) from None
    output_schema = _renamed(out, rename_out(bound), where)
    try:
        material = {"stage": bound.stage.key_material(), "inputs": bound.inputs, "outputs": bound.outputs}
    except ConfigError as exc:  # e.g. an unknown model reference: name the stage's YAML line too
        if bound.where and bound.where not in (exc.where or ""):
            exc.where = f"{bound.where}: {exc.where}" if exc.where else bound.where
        raise
    return PlannedStage(bound, chain_key(parent_key, material), schema, output_schema)


def build_plan(pipeline: Pipeline, source: SourceInfo) -> Plan:
    """Fold the stage chain over the source schema and cut it into segments.

    Example: [g.key for g in build_plan(p, s).segments]
    """
    stages: list[PlannedStage] = []
    schema, key = source.schema, source.key
    for bound in pipeline.stages:
        planned = plan_stage(bound, schema, key)
        stages.append(planned)
        schema, key = planned.output_schema, planned.key
    return Plan(pipeline, source, stages, cut_segments(stages, source.key))


def cut_segments(stages: list[PlannedStage], source_key: str) -> list[Segment]:
    """Group stages into segments (see the module docstring for where the cuts go).

    Example: [map, global, map, model, filter] -> [[map], [global], [map, model], [filter]]
    """
    groups: list[list[PlannedStage]] = [[]]
    for planned in stages:
        if planned.kind == "global" and groups[-1]:
            groups.append([])
        groups[-1].append(planned)
        if planned.kind in ("global", "model"):
            groups.append([])
    if not groups[-1] and len(groups) > 1:
        groups.pop()
    segments, parent = [], source_key
    for index, group in enumerate(groups):
        for planned in group:
            planned.segment = index
        key = group[-1].key if group else source_key
        segments.append(Segment(index, group, key, parent))
        parent = key
    return segments
