"""The length-bias check (METHODS.md §8.2): flag above 0.7, the typed record in stats.json, the card, and rebalancing."""
from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.filters.length_bias import (LengthBalance, LengthBalanceParams, fit_rebalance, length_bias_check, length_buckets,
                                        length_columns, length_rebalance, rebalance_summary)
from curate.record import LengthBias, RunStats


def _pairs(lengths: list[tuple[int, int]]) -> pa.Table:
    return pa.table({"id": [f"p{i}" for i in range(len(lengths))], "chosen": ["c" * c for c, _ in lengths],
                     "rejected": ["r" * r for _, r in lengths]})


def test_share_and_flag_by_hand():
    bias = length_bias_check(_pairs([(10, 5)] * 7 + [(5, 10)] * 2 + [(4, 4)]))
    assert (bias.pairs, bias.chosen_longer, bias.chosen_shorter, bias.equal) == (10, 7, 2, 1)
    assert bias.share_longer == 0.7 and not bias.flagged  # flagged only *above* 0.7 (§8.2)
    assert length_bias_check(_pairs([(10, 5)] * 8 + [(5, 10)] * 2)).flagged
    assert length_bias_check(pa.table({"id": ["a"]})) is None
    assert LengthBias.from_counts({"chosen_longer": 3, "chosen_shorter": 1, "equal": 0}, threshold=0.8).flagged is False


def test_length_columns_log_len_chosen_rejected_and_ratio():
    out = length_columns(_pairs([(10, 5), (3, 0)]))
    assert out.column("len_chosen").to_pylist() == [10, 3]
    assert out.column("len_rejected").to_pylist() == [5, 0]
    assert out.column("len_ratio").to_pylist() == [2.0, None]


def test_buckets_by_ratio():
    bucket, side = length_buckets([30, 10, 10, 0, 11], [10, 10, 21, 5, 10])
    assert bucket.tolist() == [4, 0, 3, 4, 1]  # ratios 3, 1, 2.1, inf, 1.1 against edges 1.1, 1.5, 2, 3 (a bucket holds its lower edge)
    assert side.tolist() == [1, 0, -1, -1, 1]


def _biased(n: int, seed: int) -> pa.Table:
    """Pairs where the chosen reply is longer ~80% of the time, over several ratio buckets."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(n):
        short, long_ = rng.randint(20, 200), 0
        long_ = int(short * rng.choice([1.05, 1.3, 1.8, 2.5, 4.0])) + 1
        lengths.append((long_, short) if rng.random() < 0.8 else (short, long_))
    lengths += [(50, 50)] * 5
    return _pairs(lengths)


def test_rebalancing_brings_the_share_to_one_half_in_every_bucket():
    table = _biased(600, seed=0)
    before = length_bias_check(table)
    assert before.share_longer > 0.75 and before.flagged
    kept = length_rebalance(table)
    after = length_bias_check(kept)
    assert after.chosen_longer == after.chosen_shorter and after.equal == 5  # equal-length pairs all stay
    assert after.share_longer == pytest.approx(0.5, abs=0.01)
    bucket, side = length_buckets(kept.column("len_chosen").to_numpy(), kept.column("len_rejected").to_numpy())
    for b in set(bucket.tolist()):
        assert (side[bucket == b] == 1).sum() == (side[bucket == b] == -1).sum()
    # only the larger side's pairs were dropped, and as many as the imbalance
    assert set(kept.column("id").to_pylist()) <= set(table.column("id").to_pylist())
    assert before.chosen_shorter == after.chosen_shorter


def test_the_stage_does_not_depend_on_the_sharding():
    table = _biased(300, seed=1)
    stage = LengthBalance(LengthBalanceParams(), stage_id="lb", seed=3)
    whole = fit_rebalance([stage.summarize(table)])
    parts = fit_rebalance([stage.summarize(table.slice(0, 100)), stage.summarize(table.slice(100))])
    assert whole.equals(parts)
    kept_whole = [i for i, k in zip(table.column("id").to_pylist(), stage.apply(table, whole).keep.to_pylist()) if k]
    kept_parts = []
    for part in (table.slice(0, 100), table.slice(100)):
        kept_parts += [i for i, k in zip(part.column("id").to_pylist(), stage.apply(part, parts).keep.to_pylist()) if k]
    assert kept_whole == kept_parts
    summary = rebalance_summary(whole)
    assert summary["share_before"] > 0.75 and summary["share_after"] == pytest.approx(0.5, abs=0.02)  # 5 equal pairs count too
    reasons = set(stage.apply(table, whole).reason.to_pylist())
    assert reasons == {None, "length_rebalanced"}


def test_old_stats_json_without_the_typed_check_still_reads():
    raw = {"pipeline": "p", "rows_in": 3, "rows_out": 3, "parts": 1, "dropped": {}, "run_seconds": 0.1, "stages": [],
           "output": {"length": {"chosen_longer": 3, "chosen_shorter": 0, "equal": 0, "chosen_chars": 30, "rejected_chars": 9}}}
    stats = RunStats.from_json(raw)
    assert stats.length_bias.share_longer == 1.0 and stats.length_bias.flagged and stats.length_bias.chosen_mean_chars == 10
    again = RunStats.from_json(json.loads(json.dumps(stats.to_json())))
    assert again.length_bias == stats.length_bias
    assert RunStats.from_json({k: v for k, v in raw.items() if k != "output"}).length_bias is None


def test_a_run_records_the_check_in_stats_json_and_the_card_flags_it(tmp_path):
    from curate import load_pipeline, run_pipeline
    from curate.record import load_run

    rows = [{"prompt": f"q{i}", "chosen": "a long detailed answer " * 3, "rejected": "short"} for i in range(8)]
    rows += [{"prompt": f"s{i}", "chosen": "ok", "rejected": "a much longer reply here"} for i in range(2)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "p.yaml").write_text("name: lb\nsource: {path: pairs.jsonl}\nlicense: mit\nstages:\n"
                                     "  - stage: filters.nonempty\n    params: {columns: [chosen]}\n")
    out = tmp_path / "out"
    run_pipeline(load_pipeline(str(tmp_path / "p.yaml")), out=str(out))
    raw = json.loads((out / "stats.json").read_text())
    assert raw["length_bias"]["share_longer"] == 0.8 and raw["length_bias"]["flagged"] is True
    assert load_run(str(out)).stats.length_bias.chosen_longer == 8
    card = (out / "README.md").read_text()
    assert "**8 of 10 pairs (80.0%)**" in card and "**Flagged** (METHODS §8.2)" in card
    from curate.report import write_report

    html = open(write_report(str(out)), encoding="utf-8").read()
    assert "longer in 8 of 10 pairs (80%): flagged, above 70% (METHODS §8.2)" in html
    # the opt-in rebalancing stage: 2 vs 2 left, its fit in stats.json
    (tmp_path / "p.yaml").write_text("name: lb\nsource: {path: pairs.jsonl}\nlicense: mit\nstages:\n"
                                     "  - stage: filters.length_balance\n")
    run_pipeline(load_pipeline(str(tmp_path / "p.yaml")), out=str(out))
    run = load_run(str(out))
    assert run.stats.length_bias.share_longer == 0.5 and not run.stats.length_bias.flagged
    assert run.stats.stage("length_balance").dropped == {"length_rebalanced": 6}
    assert run.stats.stage("length_balance").fit["share_before"] == 0.8
    assert pq.read_table(out / "data").num_rows == 4
    assert "Not flagged" in (out / "README.md").read_text()
