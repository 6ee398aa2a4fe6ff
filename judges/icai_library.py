"""ICAI as a library call and its artifacts (METHODS.md §4 (b)): `mine_principles` and `Constitution`.

`mine_principles(pairs, model=...)` runs the ICAI stages in this process on a pyarrow / polars /
pandas / `datasets` pair table (`prompt`, `chosen`, `rejected`; or §4 (b)'s `text_a`, `text_b`,
`preferred` in {a, b}, ties removed with a warning) and returns a `Constitution`: the ordered
principles, the per-principle table (votes, acc, relevance, perf, kept, drop reason, rank), the
clusters, the votes, and with `holdout > 0` the agreement on the held-out rows of the
constitutional annotator, the no-constitution annotator and the 50% baseline (§4 (c) 6).
`Constitution.save(folder)` writes the five artifacts of §4 (b):
`principles_candidates.jsonl`, `clusters.json`, `votes.parquet`, `principle_metrics.parquet`,
`constitution.json`. A pipeline run with `judges.icai_filter` gets the same files in
`<run>/icai/`, from the published fitted states and data (`write_icai_artifacts`, called by the
runner after publishing). Leaves out: the stages themselves (`icai_stages`, `icai_fit`).

Example: print(mine_principles(pairs, model="smollm2-135m-instruct", holdout=0.2))
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.adapters import to_arrow
from curate.errors import InputError
from curate.filters.near_dup import DEFAULT_EMBEDDER
from curate.judges.constitution import ConstitutionJudge, ConstitutionParams, evaluation
from curate.judges.icai import numbered
from curate.judges.icai_fit import CLUSTER_STATE, ClusterParams, FilterParams, ICAICluster, ICAIFilter, constitution_of
from curate.judges.icai_stages import EmbedParams, ICAIEmbed, ICAIPropose, ICAIVote, ProposeParams, VoteParams
from curate.record import load_run
from curate.sources import normalize
from curate.store import write_parquet_atomic, write_text_atomic

log = logging.getLogger(__name__)

ARTIFACTS = ("principles_candidates.jsonl", "clusters.json", "votes.parquet", "principle_metrics.parquet", "constitution.json")
VOTES_SCHEMA = pa.schema([("row_id", pa.string()), ("principle_id", pa.int32()), ("vote", pa.string())])


def votes_long(table: pa.Table) -> pa.Table:
    """(row_id, principle_id, vote) for every voted row and principle (votes.parquet of §4 (b)).

    Example: votes_long(t).column("vote").to_pylist()[:2] -> ['for', 'abstain']
    """
    if "icai_votes" not in table.column_names:
        return VOTES_SCHEMA.empty_table()
    rows = [(row_id, j, v) for row_id, votes in zip(table.column("id").to_pylist(), table.column("icai_votes").to_pylist())
            for j, v in enumerate(votes or [])]
    return pa.table({"row_id": [r[0] for r in rows], "principle_id": [r[1] for r in rows], "vote": [r[2] for r in rows]},
                    schema=VOTES_SCHEMA)


@dataclass
class Constitution:
    """A mined constitution with everything that explains it (module docstring).

    Example: Constitution.load("out/icai/icai").principles[0] -> 'Select the response that ...'
    """

    principles: list[str]
    metrics: pa.Table
    clusters: pa.Table
    votes: pa.Table
    evaluation: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return numbered(self.principles)

    def to_json(self) -> dict[str, Any]:
        """constitution.json: the ordered principles, their metrics, the evaluation, the settings.

        Example: constitution.to_json()["principles"] -> ['Select the response that ...', ...]
        """
        kept = sorted((r for r in self.metrics.to_pylist() if r["kept"]), key=lambda r: r["rank"])
        return {"principles": self.principles, "metrics": kept, "principles_tested": self.metrics.num_rows,
                "evaluation": self.evaluation, "config": self.config}

    def cluster_summary(self) -> list[dict[str, Any]]:
        """clusters.json: per principle id its drawn principle, size and distinct members with counts."""
        out: dict[int, dict[str, Any]] = {}
        for r in self.clusters.to_pylist():
            entry = out.setdefault(r["principle_id"], {"principle_id": r["principle_id"], "principle": r["principle"],
                                                       "size": 0, "members": {}})
            entry["size"] += 1
            entry["members"][r["candidate"]] = entry["members"].get(r["candidate"], 0) + 1
        return [{**e, "members": [{"text": t, "count": c} for t, c in sorted(e["members"].items(), key=lambda kv: -kv[1])]}
                for _, e in sorted(out.items())]

    def save(self, folder: str) -> list[str]:
        """Write the five artifacts of §4 (b) into `folder` (atomically, one by one); returns their paths.

        Example: constitution.save("out/my_icai") -> ['out/my_icai/principles_candidates.jsonl', ...]
        """
        paths = [os.path.join(folder, name) for name in ARTIFACTS]
        lines = [json.dumps({"row_id": r["row_id"], "index": r["index"], "candidate": r["candidate"],
                             "principle_id": r["principle_id"], "drawn": r["drawn"]}, ensure_ascii=False)
                 for r in self.clusters.to_pylist()]
        write_text_atomic("".join(line + "\n" for line in lines), paths[0])
        write_text_atomic(json.dumps(self.cluster_summary(), indent=2, ensure_ascii=False), paths[1])
        write_parquet_atomic(self.votes, paths[2])
        write_parquet_atomic(self.metrics, paths[3])
        write_text_atomic(json.dumps(self.to_json(), indent=2, ensure_ascii=False, default=str), paths[4])
        return paths

    @classmethod
    def load(cls, folder: str) -> "Constitution":
        """Read the artifacts `save` wrote. Example: Constitution.load("out/icai/icai")"""
        def read_json(name: str) -> Any:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                return json.load(f)

        with open(os.path.join(folder, "principles_candidates.jsonl"), encoding="utf-8") as f:
            candidates = [json.loads(line) for line in f if line.strip()]
        drawn = {c["principle_id"]: c["principle"] for c in read_json("clusters.json")}
        clusters = pa.Table.from_pylist([c | {"principle": drawn.get(c["principle_id"])} for c in candidates],
                                        schema=CLUSTER_STATE)
        data = read_json("constitution.json")
        return cls(data["principles"], pq.read_table(os.path.join(folder, "principle_metrics.parquet")), clusters,
                   pq.read_table(os.path.join(folder, "votes.parquet")), data.get("evaluation"), data.get("config") or {})


def as_pair_table(table: pa.Table) -> pa.Table:
    """A pair table in the contract's form (id, prompt messages, chosen, rejected), from either input form.

    `text_a`/`text_b`/`preferred` rows become chosen/rejected; ties (anything but a/b) are removed
    with a warning (§4 (b)); a missing prompt becomes an empty user turn.
    Example: as_pair_table(pa.table({"text_a": ["x"], "text_b": ["y"], "preferred": ["b"]})).column("chosen") -> ['y']
    """
    if "chosen" not in table.column_names and {"text_a", "text_b", "preferred"} <= set(table.column_names):
        preferred = pc.utf8_lower(table.column("preferred").cast(pa.string()))
        decided = pc.fill_null(pc.is_in(preferred, value_set=pa.array(["a", "b"])), False)
        if not pc.all(decided).as_py():
            log.warning("removing %d pairs whose `preferred` is not 'a' or 'b' (ties)", table.num_rows - pc.sum(decided).as_py())
        table, preferred = table.filter(decided), preferred.filter(decided)
        a_wins = pc.equal(preferred, "a")
        table = table.append_column("chosen", pc.if_else(a_wins, table.column("text_a"), table.column("text_b")))
        table = table.append_column("rejected", pc.if_else(a_wins, table.column("text_b"), table.column("text_a")))
    if "chosen" not in table.column_names or "rejected" not in table.column_names:
        raise InputError(f"a pair table needs chosen/rejected or text_a/text_b/preferred; it has {table.column_names}")
    if "prompt" not in table.column_names:
        table = table.append_column("prompt", pa.array([""] * table.num_rows, pa.string()))
    return normalize(table.select([c for c in ("id", "prompt", "chosen", "rejected") if c in table.column_names]),
                     lambda i: f"row {i}")


def mine_principles(pairs: Any, model: str = "smollm2-135m-instruct", *, principles_per_pair: int = 3, clusters: int = 40,
                    seeds: int = 3, combine: str = "unanimous", max_principles: int | None = None,
                    min_relevance: float | None = 0.1, holdout: float = 0.0, embedder: str = DEFAULT_EMBEDDER,
                    seed: int = 0, **backend: Any) -> Constitution:
    """Mine a constitution from a pair table (module docstring); `backend` takes ModelParams fields
    (`backend`, `dtype`, `max_model_len`, `batch_size`, `base_url`, ...).

    Example: mine_principles(df, model="smollm2-135m-instruct", clusters=20, max_principles=5, holdout=0.2)
    """
    table = as_pair_table(to_arrow(pairs)[0])
    stages = [ICAIPropose(ProposeParams(model=model, principles=principles_per_pair, holdout=holdout, **backend), seed=seed),
              ICAIEmbed(EmbedParams(model=embedder)), ICAICluster(ClusterParams(clusters=clusters), seed=seed),
              ICAIVote(VoteParams(model=model, seeds=seeds, combine=combine, **backend), seed=seed),
              ICAIFilter(FilterParams(max_principles=max_principles, min_relevance=min_relevance, embedder=embedder), seed=seed)]
    states: dict[str, pa.Table] = {}
    try:
        for stage in stages:
            state = None
            if stage.kind == "global":
                state = states[stage.name] = stage.fit([table.select(stage.fit_columns(table.schema))])
            table = stage.apply(table, state).table
        principles = constitution_of(states["judges.icai_filter"])
        result = None
        if holdout > 0:
            judge = ConstitutionJudge(ConstitutionParams(model=model, constitution=principles, baseline=True, rows="test",
                                                         **backend), seed=seed)
            result = evaluation(judge.apply(table).counters)
            stages.append(judge)
    finally:
        for stage in stages:
            stage.close()
    config = {s.stage_id: s.params.key_params() for s in stages}
    return Constitution(principles, states["judges.icai_filter"], states["judges.icai_cluster"], votes_long(table), result, config)


def write_icai_artifacts(out_dir: str) -> str | None:
    """The runner's hook: if the run has a `judges.icai_filter` stage, write the §4 (b) artifacts to
    `<out_dir>/icai/` from its published states and data; returns that folder, or None.

    Votes come from the published data's `id` and `icai_votes` columns (format.trl keeps `icai_*`);
    the evaluation from the counters of the last `judges.constitution` stage, if any.
    Example: write_icai_artifacts("out/icai") -> 'out/icai/icai'
    """
    run = load_run(out_dir)
    by_name = {s.stage: s for s in run.plan.stages}  # the last stage of each name
    filter_stage, cluster_stage = by_name.get("judges.icai_filter"), by_name.get("judges.icai_cluster")
    if filter_stage is None or cluster_stage is None:
        return None
    metrics_path, clusters_path = run.state_path(filter_stage.id), run.state_path(cluster_stage.id)
    if metrics_path is None or clusters_path is None:
        log.warning("icai artifacts: the fitted states of %s / %s were not published", cluster_stage.id, filter_stage.id)
        return None
    metrics = pq.read_table(metrics_path)
    files = run.data_files
    names = pq.read_schema(files[0]).names if files else []
    votes = votes_long(pq.read_table(files, columns=["id", "icai_votes"])) if {"id", "icai_votes"} <= set(names) else \
        VOTES_SCHEMA.empty_table()
    judge = by_name.get("judges.constitution")
    result = evaluation(run.stats.stage(judge.id).counters) if judge is not None else None
    config = {s.id: s.params for s in run.plan.stages if s.stage.startswith("judges.icai_")}
    folder = os.path.join(out_dir, "icai")
    Constitution(constitution_of(metrics), metrics, pq.read_table(clusters_path), votes, result, config).save(folder)
    return folder
