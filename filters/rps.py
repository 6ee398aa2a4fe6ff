"""RPS consensus (METHODS.md §6C): keep a pair only if its winner is robust to small turns of the preference direction.

The objectives are per-aspect ratings (`judges.ultrafeedback`'s `uf_ratings`: one list of 1-5
ratings per aspect, one rating per candidate). A target direction `v` over the aspects (weights,
normalised to a unit vector; default equal weights) scores a candidate as `⟨r, v⟩` (§6C (b)).
`k` neighbour directions are drawn uniformly from the spherical cap of half-angle `angle` around
`v` (seeded by the stage id and the pipeline seed, the same for every row, so re-sharding
changes nothing): a neighbour is `cos φ·v + sin φ·u`, `u` a uniform unit vector orthogonal to
`v`, `φ` drawn with density ∝ sin^(d−2) φ on [0, angle] (the cap's own measure; rejection
sampling), `d` the number of aspects.
- *Pair rows* (`chosen_index` / `rejected_index` into the ratings, as `pairs.from_scores` leaves
  them): `rps_score_chosen`, `rps_score_rejected` = `⟨r, v⟩`, and `rps_consensus` = the share of
  neighbours under which the winner under v still wins strictly. `filters.rps` keeps a pair only
  if v prefers its chosen reply and `rps_consensus > min_consensus` (0.5: "most neighbours",
  §6C (b)); drop reasons `rps_unrated` (a rating missing), `rps_tie` (equal under v),
  `rps_reversed` (v prefers the rejected reply), `rps_no_consensus`.
- *Candidate rows*: `rps_scores` (`⟨r_i, v⟩` per candidate; pair on them with `pairs.from_scores`)
  and `rps_consensus` = the share of neighbours under which v's best candidate stays strictly best.
How demanding the rule is: the cap is symmetric around v, so a pair that v decides wins, in
expectation, under at least half of the neighbours; its share falls towards one half as its
rating difference turns orthogonal to v (in two aspects, a difference β° from v wins under a share
(90 − β + angle) / (2·angle) of the cap once β > 90 − angle, and under all of it before). At the
default `min_consensus` 0.5 the filter drops the pairs within the sampling noise of that
boundary (and v's ties and reversals); a higher `min_consensus` or a wider `angle` asks more.
Defaults `k = 16`, `angle = 20°` are ours: the neighbourhood size and angle are [unverified] in §6C.
Leaves out: the paper's preference-conditioned models (generating candidates *from* the
neighbour directions, a multi-objective reward model); here the directions only re-weigh ratings
a judge already gave.

Example: neighbour_directions([1, 1], k=4, angle=20, seed=0).shape -> (4, 2)
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.adapters import accepts_frames
from curate.contract import Params, Stage, Verdict, keep_all, mark_dropped, put_columns, require, with_fields
from curate.errors import SchemaError
from curate.filters.margins import float_column, kept_rows
from curate.keys import row_seed
from curate.registry import register

NEIGHBOURS = 16  # k: ours, §6C (d) leaves it [unverified]
ANGLE = 20.0  # degrees: ours, §6C (d) leaves it [unverified]
MIN_CONSENSUS = 0.5  # §6C (b): the winner must also win under *most* neighbours (strictly more than half)
PAIR_FIELDS = {"rps_score_chosen": pa.float64(), "rps_score_rejected": pa.float64(), "rps_consensus": pa.float64()}
CANDIDATE_FIELDS = {"rps_scores": pa.list_(pa.float64()), "rps_consensus": pa.float64()}


def unit(vector: Iterable[float]) -> np.ndarray:
    """The vector scaled to length 1. Example: unit([3, 4]) -> array([0.6, 0.8])"""
    v = np.asarray(list(vector), dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if v.ndim != 1 or not v.size or norm == 0.0 or not math.isfinite(norm):
        raise ValueError(f"a direction needs finite weights, not all zero: {list(v)}")
    return v / norm


def neighbour_directions(direction: Iterable[float], k: int = NEIGHBOURS, angle: float = ANGLE, seed: int = 0) -> np.ndarray:
    """`k` unit directions drawn uniformly from the cap of half-angle `angle` (degrees) around `direction`.

    Rows of a (k, d) array. With one aspect there is no other direction: every row is `v`.
    Example: neighbour_directions([1, 0], k=2, angle=10, seed=0) -> two unit vectors within 10° of (1, 0)
    """
    v = unit(direction)
    if not 0.0 < angle <= 90.0:
        raise ValueError(f"angle must be in (0, 90] degrees, got {angle}")
    d, theta = v.size, math.radians(angle)
    rng = np.random.default_rng(seed)
    out = np.empty((k, d))
    for n in range(k):
        if d == 1:
            out[n] = v
            continue
        while True:  # φ with density ∝ sin^(d−2) φ on [0, θ]: uniform on the cap
            phi = rng.uniform(0.0, theta)
            if d == 2 or rng.uniform() <= (math.sin(phi) / math.sin(theta)) ** (d - 2):
                break
        u = rng.standard_normal(d)
        u -= u.dot(v) * v  # orthogonal to v, uniform direction within that hyperplane
        u /= np.linalg.norm(u)
        out[n] = math.cos(phi) * v + math.sin(phi) * u
    return out


def pair_consensus(chosen: Iterable[float], rejected: Iterable[float], v: np.ndarray, neighbours: np.ndarray) -> tuple[float, float, float | None]:
    """(⟨chosen, v⟩, ⟨rejected, v⟩, share of neighbours under which v's winner wins strictly; None on a tie under v).

    Example: pair_consensus([5, 1], [1, 5], unit([1, 1]), neighbours) -> (4.24, 4.24, None)
    """
    diff = np.asarray(list(chosen), float) - np.asarray(list(rejected), float)
    under_v = float(diff @ v)
    score_c, score_r = float(np.asarray(list(chosen), float) @ v), float(np.asarray(list(rejected), float) @ v)
    if under_v == 0.0:
        return score_c, score_r, None
    agree = np.sign(neighbours @ diff) == np.sign(under_v)
    return score_c, score_r, float(agree.mean())


def best_consensus(ratings: np.ndarray, v: np.ndarray, neighbours: np.ndarray) -> tuple[list[float], float | None]:
    """Candidate rows: (⟨r_i, v⟩ per candidate, share of neighbours under which v's strict best stays strictly best).

    `ratings` is (candidates, aspects). None when v's best is tied. Example: best_consensus(np.array([[5, 1], [1, 5]]), v, nb)
    """
    scores = ratings @ v
    best = int(np.argmax(scores))
    if (scores == scores[best]).sum() > 1:
        return scores.tolist(), None
    under = ratings @ neighbours.T  # (candidates, k)
    others = np.delete(under, best, axis=0)
    return scores.tolist(), float((under[best] > others.max(axis=0)).mean()) if others.size else 1.0


def rating_matrix(row: dict[str, list[float | None]] | None, aspects: list[str]) -> np.ndarray:
    """(candidates, aspects) ratings of one row, NaN where missing. Example: rating_matrix({"a": [4, None]}, ["a"])"""
    lists = [(row or {}).get(a) or [] for a in aspects]
    n = max((len(x) for x in lists), default=0)
    return np.array([[np.nan if i >= len(x) or x[i] is None else x[i] for x in lists] for i in range(n)], dtype=np.float64).reshape(n, len(aspects))


class RPSParams(Params):
    """Params of filters.rps. Example: RPSParams(direction={"helpfulness": 1.0, "honesty": 0.5}, k=16, angle=20)"""

    ratings: str = Field("uf_ratings", description="struct column of per-aspect rating lists (judges.ultrafeedback)")
    direction: dict[str, float] | None = Field(None, description="aspect -> weight of the target direction v (default: equal weights over every aspect)")
    k: int = Field(NEIGHBOURS, ge=1, description="neighbour directions (ours; [unverified] in §6C)")
    angle: float = Field(ANGLE, gt=0, le=90, description="half-angle of the neighbourhood, degrees (ours; [unverified] in §6C)")
    min_consensus: float = Field(MIN_CONSENSUS, ge=0, lt=1, description="keep when the share of agreeing neighbours is above this")


def aspects_of(schema: pa.Schema, p: RPSParams) -> list[str]:
    """The aspects of the direction, checked against the ratings struct. Example: ['helpfulness', 'honesty']"""
    if p.ratings not in schema.names or not pa.types.is_struct(schema.field(p.ratings).type):
        raise SchemaError(f"needs a struct column '{p.ratings}' of per-aspect rating lists (judges.ultrafeedback's uf_ratings)",
                          where="stage 'filters.rps'")
    fields = [f.name for f in schema.field(p.ratings).type]
    aspects = list(p.direction) if p.direction else fields
    unknown = [a for a in aspects if a not in fields]
    if unknown:
        raise SchemaError(f"direction names aspects {unknown} that '{p.ratings}' lacks (it has {fields})", where="stage 'filters.rps'")
    return aspects


def rps_columns(table: pa.Table, p: RPSParams, scope: str = "rps", seed: int = 0) -> dict[str, pa.Array]:
    """The `rps_*` columns of pair rows (with chosen_index / rejected_index) or candidate rows (module docstring).

    Example: rps_columns(pairs, RPSParams())["rps_consensus"]
    """
    aspects = aspects_of(table.schema, p)
    v = unit([p.direction[a] for a in aspects] if p.direction else [1.0] * len(aspects))
    neighbours = neighbour_directions(v, p.k, p.angle, row_seed("neighbours", scope, seed))
    rows = table.column(p.ratings).to_pylist()
    pairs = {"chosen_index", "rejected_index"} <= set(table.column_names)
    if not pairs:
        scores, consensus = [], []
        for row in rows:
            matrix = rating_matrix(row, aspects)
            if not len(matrix) or np.isnan(matrix).any():
                scores.append([None if np.isnan(r).any() else float(r @ v) for r in matrix])
                consensus.append(np.nan)
                continue
            s, c = best_consensus(matrix, v, neighbours)
            scores.append(s)
            consensus.append(np.nan if c is None else c)
        return {"rps_scores": pa.array(scores, CANDIDATE_FIELDS["rps_scores"]), "rps_consensus": float_column(np.array(consensus, float))}
    out = np.full((table.num_rows, 3), np.nan)
    for r, (row, c, j) in enumerate(zip(rows, table.column("chosen_index").to_pylist(), table.column("rejected_index").to_pylist())):
        matrix = rating_matrix(row, aspects)
        if c is None or j is None or max(c, j) >= len(matrix) or np.isnan(matrix[[c, j]]).any():
            continue
        score_c, score_r, share = pair_consensus(matrix[c], matrix[j], v, neighbours)
        out[r] = (score_c, score_r, np.nan if share is None else share)
    return {name: float_column(out[:, i]) for i, name in enumerate(PAIR_FIELDS)}


def rps_verdict(table: pa.Table, p: RPSParams, scope: str = "rps", seed: int = 0) -> Verdict:
    """The pair rows with their `rps_*` columns, a keep mask and reasons (module docstring).

    Example: rps_verdict(pairs, RPSParams(min_consensus=0.5)).reason
    """
    columns = rps_columns(table, p, scope, seed)
    if "rps_score_chosen" not in columns:
        raise SchemaError("filters.rps keeps or drops pair rows: it needs chosen_index / rejected_index (pair with pairs.from_scores first)",
                          where="stage 'filters.rps'")
    out = put_columns(table, columns)
    chosen, rejected, consensus = (out.column(n) for n in PAIR_FIELDS)
    keep, reason = keep_all(out.num_rows)
    keep, reason = mark_dropped(keep, reason, pc.or_(pc.is_null(chosen), pc.is_null(rejected)), "rps_unrated")
    keep, reason = mark_dropped(keep, reason, pc.equal(chosen, rejected), "rps_tie")
    keep, reason = mark_dropped(keep, reason, pc.less(chosen, rejected), "rps_reversed")
    keep, reason = mark_dropped(keep, reason, pc.less_equal(consensus, p.min_consensus), "rps_no_consensus")
    return Verdict(out, keep, reason)


@accepts_frames
def rps_consensus(table: pa.Table, direction: dict[str, float] | None = None, k: int = NEIGHBOURS, angle: float = ANGLE,
                  ratings: str = "uf_ratings", seed: int = 0) -> pa.Table:
    """Add the `rps_*` columns (pair rows: scores and `rps_consensus`; candidate rows: `rps_scores`, `rps_consensus`).

    Example: rps_consensus(pairs, {"helpfulness": 1, "honesty": 1}).column("rps_consensus")
    """
    p = RPSParams(ratings=ratings, direction=direction, k=k, angle=angle)
    return put_columns(table, rps_columns(table, p, "rps", seed))


@accepts_frames
def rps_filter(table: pa.Table, direction: dict[str, float] | None = None, k: int = NEIGHBOURS, angle: float = ANGLE,
               min_consensus: float = MIN_CONSENSUS, ratings: str = "uf_ratings", seed: int = 0) -> pa.Table:
    """The pairs whose winner under v is the chosen reply and wins under most neighbours, with their `rps_*` columns.

    Same neighbours as the stage `filters.rps` with id `rps` and the same seed. Example: rps_filter(pairs, k=16, angle=20)
    """
    p = RPSParams(ratings=ratings, direction=direction, k=k, angle=angle, min_consensus=min_consensus)
    return kept_rows(rps_verdict(table, p, "rps", seed))


@register
class RPSFilter(Stage):
    """Keep pairs whose winner holds under most neighbour directions (module docstring).

    Example: - stage: filters.rps
               params: {direction: {helpfulness: 1, honesty: 1}, k: 16, angle: 20}
    """

    name = "filters.rps"
    kind = "filter"
    Params = RPSParams
    uses_seed = True

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), "chosen_index": pa.int32(), "rejected_index": pa.int32()}, self.name)
        aspects_of(schema, self.params)
        return with_fields(schema, PAIR_FIELDS)

    def keep(self, table: pa.Table) -> Verdict:
        return rps_verdict(table, self.params, self.stage_id, self.seed)

