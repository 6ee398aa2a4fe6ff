"""RSO rejection sampling (METHODS.md §8.4): the hand case, empirical rates, row seeding and the `pairs.rso` stage."""
from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from curate.contract import RESPONSES
from curate.generators.rso import RSOPairs, RSOParams, acceptance_probabilities, rso_accept, rso_sample

HAND = [1.0, 1.0 - math.log(2), 1.0 - math.log(4)]


def test_first_round_acceptance_probabilities_hand_case():
    """§8.4: β=1, rewards [1, 1−ln2, 1−ln4] -> [1, 0.5, 0.25]."""
    assert acceptance_probabilities(HAND, beta=1.0) == pytest.approx([1.0, 0.5, 0.25])
    assert acceptance_probabilities([2.0, None, 0.0], beta=2.0) == pytest.approx([1.0, 0.0, math.exp(-1)])


def test_empirical_first_round_rates_over_1e5_seeded_runs():
    """§8.4: the max is always accepted in round 1, and the empirical rates match within ±0.01."""
    runs = 100_000
    rewards = np.tile(HAND, (runs, 1))
    position, rounds = rso_accept(rewards, m=3, beta=1.0, rng=np.random.default_rng(1234))
    first = (rounds == 1).mean(axis=0)
    assert first[0] == 1.0
    assert abs(first[1] - 0.5) <= 0.01 and abs(first[2] - 0.25) <= 0.01
    assert (position[:, 0] == 0).all()  # the max is the first accepted (it is first in the pool)
    assert ((position >= 0).sum(axis=1) == 3).all() and rounds.max() >= 2


def test_stops_as_soon_as_m_are_accepted_and_rounds_recompute_the_max():
    # β tiny: each round accepts only the best remaining candidate, so they come out by reward
    position, rounds = rso_accept([0.0, 5.0, 1.0, 4.0], m=3, beta=0.01)
    assert position.tolist() == [-1, 0, 2, 1] and rounds.tolist() == [0, 1, 3, 2]
    position, _ = rso_accept(np.tile([1.0, 1.0, 1.0, 1.0], (500, 1)), m=2, beta=1.0)
    assert ((position >= 0).sum(axis=1) == 2).all()  # all accepted with p=1: the first two, then stop
    assert (position[:, :2] == [0, 1]).all()
    position, _ = rso_accept([1.0, float("nan")], m=8, beta=0.5)  # fewer valid than m: all of them
    assert position.tolist() == [0, -1]
    with pytest.raises(ValueError, match="beta"):
        rso_accept([1.0], m=1, beta=0.0)


def _candidates(rewards: list[list[float | None]]) -> pa.Table:
    return pa.table({
        "id": [f"r{i}" for i in range(len(rewards))],
        "responses": pa.array([[{"text": f"t{i}-{j}", "model": "m", "finish_reason": "stop", "n_tokens": 1}
                                for j in range(len(row))] for i, row in enumerate(rewards)], RESPONSES),
        "cdr_rewards": pa.array(rewards, pa.list_(pa.float64())),
    })


def test_rso_sample_is_seeded_per_row_and_works_on_polars():
    t = _candidates([[0.1 * j for j in range(8)] for _ in range(40)])
    a = rso_sample(t, rewards="cdr_rewards", m=4, beta=0.5, seed=0)
    halves = pa.concat_tables([rso_sample(t.slice(0, 13), rewards="cdr_rewards", m=4, beta=0.5, seed=0),
                               rso_sample(t.slice(13), rewards="cdr_rewards", m=4, beta=0.5, seed=0)])
    assert a.column("rso_accepted").to_pylist() == halves.column("rso_accepted").to_pylist()
    accepted = a.column("rso_accepted").to_pylist()
    assert len({tuple(x) for x in accepted}) > 1  # rows draw apart
    rounds = a.column("rso_round").to_pylist()
    for x, r in zip(accepted, rounds):  # the best is accepted in round 1, unless m were accepted before reaching it
        assert len(x) == 4 and (r[x.index(7)] == 1 if 7 in x else r == [1, 1, 1, 1] and max(x) < 7)
    assert all(r == sorted(r) for r in rounds)  # listed in acceptance order
    other = rso_sample(t, rewards="cdr_rewards", m=4, beta=0.5, seed=1).column("rso_accepted").to_pylist()
    assert other != accepted
    out = rso_sample(pl.from_arrow(t), rewards="cdr_rewards", m=4, beta=0.5, seed=0)
    assert isinstance(out, pl.DataFrame) and out["rso_accepted"].to_list() == accepted


def test_pairs_rso_pairs_only_accepted_candidates():
    # β tiny: accepted = the two best [1, 3]; best_worst over them is (1, 3), never (1, 0)
    t = _candidates([[0.0, 5.0, 1.0, 4.0], [2.0, None, None], [1.0, 1.0]])
    stage = RSOPairs(RSOParams(scores="cdr_rewards", m=2, beta=0.01), seed=0, stage_id="rso")
    schema = stage.output_schema(t.schema)
    out = stage.apply(t)
    assert out.table.schema.names == schema.names
    rows = out.table.to_pylist()
    assert [(r["prompt_id"], r["chosen_index"], r["rejected_index"]) for r in rows] == [("r0", 1, 3)]
    assert rows[0]["rso_accepted"] == [1, 3] and rows[0]["rso_round"] == [1, 2]
    assert rows[0]["rso_scores"] == [None, 5.0, None, 4.0] and rows[0]["cdr_rewards"] == [0.0, 5.0, 1.0, 4.0]
    assert rows[0]["margin"] == pytest.approx(1.0)
    assert out.rejected.column("reason").to_pylist() == ["fewer_than_2_scores", "tie"]
    assert out.rejected.column_names == t.column_names + ["reason"]
    assert out.counters == {"rows": 3, "pairs": 1, "accepted": 5, "rounds": 4}


def test_pairs_rso_refuses_a_missing_reward_column():
    from curate.errors import SchemaError

    with pytest.raises(SchemaError, match="reward column 'sr_scores'"):
        RSOPairs(RSOParams(scores="sr_scores")).output_schema(_candidates([[1.0]]).schema)
