"""The CLI is a thin layer: every subcommand's --help, --version, validate, plan, stages, run."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import curate
from curate.cli import main


@pytest.mark.parametrize("command", [[], ["run"], ["plan"], ["validate"], ["stages"]])
def test_help_of_every_subcommand(command):
    result = CliRunner().invoke(main, command + ["--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and curate.__version__ in result.output


def test_stages_lists_builtins():
    result = CliRunner().invoke(main, ["stages"])
    for name in ("filters.length", "filters.nonempty", "filters.dedup_exact", "pairs.from_scores", "format.trl"):
        assert name in result.output


def test_validate_and_plan_do_not_write_the_run_folder(scored):
    runner = CliRunner()
    result = runner.invoke(main, ["validate", str(scored)])
    assert result.exit_code == 0 and "ok (8 stages)" in result.output
    result = runner.invoke(main, ["plan", str(scored), "--json"])
    assert result.exit_code == 0
    plan = json.loads(result.stdout)
    assert [s["id"] for s in plan["stages"]] == ["nonempty", "length", "dedup_prompts", "pairs", "reply_length",
                                                 "dedup_pairs", "min_margin", "trl"]
    assert [g["stages"] for g in plan["segments"]] == [
        ["nonempty", "length"], ["dedup_prompts"], ["pairs", "reply_length"], ["dedup_pairs"], ["min_margin", "trl"]]
    assert plan["stages"][-1]["columns"]["chosen"] == "list<item: struct<role: string, content: string>>"
    assert not (scored.parent / "out").exists()
    text = runner.invoke(main, ["plan", str(scored)]).output
    assert plan["stages"][0]["key"] in text and "margin: double" in text


def test_run_then_plan_keys_match(scored):
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "run", str(scored)])
    assert result.exit_code == 0, result.output
    assert "19 rows written" in result.output
    stored = json.loads((scored.parent / "out" / "plan.json").read_text())
    planned = json.loads(runner.invoke(main, ["plan", str(scored), "--json"]).stdout)
    assert [s["key"] for s in stored["stages"]] == [s["key"] for s in planned["stages"]]


def test_set_names_a_stage_by_its_id_or_index():
    from curate.config import apply_overrides
    from curate.errors import ConfigError

    data = {"stages": [{"stage": "generators.responses", "id": "pool", "params": {}}, {"stage": "format.trl"}]}
    out = apply_overrides(data, ["stages.pool.params.n=3", "stages.1.params.x=y"])
    assert out["stages"][0]["params"] == {"n": 3} and out["stages"][1]["params"] == {"x": "y"}
    with pytest.raises(ConfigError, match="no item with id 'judge' \\(ids: pool\\)"):
        apply_overrides(data, ["stages.judge.params.samples=2"])
