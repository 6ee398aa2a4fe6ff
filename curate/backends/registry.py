"""The backend registry: which class runs a backend name (`vllm`, `transformers`, `openai`, ...).

A stage names its engine in its params (`backend: vllm`); the process cache
(`curate.backends.cache.open_backend`) builds it here, once per (name, model, options). Each
entry is a `module:callable` imported on first use (so naming `openai` never imports vLLM), and
says whether it loads weights into this process (`in_process`: it asks for a GPU where there is
one, and the cache weighs its files against free memory) or talks to something elsewhere.
Built in: `vllm`, `transformers`, `openai`, `embedder` (sentence-transformers, for near-dup and
ICAI) and `fake` (`curate.testing`: scripted replies and log-probs for unit tests).
Leaves out: which names a pipeline may write (each stage's `backend` field lists its choices).

Example: build_backend("transformers", "smollm2-135m-instruct", {"dtype": "float32"}).logprobs(items)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BackendEntry:
    """One registered backend. Example: BackendEntry("vllm", "curate.backends.vllm_engine:VLLMBackend", True)"""

    name: str
    target: str  # "module:callable", called as callable(model, **options)
    in_process: bool  # loads the model's weights into this process (a GPU where there is one, memory accounting)

    def factory(self) -> Any:
        """The callable that builds the backend, imported now. Example: entry.factory()(model, **options)"""
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)


_BACKENDS: dict[str, BackendEntry] = {}


def register_backend(name: str, target: str, *, in_process: bool) -> None:
    """Make a backend name buildable (a later registration of the same name replaces it).

    Example: register_backend("tgi", "mypkg.tgi:TGIBackend", in_process=False)
    """
    if ":" not in target:
        raise ValueError(f"backend target must be 'module:callable', got '{target}'")
    _BACKENDS[name] = BackendEntry(name, target, in_process)


def backend_entry(name: str) -> BackendEntry:
    """The entry of a backend name; a ValueError naming the known ones otherwise.

    Example: backend_entry("openai").in_process -> False
    """
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend '{name}' ({', '.join(_BACKENDS)})") from None


def backend_names() -> list[str]:
    """Every registered backend name. Example: backend_names() -> ['vllm', 'transformers', 'openai', 'embedder', 'fake']"""
    return list(_BACKENDS)


def runs_in_process(name: str | None) -> bool:
    """Whether a backend name loads its model into this process (False for None or an unknown name).

    Example: runs_in_process("vllm") -> True; runs_in_process("openai") -> False
    """
    entry = _BACKENDS.get(name) if name is not None else None
    return entry is not None and entry.in_process


def build_backend(name: str, model: str, options: dict[str, Any]) -> Any:
    """Build (load) the backend `name` for `model`; the cache calls this once per key.

    Example: build_backend("openai", "org/m", {"base_url": "http://127.0.0.1:8000/v1"})
    """
    return backend_entry(name).factory()(model, **options)


def sentence_embedder(model: str, device: str | None = None) -> Any:
    """A sentence-transformers model from a local folder (never downloads). Example: sentence_embedder(path, "cpu")"""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model, device=device, local_files_only=True)


register_backend("vllm", "curate.backends.vllm_engine:VLLMBackend", in_process=True)
register_backend("transformers", "curate.backends.hf:HFBackend", in_process=True)
register_backend("openai", "curate.backends.openai_compat:OpenAIBackend", in_process=False)
register_backend("embedder", "curate.backends.registry:sentence_embedder", in_process=True)
register_backend("fake", "curate.testing:scripted_backend", in_process=False)

__all__ = ["BackendEntry", "backend_entry", "backend_names", "build_backend", "register_backend", "runs_in_process"]
