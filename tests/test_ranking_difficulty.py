"""Ranking accuracy and difficulty (METHODS.md §8.6): the hand cases, frames, and the stage with scripted log-probs."""
from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pytest
from pydantic import ValidationError

from curate.contract import MESSAGES

from curate.filters.ranking_difficulty import (RankingDifficulty, RankingDifficultyParams, difficulty_of,
                                               flip_loss_threshold, ideal_log_margin, ideal_ratio)
from curate.testing import ScriptedBackend, use_scripted
from tests.test_cdr_scir import _pairs


def test_flip_loss_threshold_hand_case():
    """§8.6: c=1, β=0.1 -> −log σ(0.1) = 0.6444."""
    assert flip_loss_threshold(1.0, 0.1) == pytest.approx(0.6444, abs=5e-5)
    assert flip_loss_threshold([0.0], 0.1)[0] == pytest.approx(math.log(2))


def test_idealized_ranking_hand_cases():
    """§8.6: reference ratio e^−1, α=0.75: β=0.5 -> 3.31 (correct), β=1 -> 1.10 (correct); α=0.6, β=1 -> 0.55 (incorrect)."""
    assert ideal_ratio(-1.0, 0.75, 0.5) == pytest.approx(3.31, abs=5e-3)
    assert ideal_ratio(-1.0, 0.75, 1.0) == pytest.approx(1.10, abs=5e-3)
    assert ideal_ratio(-1.0, 0.6, 1.0) == pytest.approx(0.55, abs=5e-3)
    assert ideal_log_margin(-1.0, 0.75, 1.0) > 0 > ideal_log_margin(-1.0, 0.6, 1.0)
    assert ideal_log_margin(0.0, 1.0, 1.0) == pytest.approx(math.log(0.999 / 0.001))  # α = 1 -> 1 − ε
    with pytest.raises(ValueError, match="alpha"):
        ideal_log_margin(0.0, 0.0, 1.0)


def test_difficulty_of_columns_on_pandas():
    frame = pd.DataFrame({"lp_w": [-3.0, -2.0, None], "lp_l": [-2.0, -4.0, -1.0]})
    out = difficulty_of(frame, "lp_w", "lp_l", beta=1.0, alpha=0.75)
    assert isinstance(out, pd.DataFrame)
    assert out["ref_logratio"].tolist()[:2] == [-1.0, 2.0] and out["difficulty_c"].tolist()[:2] == [1.0, -2.0]
    assert out["ref_rank_correct"].tolist()[:2] == [False, True]
    assert out["ideal_correct"].tolist()[:2] == [True, True]  # 3/e = 1.10 > 1 on row 0
    assert out["flip_loss_threshold"][0] == pytest.approx(math.log1p(math.exp(-1.0)))
    assert pd.isna(out["difficulty_c"][2]) and out["ref_rank_correct"][2] is None


def _scripted(beta: float = 1.0, **params) -> tuple[RankingDifficulty, pa.Table]:
    """p0: LP_ref -3 vs -2 (misranked, c=1). p1: -2 (1 token) vs -3 (3 tokens): right by sums, wrong per token.
    p2: -1 vs -6 (c=-5). p3: a null rejected reply (a row error)."""
    ref = ScriptedBackend(logprobs={("q0", "w0"): [-3.0], ("q0", "l0"): [-2.0], ("q1", "w1"): [-2.0], ("q1", "l1"): [-1.0, -1.0, -1.0],
                      ("q2", "w2"): [-1.0], ("q2", "l2"): [-6.0]})
    stage = RankingDifficulty(RankingDifficultyParams(reference="ref", beta=beta, backend="transformers", **params))
    table = _pairs([("q0", "w0", "l0"), ("q1", "w1", "l1"), ("q2", "w2", "l2"), ("q3", "w3", "l3")])
    table = table.set_column(3, "rejected", pa.array(["l0", "l1", "l2", None]))
    return use_scripted(stage, {"ref": ref}), table


def test_stage_marks_every_pair_and_keeps_row_errors_as_data():
    stage, table = _scripted(beta=1.0, alpha=0.6)
    out = stage.apply(table)
    assert out.table.schema.names == stage.output_schema(table.schema).names
    rows = out.table.to_pylist()
    assert [r["difficulty_c"] for r in rows] == [1.0, -1.0, -5.0, None]
    assert [r["ref_rank_correct"] for r in rows] == [False, True, True, None]
    assert [r["ref_rank_correct_norm"] for r in rows] == [False, False, True, None]  # p1: -2 vs -1 per token
    assert rows[0]["ideal_ratio"] == pytest.approx(1.5 / math.e) and rows[0]["ideal_correct"] is False
    assert rows[0]["flip_loss_threshold"] == pytest.approx(math.log1p(math.exp(-1.0)))
    assert rows[3]["ranking_difficulty_error"] == "null rejected" and rows[0]["rd_ref_model"] == "ref"
    assert out.counters["ref_misranked"] == 1 and out.counters["ideal_incorrect"] == 1 and out.counters["row_errors"] == 1


def test_stage_drops_pairs_misranked_beyond_the_threshold():
    stage, table = _scripted(beta=1.0, action="drop", max_difficulty=0.5)
    out = stage.apply(table)
    assert [r["id"] for r in out.table.to_pylist()] == ["p1", "p2", "p3"]  # the unscored row is kept
    assert out.rejected.column("reason").to_pylist() == ["ref_misranked"] and out.rejected.column("id").to_pylist() == ["p0"]
    stage, table = _scripted(beta=1.0, alpha=0.6, action="drop", drop_ideal_incorrect=True)
    assert stage.apply(table).rejected.column("reason").to_pylist() == ["ideal_incorrect"]


def test_params_need_a_reference_and_a_drop_rule():
    with pytest.raises(ValidationError, match="none"):
        RankingDifficultyParams(reference="none")
    with pytest.raises(ValidationError, match="max_difficulty"):
        RankingDifficultyParams(reference="r", action="drop")


def test_format_trl_keeps_the_difficulty_and_rso_columns():
    from curate.formatting import TrlFormat
    from curate.generators.rso import RSOPairs, RSOParams
    from tests.test_rso import _candidates

    stage, table = _scripted()
    names = TrlFormat().output_schema(stage.output_schema(table.schema)).names
    assert {"ref_logratio", "difficulty_c", "flip_loss_threshold", "ideal_correct", "ref_rank_correct",
            "ref_lp_chosen", "rd_ref_model"} <= set(names)
    candidates = _candidates([[1.0, 2.0]])
    candidates = candidates.append_column("prompt", pa.array([[{"role": "user", "content": "q"}]], MESSAGES))
    rso = RSOPairs(RSOParams(scores="cdr_rewards")).output_schema(candidates.schema)
    assert {"rso_accepted", "rso_round", "rso_scores", "cdr_rewards"} <= set(TrlFormat().output_schema(rso).names)
