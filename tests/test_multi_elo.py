"""judges.multi_elo: METHODS.md §8.2's Elo hand case, seeded match orders, per-dimension selection, frames."""
from __future__ import annotations

import itertools

import pyarrow as pa
import pytest

from curate.errors import SchemaError
from curate.judges.elo import elo_ratings, elo_update, expected_score, order_count, order_table, play, play_every_order
from curate.judges.multi_elo import MultiElo, MultiEloParams, candidate_elos, multi_elo_ratings, rating_matches, verdict_matches

RATINGS = pa.struct([("accuracy", pa.list_(pa.float64())), ("language", pa.list_(pa.float64()))])


def _candidates(rows: list[dict]) -> pa.Table:
    return pa.table({"id": pa.array([f"r{i}" for i in range(len(rows))], pa.string()), "uf_ratings": pa.array(rows, RATINGS)})


def test_hand_case_two_equal_players_a_wins():
    """§8.2: two players at 1000, A wins, K=32 -> A 1016, B 984."""
    assert expected_score(1000, 1000) == 0.5
    assert elo_update(1000, 1000, 1.0) == (1016.0, 984.0)
    assert elo_ratings([("A", "B", 1.0)], orders=1) == {"A": 1016.0, "B": 984.0}
    assert elo_ratings([("A", "B", 1.0)], orders=7, seed=3) == {"A": 1016.0, "B": 984.0}  # one match: every order is the same


def test_update_against_a_stronger_player_by_hand():
    # E_a = 1/(1+10^(400/400)) = 1/11; a win moves A by 32*(1-1/11) = 29.09
    a, b = elo_update(1000, 1400, 1.0)
    assert a == pytest.approx(1000 + 32 * 10 / 11) and b == pytest.approx(1400 - 32 * 10 / 11)
    assert elo_update(1000, 1000, 0.5) == (1000.0, 1000.0)
    assert elo_update(1000, 1000, 1.0, k=16) == (1008.0, 992.0)


def test_order_matters_and_ratings_are_the_mean_over_seeded_orders():
    matches = [("a", "b", 1.0), ("b", "c", 1.0), ("c", "a", 1.0)]
    finals = {perm: play(list(perm)) for perm in itertools.permutations(matches)}
    assert len({round(r["a"], 6) for r in finals.values()}) > 1  # Elo depends on the order: why §8.2 averages
    import random

    # up to exact_orders distinct orders: the exact mean over all of them
    assert elo_ratings(matches) == {p: pytest.approx(sum(r[p] for r in finals.values()) / 6) for p in "abc"}
    # beyond: `orders` seeded shuffles
    rng, order, total = random.Random(5), list(matches), 0.0
    for _ in range(4):
        rng.shuffle(order)
        total += play(order)["a"]
    sampled = elo_ratings(matches, orders=4, seed=5, exact_orders=0)
    assert sampled["a"] == pytest.approx(total / 4)
    assert sampled == elo_ratings(matches, orders=4, seed=5, exact_orders=0)
    assert sampled != elo_ratings(matches, orders=4, seed=6, exact_orders=0)
    assert sum(elo_ratings(matches, orders=9, exact_orders=0).values()) == pytest.approx(3000)  # Elo is zero-sum


def test_every_order_makes_symmetric_records_exact_ties():
    record = [("a", "b", 1.0), ("a", "b", 0.0), ("a", "b", 0.5), ("a", "b", 0.5)]
    assert order_count(record) == 12 and len(order_table((1, 1, 2))) == 12
    assert elo_ratings(record) == {"a": 1000.0, "b": 1000.0}  # one win, one loss, two draws: a tie
    assert elo_ratings(record, orders=3, seed=1, exact_orders=0)["a"] != 1000.0  # sampled orders leave an order effect
    elos = candidate_elos([5.0, 3.0, 3.0, 1.0])
    assert elos[1] == elos[2] and elos[0] > elos[1] > elos[3]  # equal ratings, equal Elo
    six = rating_matches([5.0, 3.0, 2.0, 1.0])  # 6 distinct matches: 720 orders, vectorised against the plain loop
    loop = {p: sum(play(list(o))[p] for o in itertools.permutations(six)) / 720 for p in range(4)}
    assert play_every_order(six) == pytest.approx(loop)


def test_matches_from_ratings_and_verdicts():
    assert rating_matches([4.0, 2.0, None, 4.0]) == [(0, 1, 1.0), (0, 3, 0.5), (1, 3, 0.0)]
    assert verdict_matches("lose") == [("a", "b", 0.0)]
    assert verdict_matches([[8.0, 6.0], [5.0, 5.0], [2.0, 9.0]]) == [("a", "b", 1.0), ("a", "b", 0.5), ("a", "b", 0.0)]
    assert verdict_matches(None) == [] and verdict_matches("garbage") == []
    assert candidate_elos([5.0, 1.0]) == [1016.0, 984.0]
    elos = candidate_elos([5.0, 3.0, 1.0, None])
    assert elos[3] is None and elos[0] > elos[1] > elos[2]


def test_one_elo_per_dimension_and_selection_through_pairs_from_scores():
    from curate.pairing import PairFromScores, PairParams

    rows = [{"accuracy": [5.0, 1.0, 3.0], "language": [1.0, 5.0, 3.0]}]
    out = multi_elo_ratings(_candidates(rows))
    acc, lang = out.column("me_accuracy_elo")[0].as_py(), out.column("me_language_elo")[0].as_py()
    assert acc.index(max(acc)) == 0 and lang.index(max(lang)) == 1  # the dimensions stay apart
    responses = pa.array([[{"text": t, "model": "m", "finish_reason": "stop", "n_tokens": 1} for t in "xyz"]],
                         pa.list_(pa.struct([("text", pa.string()), ("model", pa.string()), ("finish_reason", pa.string()),
                                             ("n_tokens", pa.int32())])))
    table = out.append_column("responses", responses)
    pairs = PairFromScores(PairParams(scores="me_accuracy_elo", mode="best_worst")).apply(table).table
    assert pairs.column("chosen").to_pylist() == ["x"] and pairs.column("rejected").to_pylist() == ["y"]
    # on the pair rows, the pair's two Elos per dimension and their verdicts
    marked = multi_elo_ratings(pairs)
    assert marked.column("me_accuracy_verdict").to_pylist() == ["win"]
    assert marked.column("me_language_verdict").to_pylist() == ["lose"]
    assert marked.column("me_accuracy_elo_chosen")[0].as_py() == pytest.approx(acc[0])


def _pairs(verdicts: list, scores: list) -> pa.Table:
    return pa.table({"id": [f"p{i}" for i in range(len(verdicts))], "chosen": ["c"] * len(verdicts),
                     "rejected": ["r"] * len(verdicts), "chosen_score": [9.0] * len(verdicts),
                     "rejected_score": [1.0] * len(verdicts), "margin": [8.0] * len(verdicts),
                     "acc_verdict": pa.array(verdicts, pa.string()),
                     "lang_scores": pa.array(scores, pa.list_(pa.list_(pa.float64())))})


def test_pairwise_verdicts_relabel_on_the_selected_dimension():
    table = _pairs(["win", "lose", "tie", None], [[[8, 2]], [[9, 1], [9, 2]], [[3, 3]], []])
    params = MultiEloParams(verdicts={"accuracy": "acc_verdict", "language": "lang_scores"}, select="accuracy", action="relabel")
    stage = MultiElo(params, stage_id="me")
    assert "me_accuracy_verdict" in stage.output_schema(table.schema).names
    out = stage.apply(table)
    assert out.table.column("id").to_pylist() == ["p0", "p1"]
    assert out.table.column("me_accuracy_elo_chosen").to_pylist() == [1016.0, 1016.0]
    assert out.table.column("me_accuracy_verdict").to_pylist() == ["win", "win"]
    swapped = out.table.to_pylist()[1]  # p1 swapped, with its language Elos and scores
    assert swapped["chosen"] == "r" and swapped["chosen_score"] == 1.0 and swapped["margin"] == -8.0
    assert swapped["me_language_verdict"] == "lose"  # language said chosen (now rejected) was better twice
    assert swapped["acc_verdict"] == "win" and swapped["lang_scores"] == [[1.0, 9.0], [2.0, 9.0]]  # re-oriented with the pair
    assert MultiElo(params).apply(out.table).table.equals(out.table)  # relabelling again changes nothing
    assert dict(zip(out.rejected.column("id").to_pylist(), out.rejected.column("reason").to_pylist())) == {
        "p2": "me_tie", "p3": "me_no_verdict"}
    assert out.counters == {"matches": 1 + 1 + 1 + 1 + 2 + 1, "verdict_win": 1, "verdict_tie": 1, "verdict_lose": 1,
                            "relabelled": 1}
    dropped = MultiElo(params.model_copy(update={"action": "drop"})).apply(table)
    assert dropped.table.column("id").to_pylist() == ["p0"]
    assert "me_reversed" in dropped.rejected.column("reason").to_pylist()


def test_bad_params_are_refused_with_the_reason():
    with pytest.raises(SchemaError, match="no rating list 'accuracy'"):
        MultiElo(MultiEloParams(dimensions=["accuracy"])).output_schema(
            pa.schema([("id", pa.string()), ("uf_ratings", pa.struct([("honesty", pa.list_(pa.float64()))]))]))
    with pytest.raises(SchemaError, match="pairs.from_scores"):
        MultiElo(MultiEloParams(select="accuracy")).output_schema(_candidates([]).schema)
    with pytest.raises(ValueError):
        MultiEloParams(dimensions=["Bad Name"])


@pytest.mark.parametrize("kind", ["pandas", "polars", "datasets"])
def test_frames_give_the_same_columns(kind):
    table = _candidates([{"accuracy": [5.0, 1.0, 3.0], "language": [2.0, 2.0, None]}])
    expected = multi_elo_ratings(table).column("me_accuracy_elo").to_pylist()
    if kind == "pandas":
        frame = table.to_pandas()
    elif kind == "polars":
        import polars as pl

        frame = pl.from_arrow(table)
    else:
        import datasets

        frame = datasets.Dataset(table)
    out = multi_elo_ratings(frame)
    assert type(out) is type(frame)
    values = list(out["me_accuracy_elo"])
    assert [pytest.approx(list(v)) for v in values] == expected
