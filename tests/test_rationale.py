"""judges.rationale (METHODS.md §3): the §3 (f) cases, the stage on a scripted writer, and real runs on SmolLM2."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.contract import MESSAGES
from curate.judges.rationale import (
    RationaleJudge, RationaleParams, copies_response, dpo_term, edit_distance, rdpo_loss, rdpo_rationale_term, refer_by_role,
)
from curate.pairing import chosen_first
from curate.testing import ScriptedBackend, use_scripted


def test_rdpo_rationale_term_of_methods():
    """§3 (f): LP(rationale) = -50, γ = 0.1 -> ℓ(-5) = 5.0067."""
    assert rdpo_rationale_term(-50.0, gamma=0.1) == pytest.approx(5.0067, abs=5e-5)
    assert dpo_term(0.0) == pytest.approx(0.693147, abs=1e-6) and dpo_term(-800.0) == pytest.approx(800.0)
    assert rdpo_loss(0.0, -50.0, beta=0.1, gamma=0.1) == pytest.approx(0.693147 + 5.006715, abs=1e-5)


def test_leakage_guard_uses_normalised_edit_distance():
    """§3 (f): a rationale within 0.2 normalised edit distance of a reply is a copy."""
    assert edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
    reply = "Paris is the capital of France, and it lies on the Seine."
    assert copies_response(reply.replace("Seine", "seine"), reply, "No idea.")
    assert copies_response("No idea!", reply, "No idea.")
    assert not copies_response("The preferred response answers the question; the other response does not.", reply, "No idea.")


def test_refer_by_role_follows_the_order_the_writer_saw():
    text = "Response 1 is rude, while response 2 explains the risk. The Response 2 wins."
    assert refer_by_role(text, chosen_first=False) == ("The other response is rude, while the preferred response explains the "
                                                       "risk. The preferred response wins.")
    assert refer_by_role(text, chosen_first=True).startswith("The preferred response is rude")


def _pairs(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(len(rows))],
                     "prompt": pa.array([[{"role": "user", "content": q}] for q, _, _ in rows], MESSAGES),
                     "chosen": [c for _, c, _ in rows], "rejected": [r for _, _, r in rows]})


def test_stage_randomises_order_rewrites_labels_drops_copies_and_writes_x_rat():
    rows = [(f"question {i}", f"a careful answer number {i}", f"rude reply {i}") for i in range(30)]
    rows.append(("copy me", "This exact sentence is the chosen reply.", "Nope."))

    def answer(prompt: str) -> str:
        if "copy me" in prompt:
            return "This exact sentence is the chosen reply!"
        preferred = "Response 1" if "preferred Response 1" in prompt else "Response 2"
        return f"{preferred} is careful and polite; the other one is rude."

    writer = ScriptedBackend(answer)
    stage = use_scripted(RationaleJudge(RationaleParams(model="scripted/writer", backend="transformers", style="specific")), writer)
    out = stage.apply(_pairs(rows))
    kept = out.table.to_pylist()
    assert len(kept) == 30 and out.rejected.column("reason").to_pylist() == ["rationale_copies_response"]
    assert out.counters["leaked"] == 1 and out.counters["rationales"] == 31 and out.counters["row_errors"] == 0
    assert {r["rationale_chosen_first"] for r in kept} == {True, False}  # both orders occur, seeded per row
    for row in kept:
        assert row["rationale"] == "The preferred response is careful and polite; the other one is rude."
        assert row["rationale_type"] == "specific" and row["rationale_model"] == "scripted/writer"
        x_rat = row["rationale_prompt"]
        assert x_rat.startswith("Given the prompt: User: question")
        assert x_rat.index(row["chosen"]) < x_rat.index("\nor\n") < x_rat.index(row["rejected"])  # chosen above, rejected below
    shown = {r.messages[0]["content"].index("careful") < r.messages[0]["content"].index("rude") for r in writer.requests[:30]}
    assert shown == {True, False}
    again = RationaleJudge(RationaleParams(model="scripted/writer", backend="transformers", style="specific"))
    assert [chosen_first(f"r{i}", again.stage_id, again.seed) for i in range(30)] == [r["rationale_chosen_first"] for r in kept]


def test_template_text_is_hashed_into_the_key(tmp_path):
    custom = tmp_path / "mine.txt"
    custom.write_text("{prompt} {response_1} {response_2} {preferred}: why?")
    a = RationaleJudge(RationaleParams(model="org/m")).key_material()
    b = RationaleJudge(RationaleParams(model="org/m", template=str(custom))).key_material()
    c = RationaleJudge(RationaleParams(model="org/m", style="specific")).key_material()
    assert len({a["template_hash"], b["template_hash"], c["template_hash"]}) == 3
    assert a["conditioning_hash"] == b["conditioning_hash"]


@pytest.mark.slow
def test_rationales_end_to_end_on_hh_pairs_are_deterministic_at_temperature_0(hh_file, tmp_path):
    """§3 (f): every row gets a non-empty rationale and x_rat with chosen before rejected; greedy
    decoding with a fixed seed gives byte-identical rationales in two separate runs."""
    pytest.importorskip("vllm")
    from curate.config import parse_pipeline
    from curate.runner import run_pipeline

    text = f"""
source: {{path: {hh_file}, parse: hh, limit: 4, part_rows: 2}}
stages:
  - stage: judges.rationale
    id: rationale
    params: {{model: smollm2-135m-instruct, dtype: bfloat16, max_model_len: 2048,
              generation: {{max_tokens: 64, temperature: 0.0}}}}
"""
    outs = []
    for name in ("a", "b"):
        stats = run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / name))
        c = stats["stages"][1]["counters"]
        assert c["row_errors"] == 0 and c["rationales"] == 4
        outs.append(pq.read_table(tmp_path / name / "data").sort_by("id").to_pylist())
    assert [r["rationale"] for r in outs[0]] == [r["rationale"] for r in outs[1]]
    for row in outs[0]:
        assert row["rationale"].strip() and row["rationale_model"] == "smollm2-135m-instruct"
        assert row["rationale_prompt"].index(row["chosen"]) < row["rationale_prompt"].index(row["rejected"])
        assert edit_distance(row["rationale"], row["chosen"]) > 0.2 and edit_distance(row["rationale"], row["rejected"]) > 0.2
