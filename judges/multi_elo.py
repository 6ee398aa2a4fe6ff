"""Multi-Elo (METHODS.md §8.2, Style Over Substance): one Elo rating per dimension, never a merged score.

Judges reward long, fluent but wrong answers; rating each dimension (the paper's accuracy,
helpfulness, language) apart and keeping one Elo per dimension lets a pipeline select pairs on
the dimension it cares about (accuracy) instead of on a merged score that fluency can buy.
- *Elo* (§8.2, `curate.judges.elo`): `R_a += K(S_a − E_a)`, K = 32, start 1000, averaged over
  every distinct match order up to `exact_orders` (720), else over `orders` (16) seeded ones.
  Two equal players, A wins: A 1016, B 984.
- *Matches from the listwise judge* (`judges.ultrafeedback`'s `uf_ratings`, one list of 1-5
  ratings per aspect): on each aspect, every two rated candidates of a row play one match, won by
  the higher rating (equal = a draw). Columns `me_<dim>_elo`: one Elo per candidate (null when
  the candidate has no rating on that aspect). Select pairs on a dimension with
  `pairs.from_scores` (`scores: me_accuracy_elo`). On pair rows that carry the candidates'
  ratings and `chosen_index` / `rejected_index` (after pairing), the pair's two Elos are written
  instead (below).
- *Matches from the pairwise judge* (`verdicts: {dim: column}`, pair rows): per dimension a
  column of `judges.pairwise` output for answer a = chosen: a verdict (`fe_verdict`: win / tie /
  lose, one match) or per-sample scores (`fe_scores_ab` / `fe_scores_ba`: lists of [a, b], one
  match per sample; give both orders as a list of columns). Run one pairwise stage per dimension
  (templates `pairwise_accuracy`, `pairwise_helpfulness`, `pairwise_language`) and rename its
  columns with `outputs:`.
- *Pair columns*: `me_<dim>_elo_chosen`, `me_<dim>_elo_rejected`, `me_<dim>_verdict` (win / tie /
  lose for the chosen reply, by the two Elos; null when either is missing). With `select: <dim>`,
  `action: relabel` swaps the pairs that dimension reverses (`curate.pairing.swap_pairs`, every
  `*chosen*` / `*rejected*` column with them, and the `verdicts` columns re-oriented: win <-> lose,
  each [a, b] sample as [b, a]; other judges' `fe_*` columns are left as they were) and drops
  ties (`me_tie`) and unjudged pairs (`me_no_verdict`); `action: drop` drops reversed pairs too (`me_reversed`); `mark` only adds
  the columns. Counters: `verdict_<win|tie|lose>` of the selected dimension, `matches`, `relabelled`.
Leaves out: Elo across rows (players = generator models), the paper's human annotation, and any
claim that the dimension names match the paper's rubrics ([unverified] in §8.2).

Example: elo_ratings([("a", "b", 1.0)], orders=1) -> {'a': 1016.0, 'b': 984.0}
"""
from __future__ import annotations

import re
from typing import Any, Literal, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from curate.adapters import accepts_frames
from curate.contract import Params, Stage, StageOutput, put_columns, require, with_fields, with_reason
from curate.errors import SchemaError
from curate.judges.elo import EXACT_ORDERS, INITIAL, K_FACTOR, ORDERS, Match, elo_ratings
from curate.keys import row_seed
from curate.pairing import swap_pairs
from curate.registry import register

DIMENSION = re.compile(r"[a-z][a-z0-9_]*")
SCORE = {"win": 1.0, "tie": 0.5, "lose": 0.0}


def rating_matches(ratings: Sequence[float | None]) -> list[Match]:
    """One match per two rated candidates, won by the higher rating (equal: a draw).

    Example: rating_matches([4.0, 2.0, None]) -> [(0, 1, 1.0)]
    """
    rated = [i for i, r in enumerate(ratings) if r is not None]
    return [(i, j, SCORE["win"] if ratings[i] > ratings[j] else SCORE["lose"] if ratings[i] < ratings[j] else SCORE["tie"])  # type: ignore[operator]
            for n, i in enumerate(rated) for j in rated[n + 1:]]


def verdict_matches(value: Any) -> list[Match]:
    """Matches of answer "a" (chosen) against "b" from one judge column value: a verdict string, or
    per-sample [a, b] scores (one match each). Example: verdict_matches([[8, 6], [5, 5]]) -> [('a', 'b', 1.0), ('a', 'b', 0.5)]
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [("a", "b", SCORE[value])] if value in SCORE else []
    return [("a", "b", SCORE["win"] if a > b else SCORE["lose"] if a < b else SCORE["tie"])
            for a, b in (s for s in value if s is not None and len(s) == 2 and None not in s)]


def verdict_of(chosen: float | None, rejected: float | None) -> str | None:
    """win / tie / lose for the chosen reply by its Elo. Example: verdict_of(1016.0, 984.0) -> 'win'"""
    if chosen is None or rejected is None:
        return None
    return "win" if chosen > rejected else "lose" if chosen < rejected else "tie"


def candidate_elos(ratings: Sequence[float | None], k: float = K_FACTOR, initial: float = INITIAL, orders: int = ORDERS,
                   seed: int = 0, exact_orders: int = EXACT_ORDERS) -> list[float | None]:
    """One dimension of one row: each candidate's Elo from the matches of its ratings (None: unrated).

    A candidate rated alone keeps `initial`. Example: candidate_elos([5.0, 1.0]) -> [1016.0, 984.0]
    """
    elos = elo_ratings(rating_matches(ratings), k, initial, orders, seed, exact_orders)
    return [None if r is None else elos.get(i, initial) for i, r in enumerate(ratings)]


def dimension_names(schema: pa.Schema, ratings: str, dimensions: list[str] | None) -> list[str]:
    """The dimensions to rate: `dimensions`, or every field of the ratings struct. Example: ['accuracy', 'helpfulness']"""
    if ratings not in schema.names or not pa.types.is_struct(schema.field(ratings).type):
        raise SchemaError(f"needs a struct column '{ratings}' of per-aspect rating lists (judges.ultrafeedback's uf_ratings)",
                          where="stage 'judges.multi_elo'")
    fields = {f.name: f.type for f in schema.field(ratings).type}
    names = dimensions or list(fields)
    for name in names:
        if name not in fields or not pa.types.is_list(fields[name]):
            raise SchemaError(f"'{ratings}' has no rating list '{name}' (it has {sorted(fields)})", where="stage 'judges.multi_elo'")
    return names


def elo_fields(dimensions: list[str], pairs: bool) -> dict[str, pa.DataType]:
    """Output columns. Example: elo_fields(["accuracy"], pairs=False) -> {'me_accuracy_elo': list<double>}"""
    if not pairs:
        return {f"me_{d}_elo": pa.list_(pa.float64()) for d in dimensions}
    out: dict[str, pa.DataType] = {}
    for d in dimensions:
        out |= {f"me_{d}_elo_chosen": pa.float64(), f"me_{d}_elo_rejected": pa.float64(), f"me_{d}_verdict": pa.string()}
    return out


class MultiEloParams(Params):
    """Params of judges.multi_elo. Example: MultiEloParams(ratings="uf_ratings", select="accuracy", action="relabel")"""

    ratings: str = Field("uf_ratings", description="struct column of per-aspect rating lists (judges.ultrafeedback)")
    dimensions: list[str] | None = Field(None, description="aspects to rate (default: every field of `ratings`)")
    verdicts: dict[str, str | list[str]] | None = Field(
        None, description="pair rows: dimension -> judges.pairwise column(s) (fe_verdict, or fe_scores_ab / fe_scores_ba)")
    k: float = Field(K_FACTOR, gt=0, description="Elo K factor (§8.2: 32)")
    initial: float = Field(INITIAL, description="starting rating (§8.2: 1000)")
    orders: int = Field(ORDERS, ge=1, description="seeded match orders averaged when there are more than exact_orders (§8.2)")
    exact_orders: int = Field(EXACT_ORDERS, ge=0, description="play every distinct order when there are at most this many (0: always sample)")
    select: str | None = Field(None, description="pair rows: the dimension whose verdict `action` acts on")
    action: Literal["mark", "relabel", "drop"] = Field("mark", description="pair rows with `select`: mark, relabel (swap reversed), drop reversed")

    @field_validator("dimensions")
    @classmethod
    def _names(cls, names: list[str] | None) -> list[str] | None:
        for name in names or []:
            if not DIMENSION.fullmatch(name):
                raise ValueError(f"dimension {name!r} must be lowercase letters, digits and '_'")
        return names

    @field_validator("verdicts")
    @classmethod
    def _verdict_names(cls, verdicts: dict[str, Any] | None) -> dict[str, Any] | None:
        cls._names(list(verdicts or {}))
        return verdicts


def _dimensions(p: MultiEloParams, schema: pa.Schema) -> tuple[list[str], bool]:
    """(dimensions, whether the output is per pair)."""
    if p.verdicts:
        return list(p.verdicts), True
    return dimension_names(schema, p.ratings, p.dimensions), {"chosen_index", "rejected_index"} <= set(schema.names)


def _pair_elos(matches: list[Match], p: MultiEloParams, seed: int) -> tuple[float | None, float | None]:
    if not matches:
        return None, None
    elos = elo_ratings(matches, p.k, p.initial, p.orders, seed, p.exact_orders)
    return elos["a"], elos["b"]


def elo_columns(table: pa.Table, p: MultiEloParams, scope: str = "multi_elo", seed: int = 0) -> tuple[dict[str, pa.Array], int]:
    """The `me_*` columns of a table and the number of matches played (see the module docstring).

    Every row's match orders are seeded from (row id, scope, dimension, seed); pair rows carrying
    their prompt's ratings use `prompt_id`, so their Elos are those of the prompt's row. Example: elo_columns(t, MultiEloParams())[0].keys()
    """
    dimensions, pairs = _dimensions(p, table.schema)
    ids = table.column("id").to_pylist()
    if pairs and not p.verdicts and "prompt_id" in table.column_names:  # the same tournament as on the prompt's row
        ids = [pid if pid is not None else rid for pid, rid in zip(table.column("prompt_id").to_pylist(), ids)]
    cols: dict[str, list] = {name: [] for name in elo_fields(dimensions, pairs)}
    matches_played = 0
    ratings = table.column(p.ratings).to_pylist() if not p.verdicts else None
    indices = (list(zip(table.column("chosen_index").to_pylist(), table.column("rejected_index").to_pylist()))
               if pairs and not p.verdicts else None)
    for d in dimensions:
        sources = p.verdicts[d] if p.verdicts else None
        sources = [sources] if isinstance(sources, str) else sources
        values = [table.column(c).to_pylist() for c in sources] if sources else None
        for r, row_id in enumerate(ids):
            seed_d = row_seed(row_id, f"{scope}:{d}", seed)
            if values is not None:  # pairwise verdicts: a (chosen) against b (rejected)
                matches = [m for column in values for m in verdict_matches(column[r])]
                matches_played += len(matches)
                chosen, rejected = _pair_elos(matches, p, seed_d)
            else:
                row = (ratings[r] or {}).get(d) or []  # type: ignore[index]
                matches_played += len(rating_matches(row))
                elos = candidate_elos(row, p.k, p.initial, p.orders, seed_d, p.exact_orders)
                if not pairs:
                    cols[f"me_{d}_elo"].append(elos)
                    continue
                c, j = indices[r]  # type: ignore[index]
                chosen = elos[c] if c is not None and c < len(elos) else None
                rejected = elos[j] if j is not None and j < len(elos) else None
            cols[f"me_{d}_elo_chosen"].append(chosen)
            cols[f"me_{d}_elo_rejected"].append(rejected)
            cols[f"me_{d}_verdict"].append(verdict_of(chosen, rejected))
    types = elo_fields(dimensions, pairs)
    return {name: pa.array(values, types[name]) for name, values in cols.items()}, matches_played


def _verdicts(table: pa.Table, dimensions: list[str]) -> dict[str, pa.Array]:
    """`me_<dim>_verdict` recomputed from the (possibly swapped) Elo columns."""
    out = {}
    for d in dimensions:
        chosen, rejected = table.column(f"me_{d}_elo_chosen").to_pylist(), table.column(f"me_{d}_elo_rejected").to_pylist()
        out[f"me_{d}_verdict"] = pa.array([verdict_of(c, r) for c, r in zip(chosen, rejected)], pa.string())
    return out


def _reoriented(table: pa.Table, p: MultiEloParams, flip: pa.ChunkedArray) -> dict[str, pa.Array]:
    """The `verdicts` columns in terms of the swapped pairs: win <-> lose, each [a, b] sample as [b, a]."""
    out = {}
    flips = flip.to_pylist()
    for sources in (p.verdicts or {}).values():
        for name in [sources] if isinstance(sources, str) else sources:
            if name in out or "chosen" in name or "rejected" in name:  # swap_pairs has already swapped those
                continue
            values = table.column(name).to_pylist()
            turned = [v if not f or v is None else {"win": "lose", "lose": "win"}.get(v, v) if isinstance(v, str)
                      else [None if s is None else list(reversed(s)) for s in v] for v, f in zip(values, flips)]
            out[name] = pa.array(turned, table.schema.field(name).type)
    return out


def elo_apply(table: pa.Table, p: MultiEloParams, scope: str = "multi_elo", seed: int = 0) -> StageOutput:
    """The columns, then (pair rows, `select`) the action on the selected dimension's verdict.

    Example: elo_apply(pairs, MultiEloParams(verdicts={"accuracy": "acc_verdict"}, select="accuracy", action="relabel"))
    """
    columns, matches = elo_columns(table, p, scope, seed)
    out = put_columns(table, columns)
    dimensions, pairs = _dimensions(p, table.schema)
    counters: dict[str, int | float] = {"matches": matches}
    if not (pairs and p.select):
        return StageOutput(out, counters=counters)
    verdict = out.column(f"me_{p.select}_verdict")
    counters |= {f"verdict_{v}": int(pc.sum(pc.fill_null(pc.equal(verdict, v), False)).as_py() or 0) for v in SCORE}
    if p.action == "mark":
        return StageOutput(out, counters=counters)
    lose = pc.fill_null(pc.equal(verdict, "lose"), False)
    if p.action == "relabel":
        out = swap_pairs(out, lose)
        out = put_columns(out, _verdicts(out, dimensions) | _reoriented(out, p, lose))
        counters["relabelled"] = int(pc.sum(lose).as_py() or 0)
        verdict = out.column(f"me_{p.select}_verdict")
    reasons = pc.if_else(pc.is_null(verdict), pa.scalar("me_no_verdict"),
                         pc.if_else(pc.equal(verdict, "tie"), pa.scalar("me_tie"), pa.scalar("me_reversed")))
    drop = pc.fill_null(pc.not_equal(verdict, "win"), True)
    rejected = with_reason(out.filter(drop), reasons.filter(drop))
    return StageOutput(out.filter(pc.invert(drop)), rejected if rejected.num_rows else None, counters)


@accepts_frames
def multi_elo_ratings(table: pa.Table, ratings: str = "uf_ratings", dimensions: list[str] | None = None,
              verdicts: dict[str, str | list[str]] | None = None, k: float = K_FACTOR, initial: float = INITIAL,
              orders: int = ORDERS, select: str | None = None, action: str = "mark", seed: int = 0,
              exact_orders: int = EXACT_ORDERS) -> pa.Table:
    """Add the `me_*` Elo columns (module docstring); with `select` and `action` relabel / drop, the kept pairs.

    Example: multi_elo_ratings(rated_candidates)["me_helpfulness_elo"]; multi_elo_ratings(pairs, verdicts={"accuracy": "fe_verdict"})
    """
    p = MultiEloParams(ratings=ratings, dimensions=dimensions, verdicts=verdicts, k=k, initial=initial, orders=orders, exact_orders=exact_orders,
                       select=select, action=action)  # type: ignore[arg-type]
    return elo_apply(table, p, "multi_elo", seed).table


@register
class MultiElo(Stage):
    """One Elo per dimension from per-aspect ratings or per-dimension pairwise verdicts (module docstring).

    Example: - stage: judges.multi_elo
               params: {ratings: uf_ratings}
    """

    name = "judges.multi_elo"
    kind = "map"
    Params = MultiEloParams
    uses_seed = True

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        p = self.params
        require(schema, {"id": pa.string()}, self.name)
        dimensions, pairs = _dimensions(p, schema)
        if p.verdicts:
            require(schema, {"chosen": pa.string(), "rejected": pa.string()}, self.name)
            for d, sources in p.verdicts.items():
                for column in [sources] if isinstance(sources, str) else sources:
                    require(schema, {column: (pa.string(), pa.list_(pa.list_(pa.float64())))}, self.name)
        if p.select is not None and p.select not in dimensions:
            raise SchemaError(f"select '{p.select}' is not one of the dimensions {dimensions}", where=f"stage '{self.name}'")
        if p.select is not None and not pairs:
            raise SchemaError("select acts on pair rows; on candidate rows pair with pairs.from_scores "
                              f"(scores: me_{p.select}_elo)", where=f"stage '{self.name}'")
        return with_fields(schema, elo_fields(dimensions, pairs))

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        # one scope for every multi_elo stage and the library function: a prompt's tournament is the same wherever it is replayed
        return elo_apply(table, self.params, "multi_elo", self.seed)
