"""filters.rps (METHODS.md §6C): neighbour directions really lie in the cap, consensus by hand, keep mask and reasons."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from curate.errors import SchemaError
from curate.filters.rps import (RPSFilter, RPSParams, best_consensus, neighbour_directions, pair_consensus, rps_consensus,
                                rps_filter, unit)

RATINGS = pa.struct([("helpfulness", pa.list_(pa.float64())), ("honesty", pa.list_(pa.float64()))])


def _angles(directions: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(directions @ v, -1, 1)))


@pytest.mark.parametrize("d", [2, 3, 5])
def test_neighbours_are_unit_vectors_within_the_angle_and_fill_the_cap(d):
    v = unit(np.arange(1, d + 1))
    nb = neighbour_directions(v, k=4000, angle=20, seed=1)
    assert nb.shape == (4000, d)
    assert np.allclose(np.linalg.norm(nb, axis=1), 1.0)
    angles = _angles(nb, v)
    assert angles.max() <= 20 + 1e-9
    assert angles.max() > 19.5  # they reach the rim, not only near v
    # uniform on the cap: P(angle <= a) = ∫_0^a sin^(d-2) / ∫_0^θ sin^(d-2); check the median by numeric integration
    grid = np.linspace(0, math.radians(20), 20001)
    cdf = np.cumsum(np.sin(grid) ** (d - 2))
    median = math.degrees(grid[np.searchsorted(cdf / cdf[-1], 0.5)])
    assert np.median(angles) == pytest.approx(median, abs=0.6)
    # the neighbours spread around v, not to one side: their mean points along v
    assert unit(nb.mean(axis=0)) @ v > 0.999


def test_neighbours_are_seeded_and_one_aspect_has_only_v():
    assert np.array_equal(neighbour_directions([1, 2], 5, 10, seed=3), neighbour_directions([1, 2], 5, 10, seed=3))
    assert not np.array_equal(neighbour_directions([1, 2], 5, 10, seed=3), neighbour_directions([1, 2], 5, 10, seed=4))
    assert np.array_equal(neighbour_directions([2.0], 3, 10), np.ones((3, 1)))
    with pytest.raises(ValueError):
        unit([0, 0])


def test_pair_consensus_by_hand_in_two_dimensions():
    """v at 45°; the pair's rating difference (1, −0.8) is at −38.7°, 83.7° from v: a neighbour w agrees iff
    ⟨diff, w⟩ > 0, i.e. w lies within 90° of diff: every neighbour up to 6.3° past v towards the other side."""
    v = unit([1, 1])
    at = [math.radians(a) for a in (40, 44, 50, 51, 52, 60)]  # hand-placed neighbours
    nb = np.array([[math.cos(a), math.sin(a)] for a in at])
    score_c, score_r, share = pair_consensus([5, 1.2], [4, 2], v, nb)
    assert score_c == pytest.approx(6.2 / math.sqrt(2)) and score_r == pytest.approx(6 / math.sqrt(2))
    # agree iff angle(w) < 45 + 6.34 = 51.34°: 40, 44, 50, 51 agree; 52, 60 do not
    assert share == pytest.approx(4 / 6)
    assert pair_consensus([3, 3], [3, 3], v, nb)[2] is None  # a tie under v has no winner


def test_best_candidate_consensus():
    v = unit([1, 1])
    nb = neighbour_directions(v, 200, 20, seed=0)
    scores, share = best_consensus(np.array([[5.0, 5.0], [1.0, 1.0]]), v, nb)
    assert share == 1.0 and scores[0] > scores[1]  # far ahead on both aspects: robust
    _, share = best_consensus(np.array([[5.0, 1.1], [1.0, 5.0]]), v, nb)
    assert 0.0 < share < 0.6  # barely ahead along v, behind on honesty: fragile


def _pairs(rows: list[dict], chosen: list[int], rejected: list[int]) -> pa.Table:
    n = len(rows)
    return pa.table({"id": pa.array([f"p{i}" for i in range(n)], pa.string()), "uf_ratings": pa.array(rows, RATINGS),
                     "chosen_index": pa.array(chosen, pa.int32()), "rejected_index": pa.array(rejected, pa.int32())})


def test_filter_keeps_only_robust_winners_with_reasons():
    rows = [{"helpfulness": [5.0, 1.0], "honesty": [5.0, 1.0]},   # robust
            {"helpfulness": [5.0, 1.0], "honesty": [1.0, 4.9]},   # winner under v, but 0.7° past v reverses it
            {"helpfulness": [3.0, 3.0], "honesty": [3.0, 3.0]},   # tie
            {"helpfulness": [1.0, 5.0], "honesty": [1.0, 5.0]},   # v prefers the rejected
            {"helpfulness": [4.0, None], "honesty": [4.0, 2.0]}]  # unrated
    table = _pairs(rows, [0] * 5, [1] * 5)
    stage = RPSFilter(RPSParams(k=64, angle=20, min_consensus=0.8), stage_id="rps")
    assert {"rps_consensus", "rps_score_chosen"} <= set(stage.output_schema(table.schema).names)
    verdict = stage.keep(table)
    assert verdict.keep.to_pylist() == [True, False, False, False, False]
    assert verdict.reason.to_pylist() == [None, "rps_no_consensus", "rps_tie", "rps_reversed", "rps_unrated"]
    consensus = verdict.table.column("rps_consensus").to_pylist()
    # the difference (4, −3.9) is 89.3° from v: the neighbours beyond 45.7° reverse it, about half of the cap
    assert consensus[0] == 1.0 and 0.35 < consensus[1] < 0.7
    assert rps_filter(table, k=64, angle=20, min_consensus=0.8).column("id").to_pylist() == ["p0"]  # same neighbours
    assert rps_filter(table, k=64, angle=20, min_consensus=0.0).column("id").to_pylist() == ["p0", "p1"]


def test_direction_weights_change_the_winner():
    table = _pairs([{"helpfulness": [5.0, 2.0], "honesty": [1.0, 3.0]}], [0], [1])
    assert rps_filter(table, direction={"helpfulness": 1.0, "honesty": 0.1}).num_rows == 1
    assert rps_filter(table, direction={"helpfulness": 0.1, "honesty": 1.0}).num_rows == 0
    assert rps_filter(table, direction={"honesty": 1.0}).num_rows == 0  # one aspect: the neighbours are v itself


def test_candidate_rows_get_scores_and_consensus():
    table = pa.table({"id": ["r"], "uf_ratings": pa.array([{"helpfulness": [5.0, 2.0, 1.0], "honesty": [5.0, 3.0, None]}], RATINGS)})
    out = rps_consensus(table)
    scores = out.column("rps_scores")[0].as_py()
    assert scores[0] == pytest.approx(10 / math.sqrt(2)) and scores[2] is None
    assert out.column("rps_consensus")[0].as_py() is None  # a candidate lacks a rating: no verdict for the row


def test_schema_errors_name_the_problem():
    with pytest.raises(SchemaError, match="lacks"):
        RPSFilter(RPSParams(direction={"accuracy": 1.0})).output_schema(_pairs([], [], []).schema)
    with pytest.raises(SchemaError, match="chosen_index"):
        RPSFilter(RPSParams()).output_schema(pa.schema([("id", pa.string()), ("uf_ratings", RATINGS)]))


def test_polars_frame_round_trip():
    import polars as pl

    table = _pairs([{"helpfulness": [5.0, 1.0], "honesty": [5.0, 1.0]}], [0], [1])
    out = rps_filter(pl.from_arrow(table))
    assert isinstance(out, pl.DataFrame) and out["rps_consensus"].to_list() == [1.0]
