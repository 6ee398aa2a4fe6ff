"""DONOD (METHODS.md §7): closed-form DON / NOD, TOPSIS, the global top-fraction keep.

The hand-checkable cases of §7 (f) (toy V=2 step, closed form = autograd in float64, TOPSIS on
DON=[1,2,3], NOD=[3,2,1]); the kept ids of the global stage for any split into parts, through
the runner; `donod_scores` on tiny random Llamas against a real SGD step on the model's output
layer computed here by hand (untied; tied with both `tied` modes); the frame adapters.
"""
from __future__ import annotations

import functools
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from curate.config import parse_pipeline
from curate.contract import MESSAGES, StageOutput, Verdict
from curate.filters.donod import (
    DonodFilter,
    DonodFilterParams,
    DonodScore,
    DonodScoreParams,
    OutputLayer,
    closed_form_terms,
    donod_autograd,
    donod_closed_form,
    donod_closed_form_batch,
    donod_fit,
    donod_mark,
    donod_scores,
    donod_select,
    keep_count,
)
from curate.filters.topsis_rank import topsis, topsis_fit
from curate.registry import get_stage
from curate.runner import run_pipeline

torch = pytest.importorskip("torch")


# One sample's step (METHODS §7 (c), (f)) ------------------------------------------------------------


def test_toy_step_gives_nod_equal_don_0_7071():
    """V=2, d=1, W=0, h=1, target 0, η=1: G=(-0.5, 0.5), W'=(0.5, -0.5), NOD = DON = 1/√2."""
    W, H, y = np.zeros((2, 1)), np.ones((1, 1)), [0]
    assert closed_form_terms(W, H, y) == (0.0, 0.5)  # <W, G> = 0, ||G||² = 0.25 + 0.25
    for don, nod in (donod_closed_form(W, H, y, lr=1.0), donod_autograd(W, H, y, lr=1.0)):
        assert don == pytest.approx(math.sqrt(0.5), abs=1e-12) and nod == pytest.approx(0.7071, abs=1e-4)
        assert nod == pytest.approx(math.sqrt(0.5), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_closed_form_equals_autograd_in_float64(seed):
    rng = np.random.default_rng(seed)
    V, d, T = 7, 5, 4
    W, H, y = rng.normal(size=(V, d)), rng.normal(size=(T, d)), rng.integers(0, V, T)
    lr = [1e-4, 0.1, 1.0, 3.0, 0.5][seed]
    expected = donod_autograd(W, H, y, lr)
    for chunk in (1, 2, 3, 4, 64, None):  # one block, uneven blocks, one position per block
        got = donod_closed_form(W, H, y, lr, chunk=chunk)
        assert abs(got[0] - expected[0]) <= 1e-9 and abs(got[1] - expected[1]) <= 1e-9, (chunk, got, expected)
    # a bias enters the softmax only; W is what is monitored
    bias = rng.normal(size=V)
    with_bias = donod_autograd(W, H, y, lr, bias=bias)
    got = donod_closed_form(torch.tensor(W), torch.tensor(H), torch.tensor(y), lr, chunk=3, bias=bias)
    assert np.allclose(got, with_bias, rtol=0, atol=1e-9) and not np.allclose(with_bias, expected, rtol=0, atol=1e-6)
    # NOD is linear in η and DON changes sign with the step direction of <W, G>
    inner, g_sq = closed_form_terms(W, H, y)
    assert donod_closed_form(W, H, y, 2 * lr)[1] == pytest.approx(2 * expected[1], rel=1e-12)
    assert math.copysign(1, donod_closed_form(W, H, y, 1e-6)[0]) == -math.copysign(1, inner)


def test_batched_closed_form_equals_the_per_sample_one():
    rng = np.random.default_rng(7)
    V, d = 11, 4
    W, bias = rng.normal(size=(V, d)), rng.normal(size=V)
    lengths = [3, 1, 6, 9, 2, 4]
    hs = [rng.normal(size=(t, d)) for t in lengths]
    ys = [rng.integers(0, V, t) for t in lengths]
    for kwargs in ({}, {"block_rows": 6}, {"block_rows": 6, "chunk": 2}, {"bias": bias, "block_rows": 1}):
        got = donod_closed_form_batch(W, hs, ys, 0.7, **kwargs)
        expected = [donod_autograd(W, h, y, 0.7, bias=kwargs.get("bias")) for h, y in zip(hs, ys)]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert donod_closed_form_batch(W, [], [], 0.7) == []


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same d"):
        donod_closed_form(np.zeros((3, 2)), np.zeros((1, 3)), [0], 1.0)
    with pytest.raises(ValueError, match="one target per row"):
        donod_closed_form(np.zeros((3, 2)), np.zeros((2, 2)), [0], 1.0)
    with pytest.raises(ValueError, match="lie in"):
        donod_closed_form(np.zeros((3, 2)), np.zeros((1, 2)), [3], 1.0)


# TOPSIS and the keep ------------------------------------------------------------------------------


def test_topsis_hand_case_and_directions():
    x = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])  # DON, NOD
    assert topsis(x) == pytest.approx([0.0, 0.5, 1.0], abs=1e-15)
    assert topsis(x, normalize="minmax") == pytest.approx([0.0, 0.5, 1.0], abs=1e-15)
    assert topsis(x, benefit=(False, True)) == pytest.approx([1.0, 0.5, 0.0], abs=1e-15)
    assert topsis(x, weights=(1.0, 0.0), benefit=(True, True)) == pytest.approx([0.0, 0.5, 1.0], abs=1e-15)
    fit = topsis_fit(x)
    assert fit.scale == pytest.approx([math.sqrt(14)] * 2) and fit.best == pytest.approx([1.5 / math.sqrt(14), 0.5 / math.sqrt(14)])
    # signed DON (it is often negative), a constant column that separates nothing, one row
    signed = np.array([[-3.0, 1.0], [-1.0, 1.0], [-2.0, 1.0]])
    assert topsis(signed) == pytest.approx([0.0, 1.0, 0.5])
    assert topsis([[5.0, 5.0]]) == pytest.approx([0.5])
    with pytest.raises(ValueError, match="finite"):
        topsis([[1.0, np.nan]])


def test_keep_count_rounds_up():
    assert [keep_count(n, 0.3) for n in (0, 1, 10, 11, 100)] == [0, 1, 3, 4, 30]
    assert keep_count(7, 1.0) == 7 and keep_count(7, 0.0) == 0


def _scored(don, nod, ids=None) -> pa.Table:
    n = len(don)
    return pa.table({
        "id": ids or [f"r{i:03d}" for i in range(n)],
        "donod_don": pa.array(don, pa.float64()),
        "donod_nod": pa.array(nod, pa.float64()),
    })


def test_select_keeps_the_top_fraction_ties_by_id_and_skips_unscored():
    # 10 scored rows: 4 share the best (DON, NOD); r006 / r007 have no scores
    don = [1.0, 5.0, 5.0, 0.5, 5.0, 2.0, None, float("nan"), 5.0, 0.1, 3.0, 1.0]
    nod = [1.0, 0.1, 0.1, 2.0, 0.1, 1.0, 1.0, 1.0, 0.1, 3.0, 0.5, 1.0]
    ids = ["r000", "r005", "r003", "r004", "r001", "r010", "r006", "r007", "r002", "r009", "r008", "r011"]
    out = donod_select(_scored(don, nod, ids))
    kept = sorted(i for i, k in zip(ids, out.column("donod_keep").to_pylist()) if k)
    assert kept == ["r001", "r002", "r003"]  # ceil(0.3 x 10) = 3 of the four tied best rows, smallest ids first
    c = out.column("donod_topsis").to_pylist()
    assert c[6] is None and c[7] is None and out.column("donod_keep").to_pylist()[6:8] == [False, False]
    assert c[1] == c[2] == c[4] == c[8] == 1.0 and min(x for x in c if x is not None) == 0.0
    # the cut follows the rank of closeness: every kept row is at least as close as every other
    assert all(0.0 <= x <= 1.0 for x in c if x is not None)
    flipped = donod_select(_scored(don, nod, ids), don_sign="cost", nod_sign="benefit")
    # DON cost, NOD benefit: r009 (0.1, 3.0), r004 (0.5, 2.0), then r000 of the tied r000 / r011 (1.0, 1.0)
    assert sorted(i for i, k in zip(ids, flipped.column("donod_keep").to_pylist()) if k) == ["r000", "r004", "r009"]
    assert donod_select(_scored([], []), keep_fraction=0.5).num_rows == 0


def _random_scores(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    don = rng.normal(size=n) * 1e-6
    nod = np.abs(rng.normal(size=n)) * 1e-3
    don[::9] = don[3]  # exact ties
    nod[::9] = nod[3]
    don[5], nod[11] = np.nan, np.nan
    ids = [f"x{int(v):05d}" for v in rng.permutation(n)]
    return _scored([None if np.isnan(v) else float(v) for v in don], list(map(float, nod)), ids)


def test_fit_over_parts_equals_fit_over_the_whole_table():
    table = _random_scores(101, seed=1)
    whole = donod_fit([table])
    stage = DonodFilter(DonodFilterParams())
    for size in (1, 7, 50):
        parts = [table.slice(i, size) for i in range(0, table.num_rows, size)]
        state = stage.fit(iter(parts))
        assert state.equals(whole), size
        marks = [donod_mark(p, state) for p in parts]
        keep = pa.concat_arrays([m[1] for m in marks])
        assert keep.equals(donod_mark(table, whole)[1])
    assert whole.column("n_scored")[0].as_py() == 99 and whole.column("keep_count")[0].as_py() == 30
    assert sum(donod_select(table).column("donod_keep").to_pylist()) == 30


def _donod_run(tmp_path, part_rows: int, out: str, action: str = "drop"):
    import pyarrow.parquet as pq

    text = f"""source: {{path: s.jsonl, part_rows: {part_rows}}}
stages:
  - stage: filters.donod
    params: {{keep_fraction: 0.3, action: {action}}}
"""
    stats = run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / out))
    return stats, pq.read_table(tmp_path / out / "data").sort_by("id")


def test_pipeline_keeps_the_same_ids_for_any_split(tmp_path):
    import pyarrow.parquet as pq

    table = _random_scores(61, seed=2)
    rows = [{"prompt": f"q{r['id']}", "chosen": f"a{r['id']}", **r} for r in table.to_pylist()]
    for r in rows:  # JSON has no NaN: unscored rows are null
        r["donod_don"] = None if r["donod_don"] is None or math.isnan(r["donod_don"]) else r["donod_don"]
        r["donod_nod"] = None if r["donod_nod"] is None or math.isnan(r["donod_nod"]) else r["donod_nod"]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = sorted(i for i, k in zip(table.column("id").to_pylist(),
                                        donod_select(table).column("donod_keep").to_pylist()) if k)
    assert len(expected) == 18  # ceil(0.3 x 59 scored)
    results = [_donod_run(tmp_path, n, f"out{n}") for n in (1000, 7, 2)]
    for stats, kept in results:
        assert kept.column("id").to_pylist() == expected and all(kept.column("donod_keep").to_pylist())
        assert stats["dropped"] == {"donod_pruned": 41, "donod_unscored": 2}
        fit = stats["stages"][1]["fit"]
        assert fit["n_scored"] == 59 and fit["keep_count"] == 18
    assert results[0][1].equals(results[2][1]) and results[1][0]["parts"] == 9
    rejects = pq.read_table(tmp_path / "out7" / "rejects" / "donod")
    reasons = dict(zip(rejects.column("id").to_pylist(), rejects.column("reason").to_pylist()))
    assert sorted(i for i, r in reasons.items() if r == "donod_unscored") == sorted(
        r["id"] for r in rows if r["donod_don"] is None or r["donod_nod"] is None)
    stats, marked = _donod_run(tmp_path, 7, "mark", action="mark")
    assert marked.num_rows == 61 and stats["dropped"] == {}
    assert sorted(marked.filter(pc.field("donod_keep")).column("id").to_pylist()) == expected


# Scoring through the transformers backend --------------------------------------------------------

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
ROWS = [
    (PROMPT, "The capital of France is Paris, a large city on the Seine."),
    ([{"role": "user", "content": "Name a colour."}], "Blue, like the sky on a clear day."),
    (PROMPT, "Paris."),
    (PROMPT, ""),  # only the EOS target: still an SFT example
    (PROMPT, None),
]


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory) -> dict[str, str]:
    """Two 2-layer random Llamas (d=64) with SmolLM2's tokenizer: untied and tied embeddings."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from curate.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path)
    paths = {}
    for tied in (False, True):
        torch.manual_seed(1)
        config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # peakier softmaxes than the 0.02 init, so the scores differ between rows
            model.get_output_embeddings().weight.mul_(20.0)
        path = tmp_path_factory.mktemp("tiny-llama-tied" if tied else "tiny-llama-untied")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths["tied" if tied else "untied"] = str(path)
    return paths


def _table(rows=ROWS) -> pa.Table:
    return pa.table({
        "id": [f"s{i}" for i in range(len(rows))],
        "prompt": pa.array([r[0] for r in rows], MESSAGES),
        "chosen": pa.array([r[1] for r in rows], pa.string()),
    })


def _sgd_step(model, messages, reply, lr: float, budget: int | None = None, output_only: bool = False):
    """DON and NOD of one real SGD step on the model's output-embedding weight, by hand (fp64 norms).

    The loss is transformers' own mean NLL with the prompt positions masked (labels = -100).
    `output_only`: the hidden states are detached, so only the lm_head use gets a gradient.
    """
    from curate.backends.base import encode_pair

    ids, start = encode_pair(_tokenizer(model.name_or_path), messages, reply)
    ids = ids[:budget] if budget else ids
    input_ids = torch.tensor([ids])
    labels = input_ids.clone()
    labels[0, :start] = -100
    weight = model.get_output_embeddings().weight
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(p is weight)
    weight.grad = None
    try:
        if output_only:
            with torch.no_grad():
                hidden = model.model(input_ids=input_ids).last_hidden_state
            logits = hidden @ weight.T
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:], ignore_index=-100,
                                                     reduction="none")[start - 1:].mean()
        else:
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    w = weight.detach().double()
    stepped = w - lr * weight.grad.double()
    weight.grad = None
    return float(stepped.norm() - w.norm()), float((stepped - w).norm()), len(ids) - start


@functools.lru_cache(maxsize=None)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=None)
def _model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_scores_match_a_real_sgd_step_on_the_untied_lm_head(tiny_llamas):
    lr = 1e-2
    out = donod_scores(_table(), model=tiny_llamas["untied"], lr=lr)
    assert out.column("donod_skip_reason").to_pylist() == [None] * 4 + ["missing_response"]
    assert out.column("donod_don").to_pylist()[4] is None and out.column("donod_n_tokens").to_pylist()[3:] == [1, 0]
    model = _model(tiny_llamas["untied"])
    assert not OutputLayer.of(model).tied
    for i, (messages, reply) in enumerate(ROWS[:4]):
        don, nod, n = _sgd_step(model, messages, reply, lr)
        assert out.column("donod_n_tokens")[i].as_py() == n
        assert out.column("donod_don")[i].as_py() == pytest.approx(don, rel=1e-4)
        assert out.column("donod_nod")[i].as_py() == pytest.approx(nod, rel=1e-4)
    dons = out.column("donod_don").to_pylist()[:4]
    assert len({round(d, 12) for d in dons}) == 4  # the rows are told apart
    # chunking the Gram and the model-autograd path change nothing (untied: `tied` is ignored)
    again = donod_scores(_table(), model=tiny_llamas["untied"], lr=lr, chunk=3, tied="autograd")
    np.testing.assert_allclose(again.column("donod_nod").to_pylist()[:4], out.column("donod_nod").to_pylist()[:4],
                               rtol=1e-12)


def test_truncation_keeps_the_first_targets_and_skips_a_full_prompt(tiny_llamas):
    from curate.backends.base import encode_prompt

    path = tiny_llamas["untied"]
    prompt_len = len(encode_prompt(_tokenizer(path), PROMPT))
    budget = prompt_len + 3
    long_prompt = [{"role": "user", "content": "Tell me everything about the capital of France, " * 3}]
    rows = [(PROMPT, ROWS[0][1]), (long_prompt, "Paris.")]
    out = donod_scores(_table(rows), model=path, lr=1.0, max_length=budget)
    assert out.column("donod_skip_reason").to_pylist() == [None, "prompt_too_long"]
    assert out.column("donod_n_tokens").to_pylist() == [3, 0]
    don, nod, n = _sgd_step(_model(path), PROMPT, ROWS[0][1], 1.0, budget=budget)
    assert n == 3
    assert out.column("donod_don")[0].as_py() == pytest.approx(don, rel=1e-4)
    assert out.column("donod_nod")[0].as_py() == pytest.approx(nod, rel=1e-4)


def test_tied_embeddings_closed_form_is_the_output_use_autograd_the_whole_tensor(tiny_llamas):
    path, lr = tiny_llamas["tied"], 1e-2
    model = _model(path)
    assert OutputLayer.of(model).tied
    rows = [ROWS[1], ROWS[2]]
    closed = donod_scores(_table(rows), model=path, lr=lr, tied="closed_form")
    full = donod_scores(_table(rows), model=path, lr=lr, tied="autograd")
    for i, (messages, reply) in enumerate(rows):
        don_out, nod_out, _ = _sgd_step(model, messages, reply, lr, output_only=True)
        don_all, nod_all, _ = _sgd_step(model, messages, reply, lr)
        assert closed.column("donod_nod")[i].as_py() == pytest.approx(nod_out, rel=1e-4)
        assert closed.column("donod_don")[i].as_py() == pytest.approx(don_out, rel=1e-4)
        assert full.column("donod_nod")[i].as_py() == pytest.approx(nod_all, rel=1e-4)
        assert full.column("donod_don")[i].as_py() == pytest.approx(don_all, rel=1e-4)
        assert abs(nod_all - nod_out) > 1e-3 * nod_out  # the input-embedding use is a real extra term


def test_score_stage_schema_counters_key_and_frames(tiny_llamas):
    datasets = pytest.importorskip("datasets")
    pl = pytest.importorskip("polars")
    path = tiny_llamas["untied"]
    t = _table()
    stage = get_stage("filters.donod_score")(DonodScoreParams(model=path, lr=1e-2))
    assert isinstance(stage, DonodScore)
    out = stage.apply(t)
    assert isinstance(out, StageOutput) and out.table.schema.equals(stage.output_schema(t.schema))
    assert out.counters["rows_scored"] == 4 and out.counters["skipped_missing_response"] == 1
    assert out.table.column("donod_model").to_pylist() == [path] * 5
    material = stage.key_material()
    assert "model_identity" in material and "chunk" not in material["params"] and material["params"]["lr"] == 1e-2
    ds = donod_scores(datasets.Dataset(t), model=path, lr=1e-2)
    assert isinstance(ds, datasets.Dataset) and ds[0]["donod_nod"] == pytest.approx(out.table.column("donod_nod")[0].as_py())
    frame = donod_select(pl.from_arrow(out.table), keep_fraction=0.5)
    assert isinstance(frame, pl.DataFrame) and frame["donod_keep"].sum() == 2 and frame["donod_topsis"].null_count() == 1
    ds_sel = donod_select(ds, keep_fraction=0.5)
    assert isinstance(ds_sel, datasets.Dataset) and ds_sel["donod_keep"] == frame["donod_keep"].to_list()


def test_score_then_filter_end_to_end(tiny_llamas, tmp_path):
    import pyarrow.parquet as pq

    replies = ["Paris.", "It is Paris.", "Lyon, I think.", "The capital of France is Paris.", "Paris!", "Marseille."]
    rows = [{"id": f"e{i}", "prompt": "What is the capital of France?", "chosen": r} for i, r in enumerate(replies)]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = f"""source: {{path: e.jsonl, part_rows: 2}}
stages:
  - stage: filters.donod_score
    params: {{model: {tiny_llamas['untied']}, lr: 0.01}}
  - stage: filters.donod
    params: {{keep_fraction: 0.5}}
"""
    stats = run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / "out"))
    kept = pq.read_table(tmp_path / "out" / "data")
    assert stats["rows_out"] == 3 and stats["dropped"] == {"donod_pruned": 3}
    assert stats["stages"][1]["counters"]["rows_scored"] == 6
    scored = donod_scores(pa.table({"id": [r["id"] for r in rows], "prompt": [r["prompt"] for r in rows],
                                    "chosen": replies}), model=tiny_llamas["untied"], lr=0.01)
    expected = sorted(i for i, k in zip(scored.column("id").to_pylist(),
                                        donod_select(scored, keep_fraction=0.5).column("donod_keep").to_pylist()) if k)
    assert sorted(kept.column("id").to_pylist()) == expected


def test_filter_stage_verdict_reasons():
    table = _scored([1.0, 2.0, None, 3.0], [3.0, 2.0, 1.0, 1.0])
    stage = get_stage("filters.donod")(DonodFilterParams(keep_fraction=0.3))  # C = 0, 0.5, -, 1: keep ceil(0.9) = 1
    assert stage.output_schema(table.schema).names[-2:] == ["donod_topsis", "donod_keep"]
    state = stage.fit([table])
    verdict = stage.apply(table, state)
    assert isinstance(verdict, Verdict)
    assert verdict.keep.to_pylist() == [False, False, False, True]
    assert verdict.reason.to_pylist() == ["donod_pruned", "donod_pruned", "donod_unscored", None]
    summary = stage.fit_summary(state)
    assert summary["keep_count"] == 1 and summary["n_scored"] == 3 and summary["threshold"] == 1.0
    marked = DonodFilter(DonodFilterParams(keep_fraction=0.3, action="mark")).apply(table, state)
    assert isinstance(marked, StageOutput) and marked.table.column("donod_keep").to_pylist() == [False, False, False, True]
    assert marked.table.column("donod_topsis").to_pylist() == pytest.approx([0.0, 0.5, None, 1.0])
