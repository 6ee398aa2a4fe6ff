"""Row filters, exact dedup, and source ingest (formats, ids, HH dialogues)."""
from __future__ import annotations

import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.contract import MESSAGES
from curate.errors import InputError
from curate.filters.dedup import DedupParams, ExactDedup, first_ids
from curate.filters.text import LengthFilter, LengthParams, NonEmptyFilter, NonEmptyParams, RangeFilter, RangeParams
from curate.sources import SampleSpec, SourceSpec, ingest, parse_hh_pair


def _pairs(prompts, chosen, rejected):
    return pa.table({
        "id": [f"r{i}" for i in range(len(prompts))],
        "prompt": pa.array([[{"role": "user", "content": p}] for p in prompts], MESSAGES),
        "chosen": chosen, "rejected": rejected,
    })


def test_nonempty_gives_the_first_failing_column_as_reason():
    t = _pairs(["q", "  ", "q"], ["a", "a", " \n"], ["b", "", "b"])
    v = NonEmptyFilter(NonEmptyParams(columns=["prompt", "chosen", "rejected"])).keep(t)
    assert v.keep.to_pylist() == [True, False, False]
    assert v.reason.to_pylist() == [None, "empty_prompt", "empty_chosen"]


def test_length_counts_characters_of_each_column():
    t = _pairs(["q", "q", "q"], ["abcd", "ab", "a"], ["ab", "ab", "é"])
    v = LengthFilter(LengthParams(columns=["chosen", "rejected"], min_chars=1, max_chars=3)).keep(t)
    assert v.reason.to_pylist() == ["chosen_too_long", None, None]
    with pytest.raises(ValueError, match="min_chars, max_chars"):
        LengthParams(columns=["chosen"])


def test_range_treats_null_and_nan_as_missing():
    t = pa.table({"margin": [2.0, 0.5, None, float("nan"), 9.0]})
    v = RangeFilter(RangeParams(column="margin", min=1.0, max=5.0)).keep(t)
    assert v.reason.to_pylist() == [None, "margin_below_min", "margin_missing", "margin_missing", "margin_above_max"]


def test_dedup_keeps_the_smallest_id_whatever_the_sharding():
    t = _pairs(["Hello  World", "hello world", "other", "HELLO WORLD"], ["a"] * 4, ["b"] * 4)
    t = t.set_column(0, "id", pa.array(["z", "b", "c", "a"]))
    stage = ExactDedup(DedupParams(level="prompt"))
    whole = stage.fit([stage.summarize(t)])  # two passes: a summary per part, combined on the driver
    sharded = stage.fit(stage.summarize(p) for p in [t.slice(0, 1), t.slice(1, 2), t.slice(3)])
    assert sorted(whole.column("id").to_pylist()) == sorted(sharded.column("id").to_pylist()) == ["a", "c"]
    v = stage.apply(t, whole)
    assert v.reason.to_pylist() == ["duplicate_prompt", "duplicate_prompt", None, None]


def test_dedup_pair_level_and_exact_mode():
    t = _pairs(["q", "q", "Q"], ["a", "a", "a"], ["b", "c", "b"])
    assert sorted(first_ids([t], "pair").column("id").to_pylist()) == ["r0", "r1"]
    assert sorted(first_ids([t], "pair", normalize=False).column("id").to_pylist()) == ["r0", "r1", "r2"]


def test_hh_pair_parsing():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: sure, here"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: no"
    turns, good, bad = parse_hh_pair(chosen, rejected)
    assert turns == [("user", "hi"), ("assistant", "hello"), ("user", "help me")]
    assert (good, bad) == ("sure, here", "no")
    assert parse_hh_pair(chosen, "\n\nHuman: other\n\nAssistant: no") == "hh_prompt_mismatch"
    assert parse_hh_pair("no markers", rejected) == "hh_malformed_dialogue"
    assert parse_hh_pair("\n\nHuman: hi", "\n\nHuman: hi") == "hh_no_final_assistant_reply"


def test_hh_file_ingest(hh_file):
    got = ingest(SourceSpec(path=str(hh_file), parse="hh"), ".")
    assert got.table.num_rows + got.rejected.num_rows == 2312
    assert got.rejected.column("reason").to_pylist().count("hh_prompt_mismatch") == 5
    first = got.table.slice(0, 1).to_pylist()[0]
    assert first["prompt"][0]["role"] == "user" and first["prompt"][-1]["role"] == "user"
    assert got.table.column("id").null_count == 0 and len(set(got.table.column("id").to_pylist())) == 2312 - 5


def test_jsonl_gz_parquet_folder_and_saved_dataset_agree(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(5)]
    with gzip.open(tmp_path / "x.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), tmp_path / "pq" / "b.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    a = ingest(SourceSpec(path="x.jsonl.gz"), str(tmp_path)).table
    b = ingest(SourceSpec(path="pq"), str(tmp_path)).table
    c = ingest(SourceSpec(path="pq/*.parquet"), str(tmp_path)).table
    d = ingest(SourceSpec(path="saved"), str(tmp_path)).table
    assert a.equals(b) and b.equals(c) and c.equals(d)
    assert a.schema.names == ["id", "prompt", "chosen", "rejected"]
    assert a.column("prompt").type == MESSAGES


def test_ids_hash_the_row_and_repeat_with_a_suffix(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "a"}\n')
    ids = ingest(SourceSpec(path="x.jsonl"), str(tmp_path)).table.column("id").to_pylist()
    assert ids[2] == ids[0] + "-2" and ids[0] != ids[1]
    again = ingest(SourceSpec(path="x.jsonl"), str(tmp_path)).table.column("id").to_pylist()
    assert again == ids


def test_limit_and_seeded_sample(tmp_path):
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"id": i, "prompt": f"q{i}"}) + "\n" for i in range(100)))
    assert ingest(SourceSpec(path="x.jsonl", limit=3), str(tmp_path)).table.column("id").to_pylist() == ["0", "1", "2"]
    s1 = ingest(SourceSpec(path="x.jsonl", sample=SampleSpec(n=10, seed=1)), str(tmp_path)).table.column("id")
    s2 = ingest(SourceSpec(path="x.jsonl", sample=SampleSpec(n=10, seed=1)), str(tmp_path)).table.column("id")
    s3 = ingest(SourceSpec(path="x.jsonl", sample=SampleSpec(n=10, seed=2)), str(tmp_path)).table.column("id")
    assert s1.equals(s2) and not s1.equals(s3) and len(s1) == 10


def test_null_prompt_names_file_and_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"prompt": "a"}\n{"prompt": null}\n')
    with pytest.raises(InputError) as exc:
        ingest(SourceSpec(path="x.jsonl"), str(tmp_path))
    assert exc.value.where.endswith("x.jsonl:2") and "'prompt' is null" in str(exc.value)


def test_messages_prompts_and_trl_replies_are_accepted(tmp_path):
    row = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
           "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go"}]}
    (tmp_path / "x.jsonl").write_text(json.dumps(row) + "\n")
    t = ingest(SourceSpec(path="x.jsonl"), str(tmp_path)).table
    assert t.column("chosen").to_pylist() == ["hello"] and len(t.column("prompt")[0]) == 2
