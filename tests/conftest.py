"""Shared fixtures: the repo's pipelines copied into a temporary folder, and the HH data path."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HH_FILE = Path(os.environ.get("CURATE_HH_FILE", REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test" / "test.jsonl.gz"))


@pytest.fixture
def scored(tmp_path: Path) -> Path:
    """A copy of pipelines/scored.yaml and its data in tmp_path; returns the YAML path."""
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "pipelines" / "data" / "scored_candidates.jsonl", tmp_path / "data" / "scored_candidates.jsonl")
    text = (REPO / "pipelines" / "scored.yaml").read_text()
    path = tmp_path / "scored.yaml"
    path.write_text(text.replace("output: out/scored", f"output: {tmp_path / 'out'}"))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer random Llama (d=64) with SmolLM2's tokenizer and chat template, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from curate.models import resolve_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path).save_pretrained(path)
    return str(path)


@pytest.fixture
def hh_file() -> Path:
    """The HH-RLHF harmless-base test file from ../shared/data (skips if it is absent)."""
    if not HH_FILE.exists():
        pytest.skip(f"HH data not found at {HH_FILE}")
    return HH_FILE


@pytest.fixture(autouse=True, scope="module")
def _free_models_after_each_module():
    """Close the engines a test module loaded (open_backend caches them per process) and return
    their memory, so that modules do not stack models: the suite must fit CI's 24 GiB."""
    yield
    from curate.backends.base import close_backends

    close_backends()
