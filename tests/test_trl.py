"""TRL reads curate's output as it is: DPOTrainer trains one step on it, and `curate validate --trl` checks the form."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from curate.cli import main
from curate.config import load_pipeline
from curate.contract import MESSAGES
from curate.runner import run_pipeline
from curate.trl_check import check_trl

USER = [{"role": "user", "content": "Name a prime number."}]
GOOD = [{"role": "assistant", "content": "Seven."}]
BAD = [{"role": "assistant", "content": "Nine."}]


@pytest.fixture
def scored_run(scored: Path) -> Path:
    """pipelines/scored.yaml run into tmp_path/out (19 pairs in 3 shards)."""
    run_pipeline(load_pipeline(str(scored)))
    return scored.parent / "out"


def _write(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = schema or pa.schema([("id", pa.string()), ("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _row(i: int, **changes) -> dict:
    return {"id": f"r{i}", "prompt": USER, "chosen": GOOD, "rejected": BAD, **changes}


# DPOTrainer on the run folder, through the dataset card -----------------------------------------


def test_dpo_trainer_trains_one_step_on_a_run_folder_as_it_is(scored_run, tiny_llama, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    # the run folder itself, read through its dataset card: no conversion code between curate and TRL
    dataset = datasets.load_dataset(str(scored_run), split="train", cache_dir=str(tmp_path / "cache"))
    assert dataset.num_rows == 19
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    before = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=4, use_cpu=True,
                     report_to=[], save_strategy="no", logging_steps=1, max_length=256, learning_rate=1e-3)
    trainer = DPOTrainer(model=tiny_llama, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()

    assert result.global_step == 1
    # step 1: policy == reference, so every implicit reward is 0 and the DPO loss is exactly ln 2
    assert result.training_loss == pytest.approx(math.log(2), abs=1e-4)
    logged = trainer.state.log_history[0]
    assert logged["grad_norm"] > 0 and math.isfinite(logged["grad_norm"])
    after = trainer.model.state_dict()
    changed = [name for name, value in before.items() if not torch.equal(value, after[name].detach().cpu())]
    assert changed, "the optimizer step changed no weight"
    # TRL read the conversational columns: the chat template wraps the user turn, the reply is the assistant turn
    first = dataset[0]
    tokenized = trainer.train_dataset[0]
    prompt_text = tokenizer.decode(tokenized["prompt_ids"])
    assert "<|im_start|>user\n" + first["prompt"][-1]["content"] in prompt_text
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokenized["chosen_ids"]).startswith(first["chosen"][0]["content"])
    assert tokenizer.decode(tokenized["rejected_ids"]).startswith(first["rejected"][0]["content"])


# curate validate --trl ----------------------------------------------------------------------------


def test_validate_trl_passes_on_a_run_and_names_the_row_of_a_broken_copy(scored_run, tmp_path):
    ok = CliRunner().invoke(main, ["validate", "--trl", str(scored_run)])
    assert ok.exit_code == 0, ok.output
    assert "ok: 19 rows in 3 shard(s)" in ok.output

    broken = tmp_path / "broken"
    shutil.copytree(scored_run, broken)
    shard = broken / "data" / "train-00001-of-00003.parquet"
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[2]["chosen"] = [{"role": "assistant", "content": "   "}]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    bad = CliRunner().invoke(main, ["validate", "--trl", str(broken)])
    assert bad.exit_code == 1
    assert "1 of 19 rows break it" in bad.output
    assert (f"data/train-00001-of-00003.parquet row 2 (id {rows[2]['id']}): chosen turn 0 (assistant) has empty content"
            in bad.output)


@pytest.mark.parametrize("change, message", [
    ({"prompt": USER + GOOD}, "prompt ends with a 'assistant' turn"),
    ({"prompt": [{"role": "narrator", "content": "x"}] + USER}, "prompt turn 0 has role 'narrator'"),
    ({"chosen": USER}, "chosen turn 0 has role 'user', expected 'assistant'"),
    ({"rejected": []}, "rejected has no turns"),
    ({"rejected": None}, "rejected is null"),
    ({"chosen": [{"role": "assistant", "content": None}]}, "chosen turn 0 (assistant) has empty content"),
    ({"prompt": [{"role": "system", "content": ""}] + USER}, "prompt turn 0 (system) has empty content"),
])
def test_each_break_of_the_form_is_named_with_its_row(tmp_path, change, message):
    rows = [_row(i) for i in range(5)]
    rows[3] = _row(3, **change)
    _write(tmp_path / "train-00000-of-00001.parquet", rows)
    report = check_trl(str(tmp_path))
    assert not report.ok and report.bad_rows == 1
    assert str(report.problems[0]).startswith("train-00000-of-00001.parquet row 3 (id r3): " + message)


def test_good_rows_with_system_and_earlier_turns_pass(tmp_path):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}] + USER
    _write(tmp_path / "a.parquet", [_row(0, prompt=history), _row(1)])
    report = check_trl(str(tmp_path / "a.parquet"))
    assert report.ok and report.rows == 2, report.summary()


def test_row_numbers_count_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr("curate.trl_check.BATCH_ROWS", 4)
    rows = [_row(i) for i in range(10)]
    rows[9] = _row(9, chosen=[{"role": "assistant", "content": ""}])
    _write(tmp_path / "s.parquet", rows)
    report = check_trl(str(tmp_path))
    assert [(p.row, p.id) for p in report.problems] == [(9, "r9")]


def test_only_the_first_problems_are_listed_but_all_are_counted(tmp_path):
    _write(tmp_path / "s.parquet", [_row(i, rejected=None) for i in range(30)])
    report = check_trl(str(tmp_path), max_problems=5)
    assert report.bad_rows == 30 and len(report.problems) == 5
    assert report.summary().endswith("... and 25 more rows")


def test_a_shard_with_another_schema_or_plain_strings_is_named(tmp_path):
    _write(tmp_path / "train-00000-of-00002.parquet", [_row(0)])
    extra = pa.schema([("id", pa.string()), ("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES),
                       ("margin", pa.float64())])
    _write(tmp_path / "train-00001-of-00002.parquet", [dict(_row(1), margin=1.0)], extra)
    report = check_trl(str(tmp_path))
    assert [str(p) for p in report.problems] == [
        "train-00001-of-00002.parquet: schema differs from train-00000-of-00002.parquet in column(s) margin"]

    plain = pa.schema([("prompt", MESSAGES), ("chosen", pa.string()), ("rejected", pa.string())])
    _write(tmp_path / "plain" / "p.parquet", [{"prompt": USER, "chosen": "a", "rejected": "b"}], plain)
    messages = [p.message for p in check_trl(str(tmp_path / "plain")).problems]
    assert messages == ["column 'chosen' is string, expected list<struct<role: string, content: string>> (format.trl writes it)",
                        "column 'rejected' is string, expected list<struct<role: string, content: string>> (format.trl writes it)"]


def test_validate_trl_on_a_folder_without_shards_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["validate", "--trl", str(tmp_path)])
    assert result.exit_code != 0
    assert "no Parquet shards found" in result.output


def test_bad_rows_mask_agrees_with_describe_on_random_rows():
    """The vectorized pre-filter and the per-row description flag exactly the same rows."""
    from curate.trl_check import bad_rows, describe

    rng = np.random.default_rng(0)
    roles = ["user", "assistant", "system", "tool", "narrator", None]
    contents = ["ok", "", "  ", None, "fine"]

    def turns():
        if rng.random() < 0.1:
            return None
        return [None if rng.random() < 0.05 else {"role": roles[rng.integers(len(roles))], "content": contents[rng.integers(len(contents))]}
                for _ in range(rng.integers(0, 4))]

    for column in ("prompt", "chosen"):
        values = [turns() for _ in range(400)]
        mask = bad_rows(column, pa.array(values, MESSAGES))
        assert mask.tolist() == [describe(column, v) is not None for v in values]


def test_format_trl_keeps_every_stage_error_column_whatever_the_stage_id():
    """A model stage with id `judge` writes `judge_error`; it must reach the published pairs, not vanish."""
    from curate.formatting import TrlFormat

    table = pa.table({"id": ["r1", "r2"], "prompt": pa.array([USER, USER], MESSAGES), "chosen": ["Seven.", "Five."],
                      "rejected": ["Nine.", "Four."], "judge_error": [None, "unparseable verdict"],
                      "candidates": [["a", "b"], ["c", "d"]]})
    out = TrlFormat().apply(table).table
    assert out.column("judge_error").to_pylist() == [None, "unparseable verdict"]
    assert "candidates" not in out.column_names  # other source columns are still dropped
