"""Pipeline YAML into validated specs, with errors that name the file and line.

YAML is read with safe-load semantics (no tags, no code); unknown keys are refused at every level;
unknown stage or parameter names get a did-you-mean (DESIGN.md §5). Source paths are relative to
the YAML file; the output folder is relative to the current directory. Leaves out: reading the
data and computing keys (`curate.plan`).

Example: load_pipeline("pipelines/quickstart.yaml").stages[0].stage -> 'filters.nonempty'
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from curate.contract import Stage
from curate.errors import ConfigError
from curate.registry import get_stage
from curate.sources import SampleSpec, SourceSpec

Path = tuple[Any, ...]
MAX_ID_CHARS = 64  # a stage id names folders (rejects/<id>/, states/<id>.parquet)


class StageSpec(BaseModel):
    """One entry of `stages:` in a pipeline file.

    Example: StageSpec(stage="filters.length", params={"max_chars": 4000})
    """

    model_config = ConfigDict(extra="forbid")
    stage: str = Field(description="registry name of the stage, e.g. filters.length")
    id: str | None = Field(None, description="unique id in this pipeline (default: the name's last part)")
    params: dict[str, Any] = Field(default_factory=dict, description="the stage's own parameters")
    inputs: dict[str, str] = Field(default_factory=dict, description="stage column -> table column read into it")
    outputs: dict[str, str] = Field(default_factory=dict, description="stage column -> name it is written as")


class ExecutorSpec(BaseModel):
    """Where a run's part tasks run (`executor:` in a pipeline file; the CLI options override it).

    Example: ExecutorSpec(kind="dask", workers=4)
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["local", "dask"] = Field("local", description="local: in this process; dask: on a Dask cluster")
    workers: int | None = Field(None, ge=1, description="dask: worker processes of a LocalCluster (default: CPU count)")
    scheduler: str | None = Field(None, description="dask: address of an existing scheduler, e.g. tcp://host:8786")
    overlap_parts: bool = Field(False, description="local: compute several parts at once when their model stages share "
                                "one vLLM engine, so small parts still fill its batch (outputs then depend on thread timing)")


class PipelineSpec(BaseModel):
    """A whole pipeline file.

    Example: PipelineSpec(source=SourceSpec(path="x.jsonl"), output="out/x")
    """

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="pipeline name, used in logs and the dataset card")
    description: str | None = None
    license: str | None = Field(None, description="licence of the published dataset (Hub id, e.g. mit, cc-by-4.0), for the dataset card")
    source: SourceSpec
    stages: list[StageSpec] = Field(default_factory=list)
    output: str | None = Field(None, description="output folder (relative to the current directory)")
    seed: int = Field(0, description="global seed; every random choice hashes it with the row id")
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec, description="where part tasks run (not part of any key)")


@dataclass
class BoundStage:
    """A stage instance with its pipeline id, column renames and YAML location.

    Example: bound.id, bound.stage.kind, bound.where -> ('length', 'filter', 'p.yaml:12')
    """

    id: str
    stage: Stage
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    where: str = ""


@dataclass
class Pipeline:
    """A validated pipeline: its spec, resolved stages and where it came from.

    Example: load_pipeline("p.yaml").stages[0].id
    """

    spec: PipelineSpec
    stages: list[BoundStage]
    path: str
    base_dir: str
    text: str = ""  # the YAML as written (copied into the run folder as pipeline.yaml)
    overrides: list[str] = field(default_factory=list)  # --set values applied on top of `text`


# YAML with line numbers ----------------------------------------------------------------------


def _line_map(node: yaml.Node, path: Path, lines: dict[Path, int], seen: set[int]) -> None:
    """Record the 1-based line of every mapping key and sequence item under `node`.

    A node reached again through an alias (`*name`) is not walked again: a recursive alias would
    never end and nested aliases would take exponential time; its keys keep the alias's line.
    """
    lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = path + (key_node.value,)
            lines[child] = key_node.start_mark.line + 1
            _line_map(value_node, child, lines, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _line_map(item, path + (i,), lines, seen)


def read_yaml(text: str, filename: str) -> tuple[Any, dict[Path, int]]:
    """Parse YAML safely; return the data and a map from key path to line number.

    Example: read_yaml("a: 1\\n", "p.yaml") -> ({'a': 1}, {(): 1, ('a',): 1})
    """
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:  # a control character: checked before any parsing
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(f"character #x{exc.character:04x} is not allowed in YAML", where=f"{filename}:{line}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError("the pipeline file is empty", where=filename)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{filename}:{mark.line + 1}" if mark else filename
        problem = exc.problem or "invalid YAML"
        if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in problem:
            problem = f"YAML tags are not allowed ({_tag_name(problem)})"
        raise ConfigError(problem, where=where) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", where=filename) from None
    except RecursionError:
        raise ConfigError("the YAML is nested too deeply", where=filename) from None
    finally:
        loader.dispose()
    try:
        _refuse_duplicate_keys(node, filename, set())
        lines: dict[Path, int] = {}
        _line_map(node, (), lines, set())
    except RecursionError:
        raise ConfigError("the YAML is nested too deeply", where=filename) from None
    return data, lines


def _tag_name(problem: str) -> str:
    """The tag a ConstructorError names, written as in the file (`!!python/...`, `!include`).

    Example: _tag_name("... for the tag 'tag:yaml.org,2002:python/name:os.system'") -> '!!python/name:os.system'
    """
    tag = problem.split(" the tag ", 1)[-1].strip().strip("'")
    return tag.replace("tag:yaml.org,2002:", "!!", 1)


def _refuse_duplicate_keys(node: yaml.Node, filename: str, seen: set[int]) -> None:
    """Raise ConfigError at the second of two equal keys in one mapping (YAML would keep the last silently).

    Example: "a: 1\\na: 2\\n" -> ConfigError "p.yaml:2: key 'a' is given twice (first on line 1)"
    """
    if id(node) in seen:  # an alias of a node already checked (see _line_map)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in first_line:
                    raise ConfigError(f"key '{key_node.value}' is given twice (first on line {first_line[key_node.value]})",
                                      where=f"{filename}:{line}")
                first_line[key_node.value] = line
            _refuse_duplicate_keys(value_node, filename, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, filename, seen)


def _locate(lines: dict[Path, int | str], filename: str, loc: Path) -> str:
    """file:line of the longest known prefix of a key path (or the `--set` item that wrote it)."""
    for end in range(len(loc), -1, -1):
        if tuple(loc[:end]) in lines:
            line = lines[tuple(loc[:end])]
            return line if isinstance(line, str) else f"{filename}:{line}"
    return filename


def _blame_overrides(lines: dict[Path, int | str], overrides: list[str]) -> None:
    """Point the key paths an override wrote at that `--set` item instead of the YAML's lines.

    Example: overrides ["source.lmit=5"] -> lines[("source", "lmit")] == "--set source.lmit=5"
    """
    for item in overrides:
        path = tuple(int(p) if p.isdigit() else p for p in item.split("=", 1)[0].split("."))
        for known in [k for k in lines if k[: len(path)] == path]:
            del lines[known]
        lines[path] = f"--set {item}"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _known_fields(model: type[BaseModel], loc: Path) -> list[str]:
    """Field names valid at a key path of the pipeline model (for did-you-mean)."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part) if current else None
        current = _model_in(info.annotation) if info else None
        if current is None:
            return []
    return list(current.model_fields) if current else []


def _validation_error(exc: ValidationError, model: type[BaseModel], lines, filename, prefix: Path = ()) -> ConfigError:
    """The first pydantic error as a ConfigError with file:line and a did-you-mean.

    An unknown key comes first: a misspelt `sorce` also makes `source` missing, and the
    misspelling is the error worth naming.
    """
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = prefix + tuple(err["loc"])
    where = _locate(lines, filename, loc)
    dotted = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        known = _known_fields(model, tuple(err["loc"]))
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        return ConfigError(f"unknown key '{dotted}'", where=where, hint=close[0] if close else None)
    if err["type"] == "missing":
        return ConfigError(f"missing required key '{dotted}'", where=where)
    return ConfigError(f"'{dotted}': {err['msg']}", where=where)


# Overrides -----------------------------------------------------------------------------------


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `dotted.key=value` overrides (value parsed as YAML) to the raw pipeline data.

    A list item is named by its index or, for stages, by its `id` (`stages.judge.params.samples=2`).
    Example: apply_overrides({"source": {"path": "a"}}, ["source.path=b"]) -> {'source': {'path': 'b'}}
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value", where="--set")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        target: Any = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            key: Any = int(part) if isinstance(target, list) and part.isdigit() else part
            if isinstance(target, list) and isinstance(key, str):
                key = _item_by_id(target, key, dotted)
            if isinstance(target, dict):
                target = target.setdefault(key, {})
            elif isinstance(target, list) and isinstance(key, int) and key < len(target):
                target = target[key]
            else:
                raise ConfigError(f"cannot set '{dotted}': '{part}' is not a mapping or list index", where="--set")
        last: Any = int(parts[-1]) if isinstance(target, list) and parts[-1].isdigit() else parts[-1]
        if not (isinstance(target, dict) or isinstance(target, list) and isinstance(last, int) and last < len(target)):
            parent = ".".join(parts[:-1])
            raise ConfigError(f"cannot set '{dotted}': '{parent}' is neither a mapping nor a list that long", where="--set")
        target[last] = value
    return data


def _item_by_id(items: list, name: str, dotted: str) -> int:
    """Index of the list item whose `id` is `name` (a stage id in `--set stages.<id>....`)."""
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("id") == name:
            return index
    ids = [item.get("id") for item in items if isinstance(item, dict) and item.get("id")]
    raise ConfigError(f"cannot set '{dotted}': no item with id '{name}' (ids: {', '.join(ids) or 'none'})", where="--set")


# Stages --------------------------------------------------------------------------------------


def _bind_stage(spec: StageSpec, index: int, seed: int, lines, filename: str, taken: set[str]) -> BoundStage:
    """Find the stage class, validate its params and give it a unique id."""
    loc = ("stages", index)
    cls = get_stage(spec.stage, where=_locate(lines, filename, loc + ("stage",)))
    try:
        params = cls.Params(**spec.params)
    except ValidationError as exc:
        err = exc.errors()[0]
        ploc = loc + ("params",) + tuple(err["loc"])
        where = _locate(lines, filename, ploc)
        name = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), list(cls.Params.model_fields), n=1, cutoff=0.6)
            raise ConfigError(
                f"stage '{spec.stage}' has no parameter '{name}' (it has: {', '.join(cls.Params.model_fields) or 'none'})",
                where=where,
                hint=close[0] if close else None,
            ) from None
        if err["type"] == "missing":
            raise ConfigError(f"stage '{spec.stage}' needs parameter '{name}'", where=where) from None
        what = f"parameter '{name}'" if name else "params"  # a check across parameters has no name
        raise ConfigError(f"stage '{spec.stage}' {what}: {err['msg']}", where=where) from None
    stage_id = spec.id or spec.stage.rsplit(".", 1)[-1]
    if spec.id is None:
        suffix = 2
        while stage_id in taken:
            stage_id = f"{spec.stage.rsplit('.', 1)[-1]}_{suffix}"
            suffix += 1
    elif stage_id in taken:
        raise ConfigError(f"stage id '{stage_id}' is used twice", where=_locate(lines, filename, loc + ("id",)))
    if stage_id == "source" or not stage_id.replace("_", "").replace("-", "").isalnum() or len(stage_id) > MAX_ID_CHARS:
        shown = repr(stage_id)[1:-1] if len(stage_id) <= MAX_ID_CHARS else f"{stage_id[:20]}…"
        raise ConfigError(f"stage id '{shown}' must be at most {MAX_ID_CHARS} letters, digits, '_' or '-' "
                          "(and not 'source'): it names folders of the run", where=_locate(lines, filename, loc + ("id",)))
    taken.add(stage_id)
    return BoundStage(
        id=stage_id,
        stage=cls(params, seed=seed, stage_id=stage_id),
        inputs=dict(spec.inputs),
        outputs=dict(spec.outputs),
        where=_locate(lines, filename, loc),
    )


def parse_pipeline(text: str, filename: str, overrides: list[str] | None = None) -> Pipeline:
    """Validate pipeline YAML text into a Pipeline (no data read, no model loaded).

    Example: parse_pipeline("source: {path: x.jsonl}\\n", "p.yaml").stages -> []
    """
    data, lines = read_yaml(text, filename)
    if not isinstance(data, dict):
        raise ConfigError(f"the pipeline must be a mapping, found {type(data).__name__}", where=f"{filename}:1")
    data = apply_overrides(data, overrides or [])
    _blame_overrides(lines, overrides or [])
    try:
        spec = PipelineSpec(**data)
    except ValidationError as exc:
        raise _validation_error(exc, PipelineSpec, lines, filename) from None
    taken: set[str] = set()
    stages = [_bind_stage(s, i, spec.seed, lines, filename, taken) for i, s in enumerate(spec.stages)]
    return Pipeline(spec=spec, stages=stages, path=filename, base_dir=os.path.dirname(os.path.abspath(filename)),
                    text=text, overrides=list(overrides or []))


def load_pipeline(path: str, overrides: list[str] | None = None) -> Pipeline:
    """Read and validate a pipeline file.

    Example: load_pipeline("pipelines/quickstart.yaml").spec.output -> 'out/quickstart'
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError("no such pipeline file", where=path) from None
    except IsADirectoryError:
        raise ConfigError("is a folder, expected a pipeline .yaml file", where=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError("pipeline file is not valid UTF-8", where=f"{path}:{line}") from None
    return parse_pipeline(text, path, overrides)


__all__ = ["BoundStage", "Pipeline", "PipelineSpec", "SampleSpec", "SourceSpec", "StageSpec", "load_pipeline", "parse_pipeline"]
