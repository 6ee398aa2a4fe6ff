"""judges.pairwise: METHODS.md §8.1 hand-checkable cases, and an end-to-end run on SmolLM2 through vLLM."""
from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from curate.judges.pairwise import combine_orders, constrained_regex, parse_pair_scores, verdict_entropy


def test_swap_averaging_gives_a_tie_in_the_methods_case():
    """Order 1 gives (8, 6); the swapped order gives A=5, B=7 -> means 6.5 / 6.5 -> tie."""
    out = combine_orders([(8.0, 6.0)], [(7.0, 5.0)])  # swapped order shows b first: (b, a) = (7, 5)
    assert out["score_a"] == 6.5 and out["score_b"] == 6.5 and out["verdict"] == "tie"
    assert out["swap_consistent"] is False


def test_bpde_of_three_wins_and_three_losses_is_ln2():
    assert math.isclose(verdict_entropy(["win"] * 3 + ["lose"] * 3), math.log(2), rel_tol=1e-12)
    assert verdict_entropy(["win"] * 6) == 0


def test_parse_takes_the_last_two_score_lines_and_refuses_out_of_range():
    text = "Score of the Assistant 1: 2\nreasons\nScore of the Assistant 1: 8\nScore of the Assistant 2: 6"
    assert parse_pair_scores(text) == (8.0, 6.0)
    assert parse_pair_scores("Score of the Assistant 1: 8") is None
    assert parse_pair_scores("Score of the Assistant 1: 11\nScore of the Assistant 2: 3") is None
    assert parse_pair_scores(None) is None


def test_consistent_orders_and_missing_orders():
    out = combine_orders([(9.0, 3.0), (8.0, 4.0)], [(2.0, 9.0)])
    assert out["verdict"] == "win" and out["swap_consistent"] is True
    assert combine_orders([], [])["verdict"] is None
    assert combine_orders([(5.0, 4.0)], [])["swap_consistent"] is None


def test_constrained_regex_accepts_the_format():
    import re

    pattern = re.compile(constrained_regex(200))
    assert pattern.fullmatch("A is better.\nScore of the Assistant 1: 10\nScore of the Assistant 2: 3")
    assert not pattern.fullmatch("A is better.\nScore of the Assistant 1: 0\nScore of the Assistant 2: 3")


@pytest.mark.slow
def test_pairwise_judge_end_to_end_on_hh_pairs(hh_file, tmp_path):
    pytest.importorskip("vllm")
    from curate.config import parse_pipeline
    from curate.runner import run_pipeline

    text = f"""
source: {{path: {hh_file}, parse: hh, limit: 4, part_rows: 2}}
stages:
  - stage: judges.pairwise
    id: fair
    params: {{model: smollm2-135m-instruct, dtype: float32, max_model_len: 2048, samples: 2,
              generation: {{max_tokens: 120, temperature: 1.0}}}}
"""
    stats = run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / "out"))
    fair = stats["stages"][1]["counters"]
    assert fair["judgments"] == stats["rows_out"] * 4 and fair["parse_failures"] == 0
    assert fair["verdict_win"] + fair["verdict_tie"] + fair["verdict_lose"] + fair["row_errors"] == stats["rows_out"]
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    for row in rows:
        assert len(row["fe_texts_ab"]) == 2 and len(row["fe_texts_ba"]) == 2
        both = row["fe_scores_ab"] + row["fe_scores_ba"]
        assert row["fe_score_a"] == pytest.approx(sum(s[0] for s in both) / len(both))
        assert row["fe_verdict"] in {"win", "tie", "lose"}
    json.dumps(stats)
