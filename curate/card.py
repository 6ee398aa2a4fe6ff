"""The dataset card (`out/<run>/README.md`): Hub metadata plus how every preference was made.

`write_card(out_dir)` runs at the end of every run; `curate push` renders the same card with the
repo id (and a config name, merged with the repo's other configs). The YAML front matter is
`huggingface_hub.DatasetCardData` with `configs` (data_files of the split) and `dataset_info`
(features from the shards' Arrow schema) written by `datasets`' own card helpers, the ones its
`push_to_hub` uses; the body is the Jinja2 template `curate/templates/dataset_card.md`, filled
with `curate.card_sections`. Leaves out: uploading (`curate.hub`).

Example: write_card("out/quickstart") -> 'out/quickstart/README.md'
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import pyarrow.parquet as pq
import yaml

from curate import __version__
from curate.card_sections import (column_statistics, funnel, length_bias, sample_row, stage_sections)
from curate.record import Run, load_run

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "templates", "dataset_card.md")
DEFAULT_CONFIG = "default"
SPLIT = "train"
LOCAL_REF = "path/to/this/folder"  # what the card's snippets load before the dataset has a repo id
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10**10, "1B<n<10B"), (10**11, "10B<n<100B"), (10**12, "100B<n<1T")]


def size_category(rows: int) -> str:
    """The Hub's size bucket for a row count. Example: size_category(19) -> 'n<1K'"""
    for limit, name in SIZE_CATEGORIES:
        if rows < limit:
            return name
    return "n>1T"


def data_pattern(data_dir: str) -> str:
    """The data_files glob of the split, relative to the repo root. Example: data_pattern("data") -> 'data/train-*'"""
    return f"{data_dir}/{SPLIT}-*"


def pipeline_value(run: Run, key: str) -> Any:
    """A top-level value of the run's pipeline (the copied YAML with the run's `--set` overrides applied).

    Example: pipeline_value(run, "license") -> 'mit'
    """
    from curate.config import apply_overrides

    text = run.pipeline_yaml
    data = yaml.safe_load(text) if text else None
    if not isinstance(data, dict):
        return None
    return apply_overrides(data, list(run.plan.overrides)).get(key)


def _dataset_info(run: Run):
    """datasets.DatasetInfo of the published shards: features, split size, bytes."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo

    files = run.data_files
    schema = pq.read_schema(files[0])
    rows = num_bytes = 0
    for path in files:
        meta = pq.ParquetFile(path).metadata
        rows += meta.num_rows
        num_bytes += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    splits = SplitDict()
    splits.add(SplitInfo(name=SPLIT, num_bytes=num_bytes, num_examples=rows))
    return DatasetInfo(features=Features.from_arrow_schema(schema), splits=splits,
                       download_size=sum(os.path.getsize(p) for p in files), dataset_size=num_bytes)


def card_data(run: Run, config_name: str = DEFAULT_CONFIG, data_dir: str = "data", existing: dict | None = None):
    """The front matter: license, task, tags, size, `configs` and `dataset_info` of this config.

    `existing` is a card's front matter to merge into (other configs kept, this one replaced).
    Example: card_data(load_run("out/q")).to_dict()["configs"] -> [{'config_name': 'default', 'data_files': [...]}]
    """
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    kinds = {s.stage.split(".", 1)[0] for s in run.plan.stages}
    tags = (["synthetic"] if kinds & {"generators", "judges"} else []) + ["preference", "dpo", "curate"]
    data = DatasetCardData(**(existing or {}))
    data.license = pipeline_value(run, "license") or "unknown"
    data.task_categories = ["text-generation"]
    data.tags = tags + [t for t in (data.get("tags") or []) if t not in tags]  # a repo's own tags are kept
    data.size_categories = [size_category(run.stats.rows_out)]
    if run.plan.name:
        data.pretty_name = run.plan.name
    DatasetInfosDict({config_name: _dataset_info(run)}).to_dataset_card_data(data)
    MetadataConfigs({config_name: {"data_files": [{"split": SPLIT, "path": data_pattern(data_dir)}]}}).to_dataset_card_data(data)
    return data


# Rendering -----------------------------------------------------------------------------------


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e5 else f"{value:.4g}"
    return str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _counts(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {_num(v)}" for k, v in mapping.items()) or "none"


def _inline(mapping: dict[str, Any]) -> str:
    parts = []
    for key, value in mapping.items():
        shown = json.dumps(value, ensure_ascii=False, default=str)
        parts.append(f"`{key}`: `{shown}`" if "`" not in shown else f"`{key}`: {_cell(shown)}")
    return ", ".join(parts) or "none"


def _codes(items: list[str]) -> str:
    return ", ".join(f"`{item}`" for item in items)


def _fenced(text: str, lang: str = "") -> str:
    """A fenced code block whose fence is longer than any run of backticks inside `text`."""
    longest, run_ = 0, 0
    for ch in text:
        run_ = run_ + 1 if ch == "`" else 0
        longest = max(longest, run_)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _yaml_block(params: dict[str, Any]) -> str:
    if not params:
        return "(no parameters)"
    return _fenced(yaml.safe_dump(params, sort_keys=False, allow_unicode=True, width=100), "yaml")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _environment():
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters.update(num=_num, pct=_pct, counts=_counts, inline=_inline, fenced=_fenced, yaml_block=_yaml_block,
                       cell=_cell, codes=_codes)
    return env


def _length(run: Run, files: list[str]) -> dict[str, Any] | None:
    """The run's typed length-bias check (stats.json), or counted from the shards for a run without it."""
    from dataclasses import asdict

    bias = run.stats.length_bias
    return asdict(bias) if bias is not None else length_bias(files)


def render_card(run: Run, repo_id: str | None = None, config_name: str = DEFAULT_CONFIG, data_dir: str = "data",
                existing: dict | None = None) -> str:
    """The whole README.md text of a finished run (see the module docstring).

    Example: render_card(load_run("out/q"), repo_id="me/q").startswith("---\\n") -> True
    """
    if not run.data_files:
        from curate.errors import ConfigError

        raise ConfigError("the run folder has no published shards (data/*.parquet)", where=run.out_dir)
    files = run.data_files
    schema = pq.read_schema(files[0])
    sections = stage_sections(run)
    groups = {"generators": [], "judges": [], "filters": []}
    for section in sections:
        family = section.stage.split(".", 1)[0]
        if family in ("generators", "judges"):
            groups[family].append(section)
        elif family in ("filters", "pairs") or section.kind in ("filter", "global"):
            groups["filters"].append(section)
    source = run.plan.source.get("spec", {})
    context = dict(
        card_data=card_data(run, config_name, data_dir, existing).to_yaml(),
        title=run.plan.name or "curate preference dataset",
        description=pipeline_value(run, "description"),
        rows_in=run.stats.rows_in, rows_out=run.stats.rows_out, n_shards=len(files),
        data_dir=data_dir, config_name=config_name, dataset_ref=repo_id or LOCAL_REF,
        version=run.stats.curate_version or __version__, pipeline_name=run.plan.name or os.path.basename(run.plan.pipeline),
        features=[{"name": f.name, "type": str(f.type)} for f in schema],
        source={k: v for k, v in source.items() if k != "part_rows"},
        generators=groups["generators"], judges=groups["judges"], filters=groups["filters"],
        funnel=funnel(run), statistics=column_statistics(files, schema), length=_length(run, files),
        measured=[dict(m, id=s.id) for s in sections for m in s.measured],
        pipeline_yaml=run.pipeline_yaml or "(pipeline.yaml missing from the run folder)",
        overrides=list(run.plan.overrides), stages=run.plan.stages, sample=sample_row(files),
    )
    with open(TEMPLATE_PATH, encoding="utf-8") as f:
        return _environment().from_string(f.read()).render(**context)


def write_card(out_dir: str) -> str:
    """Write `README.md` (the dataset card) into a finished run folder; return its path.

    Example: write_card("out/quickstart") -> 'out/quickstart/README.md'
    """
    from curate.store import write_text_atomic

    run = load_run(out_dir)
    if not pipeline_value(run, "license"):
        log.warning("the pipeline sets no 'license:'; the dataset card says 'unknown'")
    text = render_card(run)
    path = os.path.join(out_dir, CARD_FILE)
    write_text_atomic(text, path)
    log.info("dataset card written to %s", path)
    return path
