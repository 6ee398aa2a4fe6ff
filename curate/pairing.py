"""Pairing: turn a prompt row with scored candidates into chosen / rejected pair rows.

Modes (METHODS.md §1A, §2, §8.3, §8.5):
- `best_worst`: chosen = highest score, rejected = lowest; ties for the max or min go to the first
  index (§1A). Example: [4.33, 2.0, 4.33, 1.0] -> chosen 0, rejected 3, margin 3.33.
- `best_random`: chosen = highest score (first index among maxima), rejected drawn uniformly
  from the valid candidates scoring below the max, with a seed hashed from (row id, stage id,
  global seed) (§2). Example: [1.5, 1.5, 0.2] -> always (0, 2); only all-equal scores are a `tie`.
- `best_random_other`: UltraFeedback's binarization (§8.3): chosen as above, rejected drawn
  uniformly from all the other valid candidates, and a draw that ties the chosen score is dropped
  as `tie` (ties removed). Example: [4.5, 3, 4.5, 2] -> rejected 1, 2 or 3; a draw of 2 is a `tie`.
- `all_pairs`: the best against every other candidate, with `margin`, `curr_rank` (1 = easiest,
  the largest margin) and `curr_stage` for Curry-DPO curricula; each part is sorted by
  (curr_stage, -margin) (§8.5). Example: [5, 4, 3, 2] -> margins 3, 2, 1 -> stages 1, 2, 3.

Explicit drop reasons: `fewer_than_2_scores` (missing or NaN scores and null texts do not count),
`tie` (all valid scores equal, or a pair with zero margin), `identical_texts`,
`scores_length_mismatch`. Also `swap_pairs`: chosen and rejected swapped on flagged rows with every
`*chosen*` / `*rejected*` column, as judges (relabel) and `filters.noise_em` (flip) need, and
`chosen_first`, the seeded presentation order of a pair judge. Leaves out:
scoring itself (judges write the score lists).

Example: - stage: pairs.from_scores
           params: {scores: sr_scores, mode: best_worst}
"""
from __future__ import annotations

import math
import random
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.contract import RESPONSES, Params, Stage, StageOutput, put_columns, require, with_fields, with_reason
from curate.errors import SchemaError
from curate.keys import row_coin, row_seed
from curate.registry import register

Mode = Literal["best_worst", "best_random", "best_random_other", "all_pairs"]

PAIR_FIELDS: dict[str, pa.DataType] = {
    "id": pa.string(),
    "prompt_id": pa.string(),
    "chosen": pa.string(),
    "rejected": pa.string(),
    "chosen_score": pa.float64(),
    "rejected_score": pa.float64(),
    "margin": pa.float64(),
    "chosen_model": pa.string(),
    "rejected_model": pa.string(),
    "chosen_index": pa.int32(),
    "rejected_index": pa.int32(),
    "curr_rank": pa.int32(),
    "curr_stage": pa.int32(),
}


class PairParams(Params):
    """Params of pairs.from_scores. Example: PairParams(scores="cdr_rewards", mode="best_random")"""

    scores: str = Field("scores", description="list column of per-candidate scores, same order as responses")
    responses: str = Field("responses", description="list<struct<text, model, ...>> column of candidates")
    mode: Mode = Field("best_worst", description="best_worst | best_random | best_random_other | all_pairs")


def _valid(score: float | None) -> bool:
    return score is not None and not math.isnan(score)


def choose_pairs(
    scores: list[float | None], texts: list[str | None], mode: Mode, rng: random.Random | None = None
) -> tuple[list[tuple[int, int]], list[str]]:
    """Candidate index pairs (chosen, rejected) for one prompt, and the reasons of dropped ones.

    Example: choose_pairs([4.33, 2.0, 4.33, 1.0], list("abcd"), "best_worst") -> ([(0, 3)], [])
    """
    if len(scores) != len(texts):
        return [], ["scores_length_mismatch"]
    valid = [i for i, s in enumerate(scores) if _valid(s) and texts[i] is not None]
    if len(valid) < 2:
        return [], ["fewer_than_2_scores"]
    best = min(valid, key=lambda i: (-scores[i], i))  # first index among maxima (§1A)
    worst = min(valid, key=lambda i: (scores[i], i))  # first index among minima
    if scores[best] == scores[worst]:
        return [], ["tie"]
    if mode == "best_worst":
        candidates = [(best, worst)]
    elif mode == "best_random":
        others = [i for i in valid if scores[i] < scores[best]]  # §2: drawn among the non-max candidates
        candidates = [(best, others[(rng or random.Random(0)).randrange(len(others))])]
    elif mode == "best_random_other":
        others = [i for i in valid if i != best]  # §8.3: drawn among the other candidates, ties removed below
        candidates = [(best, others[(rng or random.Random(0)).randrange(len(others))])]
    else:
        candidates = [(best, j) for j in valid if j != best]
    pairs, reasons = [], []
    for chosen, rejected in candidates:
        if scores[chosen] == scores[rejected]:
            reasons.append("tie")
        elif texts[chosen] == texts[rejected]:
            reasons.append("identical_texts")
        else:
            pairs.append((chosen, rejected))
    return pairs, reasons


def curriculum_ranks(margins: list[float]) -> list[int]:
    """Rank pairs of one prompt by margin, largest first (1 = easiest), ties by position.

    Example: curriculum_ranks([1.0, 3.0, 2.0]) -> [3, 1, 2]
    """
    order = sorted(range(len(margins)), key=lambda i: (-margins[i], i))
    ranks = [0] * len(margins)
    for rank, i in enumerate(order, start=1):
        ranks[i] = rank
    return ranks


@register
class PairFromScores(Stage):
    """Build pair rows from a `responses` list and a parallel score list (see module docstring).

    Example: mode=best_worst, scores [3, 1] -> one pair, margin 2
    """

    name = "pairs.from_scores"
    kind = "map"
    Params = PairParams
    uses_seed = True

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        p = self.params
        require(schema, {"id": pa.string(), p.responses: RESPONSES}, self.name)
        if p.scores not in schema.names:
            raise SchemaError(f"needs score column '{p.scores}'; the input has: {', '.join(schema.names)}",
                              where=f"stage '{self.name}'")
        stype = schema.field(p.scores).type
        if not (pa.types.is_list(stype) and (pa.types.is_floating(stype.value_type) or pa.types.is_integer(stype.value_type))):
            raise SchemaError(f"column '{p.scores}' is {stype}, expected a list of numbers", where=f"stage '{self.name}'")
        rest = [f for f in schema if f.name not in PAIR_FIELDS and f.name != p.responses]
        out = pa.schema([pa.field(n, t) for n, t in PAIR_FIELDS.items()])
        head = [pa.field("id", pa.string()), pa.field("prompt_id", pa.string())]
        if "prompt" in schema.names:
            head.append(schema.field("prompt"))
        ordered = head + [f for f in out if f.name not in ("id", "prompt_id")]
        return with_fields(pa.schema(ordered), {f.name: f.type for f in rest if f.name != "prompt"})

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        ids = table.column("id").to_pylist()
        responses = table.column(p.responses).to_pylist()
        scores = pc.cast(table.column(p.scores), pa.list_(pa.float64())).to_pylist()
        take, rows, reject_take, reject_reasons = [], [], [], []
        for row, (row_id, cands, cand_scores) in enumerate(zip(ids, responses, scores)):
            cands, cand_scores = cands or [], cand_scores or []
            rng = random.Random(row_seed(row_id, self.stage_id, self.seed)) if p.mode.startswith("best_random") else None
            pairs, reasons = choose_pairs(cand_scores, [c["text"] for c in cands], p.mode, rng)
            reject_take += [row] * len(reasons)
            reject_reasons += reasons
            margins = [cand_scores[c] - cand_scores[r] for c, r in pairs]
            ranks = curriculum_ranks(margins) if p.mode == "all_pairs" else [1] * len(pairs)
            for (c, r), margin, rank in zip(pairs, margins, ranks):
                take.append(row)
                rows.append((f"{row_id}-{c}-{r}", row_id, cands[c]["text"], cands[r]["text"], cand_scores[c],
                             cand_scores[r], margin, cands[c]["model"], cands[r]["model"], c, r, rank, rank))
        pairs_table = self._assemble(table, take, rows)
        if p.mode == "all_pairs" and pairs_table.num_rows:
            pairs_table = pairs_table.sort_by([("curr_stage", "ascending"), ("margin", "descending"), ("id", "ascending")])
        rejected = None
        if reject_take:
            rejected = with_reason(table.take(pa.array(reject_take, pa.int64())), pa.array(reject_reasons, pa.string()))
        return StageOutput(pairs_table, rejected)

    def _assemble(self, table: pa.Table, take: list[int], rows: list[tuple]) -> pa.Table:
        """Pair columns from `rows`, other input columns repeated from the prompt rows in `take`."""
        schema = self.output_schema(table.schema)
        columns = list(zip(*rows)) if rows else [[] for _ in PAIR_FIELDS]
        built = {name: pa.array(values, PAIR_FIELDS[name]) for name, values in zip(PAIR_FIELDS, columns)}
        source = table.take(pa.array(take, pa.int64()))
        return pa.table([built[n] if n in built else source.column(n) for n in schema.names], schema=schema)


# Swapping chosen and rejected (judges' relabel, EM's flip) -------------------------------------------

SIGNED_COLUMNS = ("margin", "spa_margin", "cdr_margin")  # negated when a pair is flipped (chosen − rejected differences)


def chosen_first(row_id: str, stage_id: str, seed: int) -> bool:
    """Whether a judge shows this row's chosen reply first: a fair coin seeded from (row id,
    `<stage id>:order`, seed), so re-sharding changes nothing. Example: chosen_first("r1", "rationale", 0) -> True
    """
    return row_coin(row_id, f"{stage_id}:order", seed)


def swap_pairs(table: pa.Table, flip: pa.BooleanArray) -> pa.Table:
    """Swap chosen and rejected on the rows where `flip` is true, keeping every column consistent.

    Swaps every column pair whose names differ only by `chosen` / `rejected` (`chosen` itself,
    `chosen_score`, `spa_lp_policy_chosen`, ...), negates the signed differences `margin` and
    `spa_margin`, and complements `spa_conf`. Example: swap_pairs(t, [True, False])
    """
    names = table.column_names
    flip = pc.fill_null(flip, False)
    columns: dict[str, pa.Array] = {}
    for name in names:
        partner = name.replace("chosen", "rejected")
        if "chosen" in name and partner in names:
            a, b = table.column(name), table.column(partner)
            if not a.type.equals(b.type):
                raise ValueError(f"cannot swap '{name}' ({a.type}) with '{partner}' ({b.type})")
            columns[name] = pc.if_else(flip, b, a)
            columns[partner] = pc.if_else(flip, a, b)
    for name in SIGNED_COLUMNS:
        if name in names:
            columns[name] = pc.if_else(flip, pc.negate(table.column(name)), table.column(name))
    if "spa_conf" in names:
        col = table.column("spa_conf")
        columns["spa_conf"] = pc.if_else(flip, pc.subtract(pa.scalar(1.0, col.type), col), col)
    return put_columns(table, columns)
