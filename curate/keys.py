"""Content-addressed keys: canonical JSON of what changes an output, hashed with BLAKE2b.

A stage key hashes its registry name, version and output-relevant params; a part key chains it
onto its parent's key (DESIGN.md §6). Leaves out: execution knobs (batch size, workers, device),
which callers must not pass in. Unhashable values raise; there is no random fallback.

Example: chain_key("abc", {"name": "filters.length", "params": {"max_chars": 10}}) -> '3f1e…'
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

KEY_BYTES = 10  # 20 hex chars: short enough for folder names, collision odds ~1e-24 per pair


def _check_hashable(value: Any, path: str) -> None:
    """Refuse values whose JSON form would not be stable (floats that are not finite, objects)."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"cannot hash non-finite float at {path}: {value}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_hashable(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise TypeError(f"cannot hash non-string key at {path}: {k!r}")
            _check_hashable(item, f"{path}.{k}")
        return
    raise TypeError(f"cannot hash value of type {type(value).__name__} at {path}")


def canonical_json(value: Any) -> str:
    """Serialise plain data to one canonical JSON string (sorted keys, no spaces).

    Example: canonical_json({"b": 1, "a": [1.0]}) -> '{"a":[1.0],"b":1}'
    """
    _check_hashable(value, "$")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(*parts: str | bytes) -> str:
    """Hex BLAKE2b digest of the given strings, each length-prefixed so boundaries count.

    Example: digest("a", "bc") != digest("ab", "c") -> True
    """
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def chain_key(parent_key: str, material: dict[str, Any]) -> str:
    """Key of a stage output: hash of the parent's key and the stage's own key material.

    Example: chain_key("", {"source": "x"}) -> 20 hex chars
    """
    return digest(parent_key, canonical_json(material))


def file_digest(path: str, chunk: int = 1 << 22) -> str:
    """Hash a local or fsspec file's bytes with XXH3-128 (several GB/s; used to key sources by content).

    Example: file_digest("pipelines/data/quickstart.jsonl") -> 32 hex chars
    """
    import fsspec
    import xxhash

    h = xxhash.xxh3_128()
    with fsspec.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def row_seed(row_id: str, scope: str, seed: int) -> int:
    """A 64-bit seed for one row's random choices: hash(row id, stage scope, global seed).

    Re-sharding does not change it (DESIGN.md §6). Example: row_seed("r1", "pairs", 0) -> int
    """
    h = hashlib.blake2b(f"{seed}\x1f{scope}\x1f{row_id}".encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def row_coin(row_id: str, scope: str, seed: int, p: float = 0.5) -> bool:
    """A seeded biased coin for one row: True with probability p, from `row_seed` (re-sharding changes nothing).

    Used for presentation orders and held-out splits. Example: row_coin("r1", "judge:order", 0) -> True
    """
    return row_seed(row_id, scope, seed) / 2**64 < p
