"""The one process-level model cache: LLM engines and sentence embedders, loaded once, closed by policy.

Every model a stage uses comes through `open_backend(kind, model, **options)`: the same
(kind, model, options) gives the same loaded object to every stage and part in the process, so a
self-rewarding judge reuses its generator's engine and a model stays loaded across the parts of
a stage (and of later stages). The policy when a new model would not fit: before loading, the
cache estimates what the model needs (its weights on disk, plus vLLM's KV cache on CPU, or the
GPU share vLLM reserves on CUDA) against what is free (MemAvailable, or `torch.cuda.mem_get_info`)
and closes the least recently used models first until it fits or none is left. `close_backends()`
closes everything (end of a run, end of a test module). Leaves out: sharing one model across
processes (each Dask worker has its own cache).

Example: open_backend("vllm", "smollm2-135m-instruct", dtype="bfloat16").generate(requests)
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from collections import OrderedDict
from typing import Any

from curate.backends.registry import build_backend, runs_in_process

log = logging.getLogger(__name__)

_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()  # least recently used first
_LOCK = threading.RLock()
GIB = 1 << 30
HEADROOM = 1.25  # weights in memory take more than on disk (buffers, activations)


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether torch sees a CUDA device (False where torch is missing). Example: cuda_available()"""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _construct(kind: str, model: str, options: dict[str, Any]) -> Any:
    """Build a backend through the registry (`curate.backends.registry`)."""
    return build_backend(kind, model, options)


def _weights_bytes(kind: str, model: str) -> int:
    """Size of a model's weight files on disk (0 for remote servers, scripted fakes or unknown references)."""
    if not runs_in_process(kind):
        return 0
    path = model
    if not os.path.exists(path):
        try:
            from curate.models import resolve_model

            path = resolve_model(model).path
        except Exception:  # an unknown name fails later, where it loads, with a clearer error
            return 0
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith((".safetensors", ".bin", ".gguf")))
    return total


def needed_bytes(kind: str, model: str, options: dict[str, Any]) -> tuple[str, int]:
    """(where, bytes) a model needs: 'gpu' or 'cpu' memory. Example: needed_bytes("vllm", "smollm2-135m-instruct", {})"""
    weights = int(_weights_bytes(kind, model) * HEADROOM)
    if kind == "vllm" and cuda_available():
        import torch

        total = torch.cuda.mem_get_info()[1]
        return "gpu", int(total * (options.get("gpu_memory_utilization") or 0.9))
    if kind in ("transformers", "embedder") and cuda_available() and options.get("device") != "cpu":
        return "gpu", weights
    if kind == "vllm":
        weights += int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")) * GIB)
    return "cpu", weights


def free_bytes(where: str) -> int:
    """Free memory now: MemAvailable (cpu) or free CUDA memory (gpu). Example: free_bytes("cpu")"""
    if where == "gpu":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: assume it fits


def _make_room(kind: str, model: str, options: dict[str, Any]) -> None:
    """Close least recently used models until the new one fits (or nothing is left to close)."""
    where, need = needed_bytes(kind, model, options)
    while _CACHE and need > free_bytes(where):
        key, backend = _CACHE.popitem(last=False)
        log.info("closing %s (least recently used) to make room for %s: needs %.1f GiB, %.1f GiB free",
                 key[1], model, need / GIB, free_bytes(where) / GIB)
        _close(backend)


def backend_key(kind: str, model: str, options: dict[str, Any]) -> tuple:
    """What tells loaded backends apart: kind, model and load options. Example: backend_key("vllm", m, {}) -> ('vllm', m, ())"""
    return (kind, model, tuple(sorted((k, repr(v)) for k, v in options.items())))


def cached(kind: str, model: str, **options: Any) -> Any | None:
    """The loaded backend for (kind, model, options), or None; loads nothing. Example: cached("vllm", m)"""
    with _LOCK:
        return _CACHE.get(backend_key(kind, model, options))


def open_backend(kind: str, model: str, **options: Any) -> Any:
    """The backend for (kind, model, options), loaded on first use and reused after.

    Example: open_backend("transformers", path, dtype="float32")
    """
    key = backend_key(kind, model, options)
    with _LOCK:
        backend = _CACHE.get(key)
        if backend is not None:
            _CACHE.move_to_end(key)
            return backend
        _make_room(kind, model, options)
        log.info("loading %s backend for %s", kind, model)
        backend = _construct(kind, model, options)
        _CACHE[key] = backend
    return backend


def loaded() -> list[tuple[str, str]]:
    """(kind, model) of every loaded model, least recently used first. Example: loaded()"""
    with _LOCK:
        return [(k[0], k[1]) for k in _CACHE]


def _close(backend: Any) -> None:
    close = getattr(backend, "close", None)
    if callable(close):
        close()
    return_freed_memory()


def release_backend(backend: Any) -> None:
    """Close one backend and drop it from the cache. Example: release_backend(b)"""
    with _LOCK:
        for key, cached in list(_CACHE.items()):
            if cached is backend:
                del _CACHE[key]
    _close(backend)


def release_kind(kind: str) -> None:
    """Close every cached model of one kind. Example: release_kind("embedder")"""
    with _LOCK:
        backends = [b for k, b in _CACHE.items() if k[0] == kind]
    for backend in backends:
        release_backend(backend)


def return_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc `malloc_trim`; no-op elsewhere).

    A closed engine's memory otherwise stays in the process's heap, and the next model loaded in
    the same process (a later stage, a test) comes on top of it. Example: return_freed_memory()
    """
    import ctypes
    import gc

    gc.collect()
    if "torch" in sys.modules and cuda_available():
        sys.modules["torch"].cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def close_backends() -> None:
    """Close and forget every cached model (frees its memory). Example: close_backends()"""
    with _LOCK:
        backends = list(_CACHE.values())
        _CACHE.clear()
    for backend in backends:
        try:
            close = getattr(backend, "close", None)
            if callable(close):
                close()
        except Exception as exc:  # closing must not hide the error that led here
            log.warning("closing %s failed: %s", getattr(backend, "name", backend), exc)
    return_freed_memory()
