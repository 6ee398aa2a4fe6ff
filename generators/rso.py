"""RSO, statistical rejection sampling (METHODS.md §8.4): draw candidates closer to the optimal policy, then pair them.

Goal: samples from π*(y|x) ∝ π_sft(y|x)·exp(r(x,y)/β), given N candidates sampled from π_sft and
their rewards. Algorithm (§8.4, Liu et al. 2309.06657 Alg. 1):
- repeat until `m` are accepted: r_max = the highest reward among the *remaining* candidates;
  each remaining candidate, in candidate order, is accepted with probability
  `exp((r_i − r_max)/β)` and leaves the pool; stop as soon as m are accepted.
  The best remaining candidate is always accepted, so every round accepts at least one.
- Candidates without a reward (null / NaN) are not in the pool; a row with fewer than m valid
  candidates accepts all of them.
- Every row draws from its own generator, seeded by `row_seed(row id, "<stage id>:accept", seed)`,
  so re-sharding changes nothing.

`rso_accept` is the vectorised core (a batch of rows sharing one generator, or one row);
`rso_sample(frame)` adds `rso_accepted` (candidate indices in acceptance order) and `rso_round`
(the round each was accepted in); the stage `pairs.rso` then pairs the accepted candidates with
`pairs.from_scores`'s rules over them only (`mode: best_worst` by default, `best_random`,
`best_random_other`, `all_pairs`), labelled by the given reward. To label them with a pairwise
judge instead, follow with `judges.pairwise` (`action: relabel`). Defaults N=64, m=8, β=0.5 are
§8.4's, marked unverified there. Leaves out: generating the candidates, the reward model, and the
sigmoid / hinge training losses.

Example: acceptance_probabilities([1.0, 1 - math.log(2), 1 - math.log(4)], beta=1.0) -> [1.0, 0.5, 0.25]
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.adapters import accepts_frames
from curate.contract import RESPONSES, StageOutput, put_columns, require, with_fields
from curate.errors import SchemaError
from curate.filters.margins import as_float
from curate.keys import row_seed
from curate.pairing import PairFromScores, PairParams
from curate.registry import register

RSO_M = 8  # §8.4 (d), unverified
RSO_BETA = 0.5  # §8.4 (d), unverified
INDICES = pa.list_(pa.int32())


def acceptance_probabilities(rewards: Any, beta: float = RSO_BETA) -> np.ndarray:
    """First-round acceptance probabilities `exp((r_i − r_max)/β)` of one pool (NaN rewards: 0).

    Example: acceptance_probabilities([1.0, 0.30685, -0.38629], 1.0) -> array([1.0, 0.5, 0.25])
    """
    r = as_float(rewards)
    valid = ~np.isnan(r)
    if not valid.any():
        return np.zeros_like(r)
    return np.where(valid, np.exp((np.where(valid, r, 0.0) - r[valid].max()) / beta), 0.0)


def rso_accept(rewards: Any, m: int = RSO_M, beta: float = RSO_BETA,
               rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rejection sampling of §8.4 on one pool (shape (N,)) or a batch of pools (shape (R, N)).

    Returns `(position, round)`, both integer arrays shaped like `rewards`: the 0-based order in
    which a candidate was accepted (−1: not accepted) and the round it was accepted in (0: not
    accepted). Each round draws one uniform per candidate of every row still sampling, in
    candidate order. Example: rso_accept([2.0, 0.0, 1.0], m=1)[0] -> array([ 0, -1, -1])
    """
    if m < 1:
        raise ValueError(f"m must be at least 1, got {m}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    rng = rng if rng is not None else np.random.default_rng(0)
    r = np.atleast_2d(as_float(rewards))
    valid = ~np.isnan(r)
    target = np.minimum(m, valid.sum(axis=1))
    remaining = valid.copy()
    count = np.zeros(len(r), np.int64)
    position = np.full(r.shape, -1, np.int64)
    rounds = np.zeros(r.shape, np.int64)
    k = 0
    while (count < target).any():
        k += 1
        active = (count < target)[:, None]
        r_max = np.where(remaining, r, -np.inf).max(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", over="ignore"):
            p = np.where(remaining, np.exp((np.where(remaining, r, 0.0) - np.where(active, r_max, 0.0)) / beta), 0.0)
        hit = remaining & active & (rng.random(r.shape) < p)
        order = count[:, None] + np.cumsum(hit, axis=1)
        hit &= order <= target[:, None]  # stop as soon as m are accepted
        position[hit] = order[hit] - 1
        rounds[hit] = k
        remaining &= ~hit
        count += hit.sum(axis=1)
    shape = np.shape(rewards)
    return position.reshape(shape), rounds.reshape(shape)


def accepted_lists(rewards: list[list[float | None] | None], ids: list[str], m: int, beta: float, scope: str,
                   seed: int) -> tuple[list[list[int] | None], list[list[int] | None]]:
    """Per row: the accepted candidate indices in acceptance order, and their rounds (row-seeded draws).

    Example: accepted_lists([[1.0, None]], ["r1"], 8, 0.5, "rso:accept", 0) -> ([[0]], [[1]])
    """
    accepted: list[list[int] | None] = []
    rounds: list[list[int] | None] = []
    for row_id, row in zip(ids, rewards):
        if row is None:
            accepted.append(None)
            rounds.append(None)
            continue
        rng = np.random.default_rng(row_seed(row_id, scope, seed))
        position, rnd = rso_accept(np.array([np.nan if v is None else v for v in row], np.float64), m, beta, rng)
        order = sorted((int(pos), i) for i, pos in enumerate(position) if pos >= 0)
        accepted.append([i for _, i in order])
        rounds.append([int(rnd[i]) for _, i in order])
    return accepted, rounds


@accepts_frames
def rso_sample(table: pa.Table, rewards: str = "rewards", m: int = RSO_M, beta: float = RSO_BETA, seed: int = 0,
               scope: str = "rso:accept") -> pa.Table:
    """Add `rso_accepted` (indices in acceptance order) and `rso_round` for every candidate row (§8.4).

    Needs an `id` column (the row seeds hash it with `scope` and `seed`).
    Example: rso_sample(t, rewards="cdr_rewards", m=2, beta=0.5).column("rso_accepted")
    """
    values = pc.cast(table.column(rewards), pa.list_(pa.float64())).to_pylist()
    accepted, rounds = accepted_lists(values, table.column("id").to_pylist(), m, beta, scope, seed)
    return put_columns(table, {"rso_accepted": pa.array(accepted, INDICES), "rso_round": pa.array(rounds, INDICES)})


class RSOParams(PairParams):
    """Params of pairs.rso. Example: RSOParams(scores="cdr_rewards", m=8, beta=0.5)"""

    m: int = Field(RSO_M, ge=2, description="candidates to accept per prompt (§8.4)")
    beta: float = Field(RSO_BETA, gt=0, description="β of the target policy π* ∝ π_sft·exp(r/β)")


@register
class RSOPairs(PairFromScores):
    """Accept m candidates by rejection sampling on their reward, then pair the accepted ones (module docstring).

    Writes `rso_accepted`, `rso_round` and `rso_scores` (the rewards of the accepted candidates,
    null for the others) on every pair; counters `accepted`, `rounds`. Drop reasons are
    `pairs.from_scores`'s (`fewer_than_2_scores`, `tie`, `identical_texts`, ...).
    Example: - stage: pairs.rso
               params: {scores: cdr_rewards, m: 8, beta: 0.5, mode: best_worst}
    """

    name = "pairs.rso"
    Params = RSOParams

    def __init__(self, params: RSOParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        p = self.params
        self.pairing = PairFromScores(PairParams(scores="rso_scores", responses=p.responses, mode=p.mode),
                                      seed=seed, stage_id=self.stage_id)

    def _annotated(self, schema: pa.Schema) -> pa.Schema:
        p = self.params
        require(schema, {"id": pa.string(), p.responses: RESPONSES}, self.name)
        stype = schema.field(p.scores).type if p.scores in schema.names else None
        if stype is None or not (pa.types.is_list(stype) and (pa.types.is_floating(stype.value_type)
                                                              or pa.types.is_integer(stype.value_type))):
            raise SchemaError(f"needs a list-of-numbers reward column '{p.scores}'; the input has: "
                              f"{', '.join(f'{f.name} ({f.type})' for f in schema)}", where=f"stage '{self.name}'")
        return with_fields(schema, {"rso_accepted": INDICES, "rso_round": INDICES, "rso_scores": pa.list_(pa.float64())})

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        return self.pairing.output_schema(self._annotated(schema))

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        rewards = pc.cast(table.column(p.scores), pa.list_(pa.float64())).to_pylist()
        accepted, rounds = accepted_lists(rewards, table.column("id").to_pylist(), p.m, p.beta,
                                          f"{self.stage_id}:accept", self.seed)
        kept = [None if row is None else [v if i in acc else None for i, v in enumerate(row)]
                for row, acc in zip(rewards, accepted)]
        annotated = put_columns(table, {"rso_accepted": pa.array(accepted, INDICES), "rso_round": pa.array(rounds, INDICES),
                                        "rso_scores": pa.array(kept, pa.list_(pa.float64()))})
        paired = self.pairing.apply(annotated)
        rejected = paired.rejected
        if rejected is not None:
            rejected = rejected.select(table.column_names + ["reason"])
        counters = {"rows": table.num_rows, "pairs": paired.table.num_rows,
                    "accepted": sum(len(a) for a in accepted if a), "rounds": sum(max(r) for r in rounds if r)}
        return StageOutput(paired.table, rejected, counters)
