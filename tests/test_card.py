"""The dataset card every run writes (README.md): Hub front matter, how the pairs were made, statistics."""
from __future__ import annotations

import json
import shutil
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from curate import __version__
from curate.card import LOCAL_REF, render_card, size_category
from curate.card_sections import measured_ratios, stage_models, stage_templates, text_lengths
from curate.config import load_pipeline
from curate.judges.templates import load_template
from curate.record import load_run
from curate.runner import run_pipeline


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.fixture
def scored_run(scored: Path) -> Path:
    run_pipeline(load_pipeline(str(scored), ["license=apache-2.0"]))
    return scored.parent / "out"


def test_every_run_writes_a_card_whose_front_matter_parses_and_points_at_the_shards(scored_run):
    meta, _ = split_card((scored_run / "README.md").read_text())
    assert meta["license"] == "apache-2.0"  # from the pipeline (here through --set)
    assert meta["task_categories"] == ["text-generation"] and meta["size_categories"] == ["n<1K"]
    assert {"preference", "dpo"} <= set(meta["tags"]) and "synthetic" not in meta["tags"]  # no generator or judge
    [config] = meta["configs"]
    assert config["config_name"] == "default" and [f["split"] for f in config["data_files"]] == ["train"]
    pattern = config["data_files"][0]["path"]
    every_file = [str(p.relative_to(scored_run)) for p in scored_run.rglob("*") if p.is_file()]
    published = sorted(str(Path(p).relative_to(scored_run)) for p in load_run(str(scored_run)).data_files)
    assert len(published) == 3
    assert sorted(p for p in every_file if fnmatch(p, pattern)) == published  # not parts/, rejects/ or states/
    schema = pq.read_schema(scored_run / published[0])
    features = meta["dataset_info"]["features"]
    assert [f["name"] for f in features] == schema.names
    assert features[1] == {"name": "prompt", "list": [{"name": "role", "dtype": "string"}, {"name": "content", "dtype": "string"}]}
    assert {f["name"]: f.get("dtype") for f in features}["margin"] == "float64"
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_bytes": meta["dataset_info"]["dataset_size"],
                                               "num_examples": 19}]


def test_the_card_body_states_the_funnel_statistics_pipeline_and_a_row(scored_run, scored):
    run = load_run(str(scored_run))
    _, body = split_card((scored_run / "README.md").read_text())
    for stage in run.stats.stages:
        dropped = ", ".join(f"{k}: {v}" for k, v in stage.dropped.items()) or "none"
        assert f"| `{stage.stage_id}` | {stage.stage} | {stage.kind} | {stage.rows_in} | {stage.rows_out} | {dropped} |" in body
    assert "Thresholds and settings: `column`: `\"margin\"`, `min`: `1.0`." in body
    table = pq.read_table(scored_run / "data").to_pylist()
    longer = sum(sum(len(t["content"]) for t in r["chosen"]) > sum(len(t["content"]) for t in r["rejected"]) for r in table)
    assert f"longer than the rejected one in **{longer} of 19 pairs ({100 * longer / 19:.1f}%)**" in body
    margins = np.array([r["margin"] for r in table])
    assert (f"| `margin` | 19 | 0 | {margins.min():.4g} | {np.quantile(margins, 0.25):.4g} | {np.median(margins):.4g} | "
            f"{margins.mean():.4g} | {np.quantile(margins, 0.75):.4g} | {margins.max():.4g} |") in body
    assert scored.read_text().strip() in body  # the exact pipeline file
    assert "`--set license=apache-2.0`" in body
    first = pq.read_table(scored_run / "data" / "train-00000-of-00003.parquet").slice(0, 1).to_pylist()[0]
    assert json.dumps(first, indent=2, ensure_ascii=False) in body
    assert f'load_dataset("{LOCAL_REF}", split="train")' in body and "DPOTrainer(" in body
    assert f"Card written by curate {__version__}." in body
    assert "No judge stage" in body and "Not measured by this run" in body


def test_a_cached_rerun_writes_the_same_card(scored):
    run_pipeline(load_pipeline(str(scored)))
    card = (scored.parent / "out" / "README.md").read_bytes()
    run_pipeline(load_pipeline(str(scored)))
    assert (scored.parent / "out" / "README.md").read_bytes() == card


def test_a_run_that_drops_every_row_still_writes_its_card(scored):
    run_pipeline(load_pipeline(str(scored), ["stages.min_margin.params.min=100"]))
    meta, body = split_card((scored.parent / "out" / "README.md").read_text())
    assert meta["dataset_info"]["splits"][0]["num_examples"] == 0
    assert "| `margin` | 0 | 0 | – | – | – | – | – | – |" in body
    assert "Not measured: no pairs." in body and "The dataset has no rows." in body
    assert "| `min_margin` | filters.range | filter | 20 | 0 | margin_below_min: 20 |" in body


def test_load_dataset_on_a_copy_of_the_run_folder_takes_the_split_from_the_card(scored_run, tmp_path):
    import datasets

    copy = tmp_path / "copy"
    shutil.copytree(scored_run, copy)
    builder = datasets.load_dataset_builder(str(copy), cache_dir=str(tmp_path / "cache"))
    # the split sizes and features come from the card's dataset_info before any shard is read
    assert builder.info.splits["train"].num_examples == 19
    assert builder.config.name == "default"
    ds = datasets.load_dataset(str(copy), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 19
    assert ds["id"] == pq.read_table(scored_run / "data").column("id").to_pylist()
    assert ds.features["prompt"] == ds.features["chosen"] == ds.features["rejected"]
    # without the card the same folder gives no split sizes up front: the card is what supplied them
    (copy / "README.md").unlink()
    bare = datasets.load_dataset_builder(str(copy), cache_dir=str(tmp_path / "cache2"))
    assert not bare.info.splits


def test_a_run_with_a_judge_names_its_models_template_and_measured_agreement(scored, tiny_llama, tmp_path):
    """A real CDR judge (two tiny random Llamas, transformers) with a router: the card describes it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    weak = tmp_path / "weak"
    config = LlamaConfig.from_pretrained(tiny_llama)
    LlamaForCausalLM(config).save_pretrained(weak)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(tiny_llama) / name).exists():
            shutil.copy(Path(tiny_llama) / name, weak / name)
    judge = (f"  - stage: judges.cdr\n    id: cdr\n    params: {{strong: {tiny_llama}, weak: {weak}, router: {tiny_llama}, "
             f"backend: transformers, dtype: float32}}\n")
    text = scored.read_text().replace("  - stage: format.trl\n", judge + "  - stage: format.trl\n")
    scored.write_text(text)
    stats = run_pipeline(load_pipeline(str(scored)))
    counters = next(s for s in stats["stages"] if s["stage_id"] == "cdr")["counters"]
    decided = counters["agree_with_label"] + counters["disagree_with_label"]
    assert decided > 0
    meta, body = split_card((scored.parent / "out" / "README.md").read_text())
    assert "synthetic" in meta["tags"]
    router = load_template("cdr_router")
    assert f"**`cdr`** (`judges.cdr`): model(s) `{tiny_llama}`, `{weak}`\n\n```yaml\n" in body
    assert f"Template <code>cdr_router</code> (router_template), hash <code>{router.hash}</code>" in body
    assert router.text.strip() in body
    share = counters["agree_with_label"] / decided
    assert (f"| `cdr` | agreement with the input's chosen/rejected label | {counters['agree_with_label']} | {decided} | "
            f"{100 * share:.1f}% |") in body
    assert "| `cdr_margin` |" in body  # the judge's margins are among the statistics


def test_section_helpers_on_hand_made_values(tmp_path):
    assert stage_models({"strong": "a", "weak": "b", "router": None, "models": ["c", "a"]}) == ["c", "a", "b"]
    pairwise = stage_templates({"template": "pairwise", "router_template": "cdr_router", "router": None})
    assert [(t["name"], t["hash"]) for t in pairwise] == [("pairwise", load_template("pairwise").hash)]
    missing = tmp_path / "gone.txt"
    assert stage_templates({"template": str(missing)})[0]["text"].startswith("(template file not found")
    measured = measured_ratios({"swap_consistent": 4, "pairs_with_both_orders": 10, "judgments": 0, "parse_failures": 0})
    assert [(m["counter"], m["count"], m["of"], m["share"]) for m in measured] == [("swap_consistent", 4, 10, 0.4)]
    import pyarrow as pa

    from curate.contract import MESSAGES
    turns = pa.array([[{"role": "assistant", "content": "abc"}, {"role": "assistant", "content": None}], [], None], MESSAGES)
    assert text_lengths(turns).tolist() == [3, 0, 0]
    assert text_lengths(pa.array(["héllo", None])).tolist() == [5, 0]
    assert [size_category(n) for n in (0, 999, 1000, 2_500_000, 3 * 10**12)] == ["n<1K", "n<1K", "1K<n<10K", "1M<n<10M", "n>1T"]


def test_push_renders_the_same_card_with_the_repo_id(scored_run):
    run = load_run(str(scored_run))
    local = (scored_run / "README.md").read_text()
    assert render_card(run, repo_id="me/x") == local.replace(LOCAL_REF, "me/x")
