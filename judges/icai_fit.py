"""ICAI's global stages (METHODS.md §4 (c) 2, 3, 5): cluster the candidates, filter and order the principles.

- `judges.icai_cluster`: `fit` gathers every row's candidate principles and their MiniLM vectors
  (from `judges.icai_embed`) in (row id, index) order, so the result never depends on the
  sharding, and runs scikit-learn KMeans with `clusters` clusters (40, §4 (d) [see README]) seeded
  by the pipeline seed; when `clusters` is at least the number of distinct candidates, only exact
  duplicates are merged (§4 (c) 2). One member per cluster, drawn with a seeded draw, becomes the
  cluster's principle (§4 (c) 3, "sample"). The state holds one row per candidate: its row, text,
  cluster (= principle id, numbered by cluster size) and whether it was drawn. `apply` gives
  every row the principle list, `icai_principles`, which `judges.icai_vote` reads.
- `judges.icai_filter`: `fit` counts each principle's combined votes over every voted row, keeps
  those passing §4 (c) 5 (`for > against`, `for >= 0.1·total`, `invalid < for + against +
  abstain`), orders them by `for - against`, and with `max_principles = n` takes the top ⌈1.5n⌉,
  clusters them into n with KMeans over their MiniLM vectors (a few short texts, embedded on the
  CPU inside `fit`) and keeps the highest-ordered principle of each cluster, in order. The state is
  the per-principle table (counts, acc, relevance, perf, kept, drop reason, rank); `apply` adds
  the ordered constitution (`icai_constitution`) and, per row, `icai_support` = votes for minus
  against among the kept principles. `curate.judges.icai_library` writes `constitution.json` from it.
Both fits are CPU-only. Leaves out: rewriting a cluster into a new principle with an LLM (a global
stage runs no LLM; the paper's default samples a member, which is what this does).

Example: - stage: judges.icai_filter
           params: {max_principles: 5}
"""
from __future__ import annotations

import logging
import random
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.contract import Params, Stage, StageOutput, put_columns, require, with_fields
from curate.errors import StageError
from curate.filters.near_dup import DEFAULT_EMBEDDER, embed, embedder_identity, load_embedder
from curate.judges.icai import OrderBy, drop_reason, metrics, order_key, recluster_pool, tally
from curate.judges.icai_stages import STRINGS, VECTORS
from curate.keys import row_seed
from curate.registry import register

log = logging.getLogger(__name__)

CLUSTER_STATE = pa.schema([("row_id", pa.string()), ("index", pa.int32()), ("candidate", pa.string()),
                           ("principle_id", pa.int32()), ("principle", pa.string()), ("drawn", pa.bool_())])
METRIC_FIELDS = [("principle_id", pa.int32()), ("principle", pa.string()), ("for", pa.int64()), ("against", pa.int64()),
                 ("abstain", pa.int64()), ("both", pa.int64()), ("invalid", pa.int64()), ("total", pa.int64()),
                 ("acc", pa.float64()), ("relevance", pa.float64()), ("perf", pa.float64()), ("order_key", pa.int64()),
                 ("kept", pa.bool_()), ("drop_reason", pa.string()), ("rank", pa.int32())]
FILTER_STATE = pa.schema(METRIC_FIELDS)


def kmeans_labels(vectors: np.ndarray, k: int, seed: int, n_init: int = 10) -> np.ndarray:
    """scikit-learn KMeans cluster labels of the rows of `vectors`, seeded. Example: kmeans_labels(x, 3, 0) -> array([0, 2, ...])"""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=n_init, random_state=seed % 2**32).fit(vectors).labels_


def cluster_candidates(texts: list[str], vectors: np.ndarray, k: int, seed: int = 0, n_init: int = 10) -> tuple[list[int], list[int]]:
    """Principle id per candidate and the index of each principle's drawn member (§4 (c) 2-3).

    Fewer distinct texts than k: one cluster per distinct text (exact duplicates merged). Else
    KMeans. Clusters are numbered by size (largest first, ties by the drawn text); the drawn
    member is a seeded uniform draw over the cluster's candidates (duplicates weigh more).
    Example: cluster_candidates(["a", "a", "b"], vecs, k=5) -> ([0, 0, 1], [0 or 1, 2])
    """
    distinct = list(dict.fromkeys(texts))
    if k >= len(distinct):
        labels = [distinct.index(t) for t in texts]
    else:
        labels = [int(x) for x in kmeans_labels(vectors, k, seed, n_init)]
    members: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    drawn = {label: random.Random(row_seed(str(label), "icai:draw", seed)).choice(m) for label, m in members.items()}
    order = sorted(members, key=lambda lb: (-len(members[lb]), texts[drawn[lb]]))
    number = {label: n for n, label in enumerate(order)}
    return [number[lb] for lb in labels], [drawn[lb] for lb in order]


class ClusterParams(Params):
    """Params of judges.icai_cluster. Example: ClusterParams(clusters=40)"""

    clusters: int = Field(40, ge=1, description="KMeans clusters = principles to vote on (§4 (d): 3 in the code, 40/80 in the paper)")
    n_init: int = Field(10, ge=1, description="KMeans restarts (the best inertia wins)")


@register
class ICAICluster(Stage):
    """Cluster the candidates, one principle per cluster (module docstring). Example: - stage: judges.icai_cluster"""

    name = "judges.icai_cluster"
    kind = "global"
    Params = ClusterParams
    uses_seed = True

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), "icai_candidates": STRINGS, "icai_candidate_vectors": VECTORS}, self.name)
        return with_fields(schema, {"icai_principles": STRINGS})

    def fit_columns(self, schema: pa.Schema) -> list[str]:
        return ["id", "icai_candidates", "icai_candidate_vectors"]

    def fit(self, tables: Iterable[pa.Table]) -> pa.Table:
        rows: list[tuple[str, int, str, list[float]]] = []
        for t in tables:
            for row_id, texts, vectors in zip(t.column("id").to_pylist(), t.column("icai_candidates").to_pylist(),
                                              t.column("icai_candidate_vectors").to_pylist()):
                rows += [(row_id, i, text, vec) for i, (text, vec) in enumerate(zip(texts or [], vectors or []))]
        rows.sort(key=lambda r: (r[0], r[1]))
        if not rows:
            return CLUSTER_STATE.empty_table()
        texts = [r[2] for r in rows]
        labels, drawn = cluster_candidates(texts, np.array([r[3] for r in rows], np.float32), self.params.clusters, self.seed,
                                           self.params.n_init)
        chosen = set(drawn)
        log.info("icai_cluster: %d candidates (%d distinct) -> %d principles", len(rows), len(set(texts)), len(drawn))
        return pa.table({"row_id": [r[0] for r in rows], "index": [r[1] for r in rows], "candidate": texts,
                         "principle_id": labels, "principle": [texts[drawn[lb]] for lb in labels],
                         "drawn": [i in chosen for i in range(len(rows))]}, schema=CLUSTER_STATE)

    def fit_summary(self, state: pa.Table) -> dict[str, Any]:
        return {"candidates": state.num_rows, "distinct": len(set(state.column("candidate").to_pylist())),
                "principles": len(principles_of(state))}

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        if state is None:
            raise StageError("needs its fitted state", where=f"stage '{self.name}'")
        principles = principles_of(state)
        return StageOutput(put_columns(table, {"icai_principles": pa.array([principles] * table.num_rows, STRINGS)}))


def principles_of(cluster_state: pa.Table) -> list[str]:
    """The principle texts of a cluster state, by principle id. Example: principles_of(state)[0]"""
    drawn = {r["principle_id"]: r["candidate"] for r in cluster_state.filter(cluster_state.column("drawn")).to_pylist()}
    return [drawn[i] for i in sorted(drawn)]


def principle_table(principles: list[str], votes: list[list[str]], *, min_relevance: float | None = 0.1,
                    majority_true: bool = True, majority_valid: bool = True, majority_relevant: bool = False,
                    order_by: OrderBy = "for_minus_against") -> list[dict[str, Any]]:
    """Counts, metrics, filter verdict and order key of every principle (§4 (c) 5-6), kept first in order.

    `votes` holds one list per row, aligned with `principles`. Example: principle_table(["p"], [["for"]])[0]["kept"] -> True
    """
    entries = []
    for j, text in enumerate(principles):
        counts = tally([row[j] for row in votes])
        reason = drop_reason(counts, min_relevance, majority_true, majority_valid, majority_relevant)
        entries.append({"principle_id": j, "principle": text, **{k: counts[k] for k in ("for", "against", "abstain", "both",
                        "invalid", "total")}, **metrics(counts), "order_key": order_key(counts, order_by),
                        "kept": reason is None, "drop_reason": reason, "rank": None})
    entries.sort(key=lambda e: (not e["kept"], -e["order_key"] if e["kept"] else 0, e["principle_id"]))
    return entries


class FilterParams(Params):
    """Params of judges.icai_filter. Example: FilterParams(max_principles=5)"""

    min_relevance: float | None = Field(0.1, ge=0.0, le=1.0, description="keep if for >= this share of all votes (§4 (d))")
    majority_true: bool = Field(True, description="keep only if for > against")
    majority_valid: bool = Field(True, description="keep only if invalid < for + against + abstain")
    majority_relevant: bool = Field(False, description="keep only if for > abstain (off by default)")
    order_by: OrderBy = Field("for_minus_against", description="descending order of the constitution")
    max_principles: int | None = Field(None, ge=1, description="cap n (§4 (d): none in the code, 5 in the paper's runs)")
    recluster_ratio: float = Field(1.5, ge=1.0, description="take the top ⌈ratio·n⌉ and cluster them into n")
    embedder: str = Field(DEFAULT_EMBEDDER, description="sentence-transformers model for the re-clustering")


@register
class ICAIFilter(Stage):
    """Filter and order the principles by their votes (module docstring). Example: - stage: judges.icai_filter"""

    name = "judges.icai_filter"
    kind = "global"
    Params = FilterParams
    uses_seed = True

    def key_material(self) -> dict[str, Any]:
        material = super().key_material()
        if self.params.max_principles is not None:
            material["model_identity"] = embedder_identity(self.params.embedder)
        return material

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"icai_principles": STRINGS, "icai_votes": STRINGS}, self.name)
        return with_fields(schema, {"icai_constitution": STRINGS, "icai_support": pa.int32()})

    def fit_columns(self, schema: pa.Schema) -> list[str]:
        return ["icai_principles", "icai_votes"]

    def fit(self, tables: Iterable[pa.Table]) -> pa.Table:
        p = self.params
        principles: list[str] | None = None
        votes: list[list[str]] = []
        for t in tables:
            for listed, row in zip(t.column("icai_principles").to_pylist(), t.column("icai_votes").to_pylist()):
                if principles is None and listed:
                    principles = listed
                if listed and listed != principles:
                    raise StageError("rows hold different principle lists; run judges.icai_cluster right before voting",
                                     where=f"stage '{self.name}'")
                if row is not None:
                    votes.append(row)
        entries = principle_table(principles or [], votes, min_relevance=p.min_relevance, majority_true=p.majority_true,
                                  majority_valid=p.majority_valid, majority_relevant=p.majority_relevant, order_by=p.order_by)
        self._cap([e for e in entries if e["kept"]])
        entries.sort(key=lambda e: (e["rank"] is None, e["rank"] or 0, e["principle_id"]))
        log.info("icai_filter: %d of %d principles kept over %d voted rows", sum(e["kept"] for e in entries), len(entries), len(votes))
        return pa.Table.from_pylist(entries, schema=FILTER_STATE)

    def _cap(self, kept: list[dict[str, Any]]) -> None:
        """Rank the kept principles; with max_principles, re-cluster the top ⌈1.5n⌉ into n (§4 (c) 5)."""
        n = self.params.max_principles
        if n is not None and len(kept) > n:
            pool = recluster_pool(n, self.params.recluster_ratio)
            for entry in kept[pool:]:
                entry.update(kept=False, drop_reason="below_top")
            kept = kept[:pool]
            if len(kept) > n:
                vectors = embed([e["principle"] for e in kept], load_embedder(self.params.embedder, "cpu"))
                seen: set[int] = set()
                for entry, label in zip(kept, kmeans_labels(vectors, n, self.seed)):
                    if int(label) in seen:
                        entry.update(kept=False, drop_reason="same_cluster_as_higher")
                    seen.add(int(label))
        for rank, entry in enumerate((e for e in kept if e["kept"]), 1):
            entry["rank"] = rank

    def fit_summary(self, state: pa.Table) -> dict[str, Any]:
        return {"principles_tested": state.num_rows, "kept": len(constitution_of(state)), "constitution": constitution_of(state)}

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        if state is None:
            raise StageError("needs its fitted state", where=f"stage '{self.name}'")
        constitution = constitution_of(state)
        kept = {r["principle_id"] for r in state.to_pylist() if r["kept"]}
        support = [None if row is None else sum((v == "for") - (v == "against") for j, v in enumerate(row) if j in kept)
                   for row in table.column("icai_votes").to_pylist()]
        return StageOutput(put_columns(table, {"icai_constitution": pa.array([constitution] * table.num_rows, STRINGS),
                                               "icai_support": pa.array(support, pa.int32())}))


def constitution_of(filter_state: pa.Table) -> list[str]:
    """The kept principles of a filter state, in rank order. Example: constitution_of(state) -> ['Select the response that ...']"""
    rows = [r for r in filter_state.to_pylist() if r["kept"]]
    return [r["principle"] for r in sorted(rows, key=lambda r: r["rank"])]
