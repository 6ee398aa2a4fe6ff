"""Pairing from scored candidates: METHODS.md §1A, §2, §8.3 and §8.5 hand-checkable cases."""
from __future__ import annotations

import random
from collections import Counter

import pyarrow as pa
import pytest

from curate.contract import MESSAGES, RESPONSES
from curate.pairing import PairFromScores, PairParams, choose_pairs, curriculum_ranks


def test_best_worst_methods_1a_case():
    pairs, reasons = choose_pairs([4.33, 2.0, 4.33, 1.0], list("abcd"), "best_worst")
    assert pairs == [(0, 3)] and reasons == []


def test_all_equal_scores_drop_as_tie():
    assert choose_pairs([3, 3, 3, 3], list("abcd"), "best_worst") == ([], ["tie"])


def test_missing_and_nan_scores_do_not_count():
    assert choose_pairs([4.0, None, float("nan")], list("abc"), "best_worst") == ([], ["fewer_than_2_scores"])
    assert choose_pairs([4.0, None, 1.0], list("abc"), "best_worst") == ([(0, 2)], [])


def test_identical_texts_and_length_mismatch_are_reasons():
    assert choose_pairs([5.0, 1.0], ["same", "same"], "best_worst") == ([], ["identical_texts"])
    assert choose_pairs([5.0, 1.0], ["a"], "best_worst") == ([], ["scores_length_mismatch"])


def test_best_random_cdr_case_draws_each_other_candidate_about_half():
    """METHODS §2 (f): rewards [1.5, 0.2, -0.7] -> chosen 0, rejected in {1, 2} each ~50% over 10k draws."""
    counts = Counter()
    for i in range(10_000):
        pairs, _ = choose_pairs([1.5, 0.2, -0.7], list("abc"), "best_random", random.Random(i))
        counts[pairs[0]] += 1
    assert set(counts) == {(0, 1), (0, 2)}
    assert abs(counts[(0, 1)] / 10_000 - 0.5) < 0.02


def test_best_random_ultrafeedback_case_draws_among_the_non_max_indices():
    """METHODS §8.3 means [4.5, 3, 4.5, 2] -> chosen 0 (first max); the rejected is drawn among the
    non-max candidates {1, 3} (§2 step 4), so the draw never lands on index 2 and no row is lost to a tie."""
    seen, reasons = Counter(), Counter()
    for i in range(300):
        pairs, why = choose_pairs([4.5, 3, 4.5, 2], list("abcd"), "best_random", random.Random(i))
        seen.update(r for _, r in pairs)
        reasons.update(why)
        assert [c for c, _ in pairs] == [0]
    assert set(seen) == {1, 3} and sum(seen.values()) == 300 and not reasons


def test_curry_all_pairs_margins_and_stages():
    """METHODS §8.5: scores [5, 4, 3, 2] -> pairs with margins 3, 2, 1 -> stages 1, 2, 3."""
    pairs, reasons = choose_pairs([5, 4, 3, 2], list("abcd"), "all_pairs")
    margins = [[5, 4, 3, 2][c] - [5, 4, 3, 2][r] for c, r in pairs]
    assert margins == [1, 2, 3] and reasons == []
    assert curriculum_ranks(margins) == [3, 2, 1]


def _candidates(scores_rows):
    prompt = [[{"role": "user", "content": f"q{i}"}] for i in range(len(scores_rows))]
    responses = [[{"text": f"answer {i}-{j}", "model": f"m{j}", "finish_reason": None, "n_tokens": None}
                  for j in range(len(s))] for i, s in enumerate(scores_rows)]
    return pa.table({"id": [f"r{i}" for i in range(len(scores_rows))], "prompt": pa.array(prompt, MESSAGES),
                     "responses": pa.array(responses, RESPONSES), "scores": scores_rows})


def test_stage_builds_pair_rows_and_rejects_with_reasons():
    table = _candidates([[5.0, 4.0, 3.0, 2.0], [3.0, 3.0], [1.0, None]])
    stage = PairFromScores(PairParams(mode="all_pairs"))
    out = stage.apply(table)
    assert out.table.schema == stage.output_schema(table.schema)
    assert out.table.column("margin").to_pylist() == [3.0, 2.0, 1.0]
    assert out.table.column("curr_stage").to_pylist() == [1, 2, 3]
    assert out.table.column("chosen").to_pylist() == ["answer 0-0"] * 3
    assert out.table.column("rejected_model").to_pylist() == ["m3", "m2", "m1"]
    assert out.table.column("prompt_id").to_pylist() == ["r0"] * 3
    assert out.rejected.column("id").to_pylist() == ["r1", "r2"]
    assert out.rejected.column("reason").to_pylist() == ["tie", "fewer_than_2_scores"]


def test_best_random_is_seeded_by_row_id_not_position():
    table = _candidates([[9.0, 1.0, 2.0, 3.0, 4.0]] * 1)
    forward = PairFromScores(PairParams(mode="best_random"), seed=7).apply(table).table
    padded = pa.concat_tables([_candidates([[1.0, 2.0]]).set_column(0, "id", pa.array(["other"])), table])
    again = PairFromScores(PairParams(mode="best_random"), seed=7).apply(padded).table
    assert forward.column("rejected").to_pylist() == again.column("rejected").to_pylist()[1:]


def test_stage_refuses_non_numeric_scores():
    table = _candidates([[1.0, 2.0]]).set_column(3, "scores", pa.array([["a", "b"]]))
    from curate.errors import SchemaError

    with pytest.raises(SchemaError, match="list of numbers"):
        PairFromScores(PairParams()).output_schema(table.schema)


def test_chosen_first_is_the_seeded_order_both_pair_judges_show():
    from curate.judges.constitution import ConstitutionJudge, ConstitutionParams
    from curate.judges.rationale import RationaleJudge, RationaleParams
    from curate.pairing import chosen_first

    # Pinned: these orders are in every rationale / constitution run made so far; a change re-orders them.
    assert [int(chosen_first(f"r{i}", "rationale", 0)) for i in range(16)] == [0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 0]
    assert [int(chosen_first(f"r{i}", "constitution", 3)) for i in range(16)] == [0, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0]
    rationale = RationaleJudge(RationaleParams(model="m", backend="transformers"), seed=0)
    shown = [rationale.request(f"r{i}", [{"role": "user", "content": "q"}], "CHOSEN", "REJECTED").messages[0]["content"]
             for i in range(16)]
    assert [int(text.index("CHOSEN") < text.index("REJECTED")) for text in shown] == \
        [int(chosen_first(f"r{i}", "rationale", 0)) for i in range(16)]
    judge = ConstitutionJudge(ConstitutionParams(model="m", backend="transformers", constitution=["Be kind."]), seed=3)
    shown = [judge.request(f"r{i}", [{"role": "user", "content": "q"}], "CHOSEN", "REJECTED", ["Be kind."]).messages[0]["content"]
             for i in range(16)]
    assert [int(text.index("CHOSEN") < text.index("REJECTED")) for text in shown] == \
        [int(chosen_first(f"r{i}", "constitution", 3)) for i in range(16)]
