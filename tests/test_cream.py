"""CREAM (METHODS.md §1C): the hand cases, the weight columns on every frame type, and the stages with scripted scores."""
from __future__ import annotations

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from pydantic import ValidationError

from curate.adapters import to_arrow
from curate.contract import MESSAGES, RESPONSES
from curate.filters.noise import cdpo_loss, dpo_loss
from curate.judges.cream import consistency_weights, cream_consistency, rank_consistency
from curate.judges.cream_stages import CREAMAvg, CREAMAvgParams, CREAMJudge, CREAMParams
from curate.testing import ScriptedBackend, use_scripted


def test_cream_hand_cases_kendall():
    """§1C (f): [3,2,1] vs [1,2,3] -> C=0; [3,2,1] vs [3,1,2] -> τ=1/3 -> C=2/3; identical -> C=1."""
    assert rank_consistency([3, 2, 1], [1, 2, 3]) == pytest.approx(0.0)
    assert rank_consistency([3, 2, 1], [3, 1, 2]) == pytest.approx(2 / 3)
    assert rank_consistency([3, 2, 1], [3, 2, 1]) == pytest.approx(1.0)
    assert rank_consistency([0.3, -1.0, 7.0], [5.0, 1.0, 9.0]) == pytest.approx(1.0)  # only the order counts


def test_spearman_and_toporder_options():
    # ranks [3,2,1] vs [3,1,2]: Σd² = 0 + 1 + 1 = 2, ρ = 1 − 6·2/(3·8) = 0.5 -> C = 0.75
    assert rank_consistency([3, 2, 1], [3, 1, 2], "spearman") == pytest.approx(0.75)
    assert rank_consistency([3, 2, 1], [1, 2, 3], "spearman") == pytest.approx(0.0)
    assert rank_consistency([3, 2, 1], [3, 1, 2], "toporder") == 0.0  # top agrees, bottom does not
    assert rank_consistency([4, 2, 3, 1], [4, 3, 2, 1], "toporder") == 1.0  # top and bottom agree, middle differs
    with pytest.raises(ValueError, match="toporder"):
        rank_consistency([1, 2], [1, 2], "pearson")


def test_ties_are_ranked_by_position_and_missing_candidates_left_out():
    # ordinal ranks: [1, 1, 0] -> [2, 3, 1]; against [2, 3, 1] itself -> C = 1
    assert rank_consistency([1, 1, 0], [0.5, 0.7, 0.1]) == pytest.approx(1.0)
    assert rank_consistency([3, None, 2, 1], [3, 0.0, 1, 2]) == pytest.approx(2 / 3)  # candidate 1 left out
    assert rank_consistency([3, float("nan")], [1, 2]) is None
    assert rank_consistency([1, 2], [1, 2, 3]) is None


def test_consistency_avg_gives_every_row_the_mean():
    assert consistency_weights([1.0, 0.5, None], "consistency_dyn") == ([1.0, 0.5, None], 0.75)
    assert consistency_weights([1.0, 0.5, None], "consistency_avg") == ([0.75, 0.75, 0.75], 0.75)


def test_label_smoothing_column_is_the_cream_loss_rate():
    """C·ℓ(βh) + (1−C)·ℓ(−βh) is cDPO with ε = 1 − C, the `label_smoothing` column."""
    t = pa.table({"cream_reward_cur": [[3.0, 2.0, 1.0]], "cream_reward_prev": [[3.0, 1.0, 2.0]]})
    row = cream_consistency(t).to_pylist()[0]
    c, eps = row["cream_weight"], row["label_smoothing"]
    assert c == pytest.approx(2 / 3) and eps == pytest.approx(1 / 3)
    bh = 0.7
    assert cdpo_loss(bh, eps) == pytest.approx(c * dpo_loss(bh) + (1 - c) * dpo_loss(-bh))


def test_cream_consistency_on_every_frame_type():
    import datasets

    t = pa.table({"cream_reward_cur": [[3.0, 2.0, 1.0], [1.0, 2.0]], "cream_reward_prev": [[1.0, 2.0, 3.0], [1.0, 2.0]]})
    expected = cream_consistency(t, mode="consistency_avg").column("cream_weight").to_pylist()
    assert expected == pytest.approx([0.5, 0.5])
    for frame, kind in ((pl.from_arrow(t), pl.DataFrame), (t.to_pandas(), pd.DataFrame), (datasets.Dataset(t), datasets.Dataset)):
        out = cream_consistency(frame, mode="consistency_avg")
        assert isinstance(out, kind)
        assert to_arrow(out)[0].column("cream_weight").to_pylist() == pytest.approx(expected)


# Stages ---------------------------------------------------------------------------------------------

def _candidates(rows: list[tuple[str, list[str]]]) -> pa.Table:
    return pa.table({
        "id": [f"q{i}" for i in range(len(rows))],
        "prompt": pa.array([[{"role": "user", "content": q}] for q, _ in rows], MESSAGES),
        "responses": pa.array([[{"text": t, "model": "m", "finish_reason": "stop", "n_tokens": 1} for t in texts]
                               for _, texts in rows], RESPONSES),
    })


def _scorers() -> dict[str, ScriptedBackend]:
    """q0: current rewards [3, 2, 1]; previous LPn [-1, -3, -2] (its sums [-2, -3, -4] would rank like current).
    q1: current rewards all equal -> a tie. q2: candidate 1 is null; x, z rank alike under both models."""
    current = ScriptedBackend(logprobs={("q0", "a"): [-1.0], ("q0", "b"): [-2.0], ("q0", "c"): [-3.0], ("q2", "z"): [-2.0]},
                         default=[-1.0])
    reference = ScriptedBackend(logprobs={}, default=[-4.0])
    previous = ScriptedBackend(logprobs={("q0", "a"): [-1.0, -1.0], ("q0", "b"): [-3.0], ("q0", "c"): [-4.0, 0.0],
                           ("q2", "x"): [-1.0], ("q2", "y"): [-2.0], ("q2", "z"): [-3.0]}, default=[-1.0])
    for name, scorer in (("cur", current), ("ref", reference), ("prev", previous)):
        scorer.name = name
    return {"cur": current, "ref": reference, "prev": previous}


def test_cream_stage_scores_weights_and_pairs_by_the_current_reward():
    table = _candidates([("q0", ["a", "b", "c"]), ("q1", ["s", "t"]), ("q2", ["x", "y", "z"])])
    table = table.set_column(2, "responses", pa.array(
        [r if i != 2 else [{**r[0]}, {**r[1], "text": None}, {**r[2]}] for i, r in enumerate(table.column("responses").to_pylist())],
        RESPONSES))
    stage = use_scripted(CREAMJudge(CREAMParams(policy="cur", reference="ref", previous="prev", backend="transformers")),
                         _scorers())
    schema = stage.output_schema(table.schema)
    out = stage.apply(table)
    assert out.table.schema.names == schema.names
    rows = {r["prompt_id"]: r for r in out.table.to_pylist()}
    assert set(rows) == {"q0", "q2"}
    q0 = rows["q0"]
    assert q0["cream_reward_cur"] == pytest.approx([3.0, 2.0, 1.0])
    assert q0["cream_reward_prev"] == pytest.approx([-1.0, -3.0, -2.0])  # length-normalised, no reference
    assert q0["cream_consistency"] == pytest.approx(2 / 3)
    assert q0["cream_weight"] == pytest.approx(2 / 3) and q0["label_smoothing"] == pytest.approx(1 / 3)
    assert (q0["chosen"], q0["rejected"], q0["chosen_index"], q0["rejected_index"]) == ("a", "c", 0, 2)
    assert q0["margin"] == pytest.approx(2.0)
    assert (q0["cream_model"], q0["cream_ref_model"], q0["cream_prev_model"]) == ("cur", "ref", "prev")
    q2 = rows["q2"]  # the null candidate has no reward and is named in the row error
    assert q2["cream_reward_cur"][1] is None and "candidates [1]" in q2["cream_error"]
    assert q2["cream_reward_cur"] == [3.0, None, 2.0] and q2["cream_reward_prev"] == [-1.0, None, -3.0]
    assert q2["cream_consistency"] == pytest.approx(1.0) and (q2["chosen_index"], q2["rejected_index"]) == (0, 2)
    assert out.rejected.column("reason").to_pylist() == ["tie"] and out.rejected.column("id").to_pylist() == ["q1"]
    assert out.rejected.column_names == table.column_names + ["reason"]
    assert out.counters["pairs"] == 2 and out.counters["consistency_rows"] == 3


def test_cream_refuses_a_missing_reference():
    with pytest.raises(ValidationError, match="none"):
        CREAMParams(policy="p", reference="none", previous="q")
    with pytest.raises(ValidationError, match="previous"):
        CREAMParams(policy="p", reference="r")


def test_cream_avg_sets_the_dataset_mean_over_every_part():
    stage = CREAMAvg(CREAMAvgParams())
    parts = [pa.table({"cream_consistency": [1.0, None]}), pa.table({"cream_consistency": [0.5, 0.0]})]
    state = stage.fit(parts)
    assert stage.fit_summary(state) == {"mean_consistency": pytest.approx(0.5), "n": 3}
    out = stage.apply(parts[0].append_column("cream_weight", pa.array([1.0, None])), state).table
    assert out.column("cream_weight").to_pylist() == [0.5, 0.5] and out.column("label_smoothing").to_pylist() == [0.5, 0.5]
