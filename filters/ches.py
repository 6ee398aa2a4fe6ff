"""CHES: centered hidden embedding similarity of a preference pair, and the global-quantile filter (METHODS.md §5).

A high CHES says the model sees chosen and rejected as alike, which predicts that DPO will push
the chosen likelihood down (likelihood displacement). With `S⁺`, `S⁻` the sums of the final-layer
hidden states at the positions that predict each response token (METHODS §5 (c), positions
P-1 .. L-2 of `P + R + [EOS]`, so |y| = |R| + 1):

    ches    = <S⁺, S⁻> - ||S⁺||²
    ln_ches = <S⁺/|y⁺|, S⁻/|y⁻|> - ||S⁺/|y⁺|||²

Library functions (each usable without a pipeline):
- `ches_from_hidden` / `ches_from_sums`: the formula on span arrays or their sums (float64).
- `span_hidden` / `span_sum` / `ches_from_full`: the same from full-sequence hidden states (any
  padding side, given the row's offset), for callers that run their own model.
- `ches_scores`: scores a pair table through the transformers backend (`HFBackend.hidden_states`,
  length-bucketed batches with explicit per-row spans, so left and right padding agree).
- `ches_cut` / `ches_select`: the exact global quantile cut and the keep mark.
Stages: `filters.ches_score` (model kind, stores the score columns) and `filters.ches` (global
kind: `fit` cuts over every part, the row-local apply drops or marks).

Truncation (METHODS §5 (d)): prompt + response are cut to `max_length` tokens (512; -1 or None for
none). A cut response keeps its first `max_length - P` positions. The backend takes text, not token
ids, so a cut reply is sent as a decoded prefix whose re-tokenisation is checked to begin with the
kept tokens; attention being causal, the kept positions are then exactly those of the cut sequence
(`cut_text`). When no such prefix is found the whole reply is run and its first positions read,
which is just as exact, only slower. Rows whose prompt fills the budget or whose response is empty
are skipped, with a reason in `ches_skip_reason`, never scored.

Leaves out: the `last_h_inner` and `neg_norm_edit_dist` baselines (METHODS §5 (b), optional); the
vLLM backend (it serves no hidden states); the `<|prompter|>` wrapping of the official script for
models without a chat template (we use the shared token layout of METHODS §0 instead); and
tokenising once: the lengths are counted here and the backend tokenises again (cheap next to
the forward pass).

Example: ches_from_hidden([[1, 0], [1, 1]], [[1, 0], [0, 1], [1, 1]]) -> (1.0, -0.25)
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, Iterable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.adapters import accepts_frames
from curate.backends.base import ScoreItem, encode_prompt, open_backend
from curate.backends.params import HiddenStateParams
from curate.backends.scoring import as_messages, token_budget
from curate.contract import (
    TEXT_TYPES,
    Params,
    Stage,
    StageOutput,
    Verdict,
    execution_field,
    inside_cut,
    keep_all,
    mark_dropped,
    put_columns,
    require,
    with_fields,
)
from curate.model_stage import ModelStage
from curate.registry import register

log = logging.getLogger(__name__)

SCORE_COLUMNS: dict[str, pa.DataType] = {
    "ches": pa.float64(),
    "ln_ches": pa.float64(),
    "ches_len_chosen": pa.int32(),
    "ches_len_rejected": pa.int32(),
    "ches_skip_reason": pa.string(),
    "ches_model": pa.string(),
}
Mode = Literal["keep_lowest", "drop_highest"]


# The formula (METHODS §5 (c)) -----------------------------------------------------------------


def ches_from_sums(s_chosen: np.ndarray, n_chosen: int, s_rejected: np.ndarray, n_rejected: int) -> tuple[float, float]:
    """CHES and length-normalised CHES from the span sums S⁺, S⁻ and the span lengths |y⁺|, |y⁻|.

    Example: ches_from_sums(np.array([2., 1.]), 2, np.array([2., 2.]), 3) -> (1.0, -0.25)
    """
    if n_chosen < 1 or n_rejected < 1:
        raise ValueError(f"CHES needs non-empty spans, got |y+|={n_chosen}, |y-|={n_rejected}")
    pos = np.asarray(s_chosen, dtype=np.float64)
    neg = np.asarray(s_rejected, dtype=np.float64)
    ches = float(pos @ neg - pos @ pos)
    mean_pos, mean_neg = pos / n_chosen, neg / n_rejected
    ln_ches = float(mean_pos @ mean_neg - mean_pos @ mean_pos)
    return ches, ln_ches


def ches_from_hidden(h_chosen: Any, h_rejected: Any) -> tuple[float, float]:
    """CHES and ln_ches from the two span arrays (|y| x d), summed in float64 (METHODS §5 (c)).

    Example: ches_from_hidden([[1, 0], [1, 1]], [[1, 0], [0, 1], [1, 1]]) -> (1.0, -0.25)
    """
    pos, neg = np.asarray(h_chosen), np.asarray(h_rejected)
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise ValueError(f"expected two (|y|, d) arrays with the same d, got {pos.shape} and {neg.shape}")
    return ches_from_sums(pos.sum(axis=0, dtype=np.float64), len(pos), neg.sum(axis=0, dtype=np.float64), len(neg))


def span_hidden(hidden_full: Any, prompt_len: int, seq_len: int, offset: int = 0) -> np.ndarray:
    """The rows of a full-sequence hidden array that predict the response: positions P-1 .. L-2.

    `seq_len` counts the row's real tokens including the final EOS; `offset` is where the row
    starts in a padded batch (0 for right padding, width - L for left padding). METHODS §5 index
    recipe. Example: span_hidden(h, prompt_len=5, seq_len=9).shape -> (4, d)
    """
    hidden = np.asarray(hidden_full)
    if not 1 <= prompt_len < seq_len or offset < 0 or offset + seq_len > len(hidden):
        raise ValueError(f"bad span: prompt_len={prompt_len}, seq_len={seq_len}, offset={offset}, rows={len(hidden)}")
    return hidden[offset + prompt_len - 1: offset + seq_len - 1]


def span_sum(hidden_full: Any, prompt_len: int, seq_len: int, offset: int = 0) -> np.ndarray:
    """S = the float64 sum of `span_hidden` (METHODS §5 (c)).

    Example: span_sum(np.ones((9, 2)), prompt_len=5, seq_len=9) -> array([4., 4.])
    """
    return span_hidden(hidden_full, prompt_len, seq_len, offset).sum(axis=0, dtype=np.float64)


def ches_from_full(hidden_chosen: Any, hidden_rejected: Any, prompt_len: int, chosen_len: int, rejected_len: int,
                   chosen_offset: int = 0, rejected_offset: int = 0) -> tuple[float, float]:
    """CHES and ln_ches from full-sequence hidden states of `P + y⁺` and `P + y⁻` (the backend-free path).

    Lengths count the real tokens of each sequence, EOS included; offsets locate left-padded rows.
    Example: ches_from_full(h_pos, h_neg, prompt_len=3, chosen_len=5, rejected_len=6) -> (1.0, -0.25)
    """
    pos = span_sum(hidden_chosen, prompt_len, chosen_len, chosen_offset)
    neg = span_sum(hidden_rejected, prompt_len, rejected_len, rejected_offset)
    return ches_from_sums(pos, chosen_len - prompt_len, neg, rejected_len - prompt_len)


# Scoring a table through the backend ----------------------------------------------------------


def kept_span(prompt_len: int, response_len: int, budget: int | None) -> int:
    """How many predicting positions of `P + R + [EOS]` survive a token budget (|R| + 1 when uncut).

    Example: kept_span(prompt_len=10, response_len=5, budget=12) -> 2
    """
    full = response_len + 1
    return full if budget is None else max(0, min(full, budget - prompt_len))


def skip_reason(prompt_len: int, chosen_len: int | None, rejected_len: int | None, budget: int | None) -> str | None:
    """Why a row is not scored: `prompt_too_long`, `empty_chosen`, `empty_rejected`, or None.

    Lengths are response tokens without EOS (None for a missing text). A response is empty when it
    has no token, or when none survives the budget (the prompt fills it).
    Example: skip_reason(10, 0, 4, 512) -> 'empty_chosen'
    """
    if budget is not None and prompt_len >= budget:
        return "prompt_too_long"
    for side, length in (("chosen", chosen_len), ("rejected", rejected_len)):
        if not length:  # with prompt_len < budget, at least the first response token survives
            return f"empty_{side}"
    return None


def _token_ids(tokenizer: Any, text: str | None) -> list[int] | None:
    if text is None:
        return None
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def cut_text(tokenizer: Any, text: str, ids: list[int], keep: int) -> str | None:
    """A prefix of `text` whose tokens begin with `ids[:keep]`, or None if no short one is found.

    The first `keep` predicting positions see only the prompt and `ids[:keep - 1]`, so scoring
    this prefix gives them exactly (causal attention) without running the rest of the reply. The
    decoded prefix is re-tokenised and checked, since a join can tokenise differently.
    Example: cut_text(tok, "Paris is big.", tok("Paris is big.")["input_ids"], 2) -> 'Paris is'
    """
    for extra in (0, 1, 2, 4, 8):
        if keep + extra >= len(ids):
            break
        candidate = tokenizer.decode(ids[: keep + extra])
        if _token_ids(tokenizer, candidate)[:keep] == ids[:keep]:
            return candidate
    return None


def _row_plan(tokenizer: Any, messages: list[dict[str, str]], texts: tuple[str | None, str | None],
              budget: int | None) -> tuple[str | None, list[int], list[str | None], int]:
    """Skip reason, kept span lengths, the texts to score (cut where possible) and how many sides were cut."""
    prompt_len = len(encode_prompt(tokenizer, messages))
    ids = [_token_ids(tokenizer, t) for t in texts]
    reason = skip_reason(prompt_len, *(len(x) if x is not None else None for x in ids), budget)
    spans = [kept_span(prompt_len, len(x), budget) if x else 0 for x in ids]
    to_score: list[str | None] = list(texts)
    cut = 0
    for side, (text, tokens, span) in enumerate(zip(texts, ids, spans)):
        if reason is None and tokens is not None and span < len(tokens) + 1:
            cut += 1
            to_score[side] = cut_text(tokenizer, text, tokens, span) or text  # type: ignore[arg-type]
    return reason, spans, to_score, cut


def score_with_backend(table: pa.Table, backend: Any, max_length: int | None = 512, model_name: str | None = None,
                       chunk_rows: int = 256) -> tuple[pa.Table, dict[str, int]]:
    """`ches_scores` on an open backend; also returns counters (scored, skipped, truncated, positions).

    Rows go to the backend `chunk_rows` at a time (2 items each), which bounds the memory of the
    returned hidden states. Example: table, counters = score_with_backend(t, open_backend("transformers", m))
    """
    budget = token_budget(max_length)
    prompts = [as_messages(p) for p in table.column("prompt").to_pylist()]
    pairs = list(zip(table.column("chosen").to_pylist(), table.column("rejected").to_pylist()))
    plans = [_row_plan(backend.tokenizer, m, texts, budget) for m, texts in zip(prompts, pairs)]
    reasons: list[str | None] = [plan[0] for plan in plans]
    scored = [i for i, reason in enumerate(reasons) if reason is None]
    values: dict[int, tuple[float, float]] = {}
    for start in range(0, len(scored), chunk_rows):
        rows = scored[start:start + chunk_rows]
        hidden = backend.hidden_states([ScoreItem(prompts[i], text) for i in rows for text in plans[i][2]])
        for k, i in enumerate(rows):
            (span_pos, span_neg) = plans[i][1]
            value = ches_from_hidden(hidden[2 * k][:span_pos], hidden[2 * k + 1][:span_neg])
            if math.isfinite(value[0]) and math.isfinite(value[1]):
                values[i] = value
            else:
                reasons[i] = "non_finite"
    n = table.num_rows
    columns = {
        "ches": pa.array([values[i][0] if i in values else None for i in range(n)], pa.float64()),
        "ln_ches": pa.array([values[i][1] if i in values else None for i in range(n)], pa.float64()),
        "ches_len_chosen": pa.array([plan[1][0] for plan in plans], pa.int32()),
        "ches_len_rejected": pa.array([plan[1][1] for plan in plans], pa.int32()),
        "ches_skip_reason": pa.array(reasons, pa.string()),
        "ches_model": pa.array([model_name or backend.name] * n, pa.string()),
    }
    skipped = Counter(r for r in reasons if r is not None)
    counters = {"rows_scored": len(values), "rows_skipped": n - len(values),
                "rows_truncated": sum(plans[i][3] > 0 for i in values),
                "positions": sum(sum(plans[i][1]) for i in values)}
    counters.update({f"skipped_{reason}": count for reason, count in skipped.items()})
    return put_columns(table, columns), counters


@accepts_frames
def ches_scores(table: pa.Table, model: str = "smollm2-135m-instruct", max_length: int | None = 512,
                dtype: str = "float32") -> pa.Table:
    """Add `ches`, `ln_ches`, `ches_len_chosen`, `ches_len_rejected`, `ches_skip_reason`, `ches_model`.

    Needs `prompt` (messages or string), `chosen` and `rejected` (strings). Uses the transformers
    backend in `dtype` (fp32 by default; sums are float64 either way, METHODS §5 (c)). Lengths
    are the positions summed (|y| after truncation). Skipped rows have null scores and a reason.
    Example: ches_scores(pairs, model="smollm2-135m-instruct").column("ln_ches")
    """
    backend = open_backend("transformers", model, dtype=dtype)
    scored, _ = score_with_backend(table, backend, max_length, model_name=model)
    return scored


# Global selection (METHODS §5 filter) ---------------------------------------------------------


def selection_count(n_scored: int, mode: Mode, fraction: float) -> int:
    """How many of the lowest-scoring rows stay: ceil(f·n) for keep_lowest, n - ceil(f·n) for drop_highest.

    The fraction names the rows acted on (kept, or dropped) and rounds up, so 5% of 380 keeps 19
    (the paper's SORRY-Bench selection, METHODS §5). Example: selection_count(40, "keep_lowest", 0.05) -> 2
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    acted = math.ceil(round(fraction * n_scored, 9))  # round: 0.07 * 100 is 7.000000000000001
    return acted if mode == "keep_lowest" else n_scored - acted


def _scored_rows(table: pa.Table, column: str) -> pa.Table:
    """(id, value) of the rows with a finite score in `column`."""
    values = table.column(column)
    valid = pc.and_(pc.is_valid(values), pc.invert(pc.fill_null(pc.is_nan(values), True)))
    return pa.table({"id": table.column("id"), "value": pc.cast(values, pa.float64())}).filter(valid)


def ches_cut(tables: Iterable[pa.Table], column: str = "ln_ches", mode: Mode = "keep_lowest",
             fraction: float = 0.05) -> pa.Table:
    """The global cut over all parts: one row (keep_count, n_scored, value, id) (METHODS §5 filter).

    Rows are ordered by (score, id) ascending, a strict order even with tied scores, and the
    `keep_count` first stay; `value`, `id` are the last kept row (null when none stays). The cut
    depends only on the set of rows, never on how they are split into parts.
    Example: ches_cut([t], mode="keep_lowest", fraction=0.05).column("value")
    """
    parts = [_scored_rows(t.select(["id", column]), column) for t in tables]
    empty = pa.table({"id": pa.array([], pa.string()), "value": pa.array([], pa.float64())})
    rows = pa.concat_tables(parts) if parts else empty
    keep_count = selection_count(rows.num_rows, mode, fraction)
    value, last_id = None, None
    if keep_count > 0:
        order = pc.sort_indices(rows, sort_keys=[("value", "ascending"), ("id", "ascending")])
        last = rows.take(order.slice(keep_count - 1, 1))
        value, last_id = last.column("value")[0].as_py(), last.column("id")[0].as_py()
    log.info("ches cut (%s %.4g of %s): keep %d of %d scored rows, threshold %s", mode, fraction, column,
             keep_count, rows.num_rows, value)
    return pa.table({
        "keep_count": pa.array([keep_count], pa.int64()),
        "n_scored": pa.array([rows.num_rows], pa.int64()),
        "value": pa.array([value], pa.float64()),
        "id": pa.array([last_id], pa.string()),
    })


def ches_keep_mask(table: pa.Table, cut: pa.Table, column: str = "ln_ches") -> pa.BooleanArray:
    """Row-local test against a cut: (score, id) <= (cut value, cut id); null where unscored.

    Example: ches_keep_mask(t, ches_cut([t])).to_pylist() -> [True, False, None, ...]
    """
    values = table.column(column)
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    unscored = pc.or_(pc.is_null(values), pc.fill_null(pc.is_nan(values), True))
    keep = inside_cut(values, table.column("id"), cut.column("value")[0], cut.column("id")[0], "below")
    return pc.if_else(unscored, pa.scalar(None, pa.bool_()), keep)


@accepts_frames
def ches_select(table: pa.Table, mode: Mode = "keep_lowest", fraction: float = 0.05, column: str = "ln_ches") -> pa.Table:
    """Add `ches_keep`: True for the rows a global-quantile selection keeps (whole table = whole dataset).

    Paper default: keep the 5% lowest `ln_ches` [code README], METHODS §5. Ties at the cut go to
    the smaller id; unscored rows (null or NaN) get False. Nothing is dropped here.
    Example: ches_select(scored, "drop_highest", 0.1).filter(pc.field("ches_keep"))
    """
    keep = ches_keep_mask(table, ches_cut([table], column, mode, fraction), column)
    return put_columns(table, {"ches_keep": pc.fill_null(keep, False)})


# Stages -------------------------------------------------------------------------------------


class ChesScoreParams(HiddenStateParams):
    """Params of filters.ches_score. Example: ChesScoreParams(model="smollm2-135m-instruct")"""

    model: str = Field(description="the model you will DPO-train (its init / reference), METHODS §5 (d)")
    max_length: int = Field(512, description="token budget for prompt + response (METHODS §5 (d)); -1 = none")
    chunk_rows: int = execution_field(256, ge=1, description="rows whose hidden states are held in memory at once")


@register
class ChesScore(ModelStage):
    """Score each pair's CHES with the model to be trained; stores the `ches_*` columns (module docstring).

    Example: - stage: filters.ches_score
               params: {model: smollm2-135m-instruct}
    """

    name = "filters.ches_score"
    Params = ChesScoreParams
    identity_as_list = False

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), "prompt": TEXT_TYPES, "chosen": pa.string(), "rejected": pa.string()}, self.name)
        return with_fields(schema, SCORE_COLUMNS)

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        scored, counters = score_with_backend(table, self.models.get(p.model), p.max_length, p.model, p.chunk_rows)
        return StageOutput(scored, counters=counters)


class ChesFilterParams(Params):
    """Params of filters.ches. Example: ChesFilterParams(mode="drop_highest", fraction=0.1)"""

    mode: Mode = Field("keep_lowest", description="keep the lowest fraction, or drop the highest fraction")
    # Paper default keep_lowest 0.05 [code README]; a milder drop_highest 0.1-0.25 is [ours] (METHODS §5).
    fraction: float = Field(0.05, ge=0.0, le=1.0, description="share of scored rows kept (keep_lowest) or dropped")
    column: str = Field("ln_ches", description="score column; ln_ches is length-normalised (METHODS §5 (c))")
    action: Literal["drop", "mark"] = Field("drop", description="drop rows, or only add the bool column ches_keep")


@register
class ChesFilter(Stage):
    """Keep pairs by a global quantile of CHES: reasons `ches_high` and `ches_skipped` (unscored rows).

    `fit` orders every scored row of every part by (score, id) and cuts after the selected count,
    so ties at the threshold go to the smaller id and the result does not depend on the parts.
    Example: - stage: filters.ches
               params: {mode: keep_lowest, fraction: 0.05}
    """

    name = "filters.ches"
    kind = "global"
    Params = ChesFilterParams

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), self.params.column: pa.float64()}, self.name)
        return with_fields(schema, {"ches_keep": pa.bool_()}) if self.params.action == "mark" else schema

    def fit_columns(self, schema: pa.Schema) -> list[str]:
        return ["id", self.params.column]

    def fit(self, tables: Iterable[pa.Table]) -> pa.Table:
        p = self.params
        return ches_cut(tables, p.column, p.mode, p.fraction)

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput | Verdict:
        if state is None:
            raise ValueError("filters.ches needs the fitted cut (a global stage)")
        mask = ches_keep_mask(table, state, self.params.column)
        if self.params.action == "mark":
            return StageOutput(put_columns(table, {"ches_keep": pc.fill_null(mask, False)}))
        keep, reason = keep_all(table.num_rows)
        keep, reason = mark_dropped(keep, reason, pc.is_null(mask), "ches_skipped")
        keep, reason = mark_dropped(keep, reason, pc.invert(mask), "ches_high")
        return Verdict(table, keep, reason)


__all__ = ["ches_from_hidden", "ches_from_sums", "ches_from_full", "span_hidden", "span_sum", "ches_scores",
           "score_with_backend", "ches_cut", "ches_keep_mask", "ches_select", "selection_count", "ChesScore",
           "ChesFilter"]
