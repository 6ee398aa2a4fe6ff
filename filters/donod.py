"""DONOD: per-sample weight-change scores of the output layer, combined by TOPSIS to prune SFT data (METHODS.md §7).

One plain-SGD step on a single sample's SFT loss `L` (mean NLL over its response tokens) moves
the monitored weights `W` (the output layer, V x d) to `W' = W - η·∇_W L`. DONOD scores it by

    DON = ||W'||_F - ||W||_F      (Delta of Norm: cumulative influence; benefit [unverified])
    NOD = ||W' - W||_F            (Norm of Delta: weight instability; cost [unverified])

and keeps the rows TOPSIS ranks best (top 30% by default, METHODS §7 (d)). For preference rows
the `chosen` reply after its prompt is scored as an SFT example [ours, METHODS §7 (a)].

Closed form (METHODS §7 (c), untied `lm_head`, plain SGD). With `z_t = W h_t`, `p_t = softmax(z_t)`,
`e_t` the one-hot target and `G = ∇_W L = (1/T) Σ_t (p_t - e_t) h_tᵀ`:

    <W, G> = (1/T) Σ_t (p_tᵀ z_t - z_t[y_t])
    ||G||² = (1/T²) Σ_{t,s} [(p_t - e_t)ᵀ(p_s - e_s)] · [h_tᵀ h_s]
    NOD = η ||G||,   DON = (η²||G||² - 2η<W,G>) / (||W'|| + ||W||),   ||W'||² = ||W||² - 2η<W,G> + η²||G||²

so one forward pass gives both scores; the V x d gradient is never built. DON is written as a
quotient instead of `sqrt(...) - ||W||` because the difference of two norms of ~1e2 that differ
by ~1e-6 loses every digit in float32 (the two are equal in exact arithmetic). The Gram sum runs
over blocks of `chunk` response positions: at most two `chunk x V` blocks of probabilities are
held at once (blocks after the first are recomputed for each earlier block, so `chunk >= T`, one
block, is fastest). Math runs in the dtype of `W`; the scoring path uses float64.

Tied embeddings (`tie_word_embeddings`, e.g. SmolLM2): the output layer is also the input
embedding, so a real SGD step on that tensor adds the gradient of the input use (rows of the
sequence's token ids, through every layer) to the closed form's output-use gradient. Which one
the paper means is unknown (it scores Llama-3.1-8B, which is untied; §7 and §9 list the
monitored layer as [unverified]). `tied="closed_form"` (default) scores the output-layer use
only: the quantity an untied model with the same weights would give, one forward pass.
`tied="autograd"` takes the literal step of the shared tensor (`donod_autograd_model`: a forward
and a backward through the whole model per row). Untied models always use the closed form.

Library functions (each usable without a pipeline):
- `donod_closed_form` / `donod_autograd`: (DON, NOD) of one sample from W, H and the targets;
  `donod_closed_form_batch`: many samples with their logits in shared matrix products.
- `donod_autograd_model`: the same by a real step on a model's output-embedding parameter.
- `topsis` (with `topsis_fit` / `topsis_closeness`, in `curate.filters.topsis_rank`): TOPSIS closeness,
  vector or min-max normalised.
- `donod_scores`: `donod_don`, `donod_nod` of a table through the transformers backend.
- `donod_fit` / `donod_mark` / `donod_select`: the global TOPSIS state and the top-fraction keep.
Stages: `filters.donod_score` (model kind) and `filters.donod` (global kind: `fit` over every
part, then a row-local apply that drops with reason `donod_pruned` or only marks).

Leaves out: the paper's optimizer, η and any warm-up of the scoring model (all [unverified];
we use SGD semantics, where Adam's first step ≈ η·sign(G) would make NOD nearly constant);
monitoring layers other than the output layer; models whose logits are not `W h + b` (logit
soft-capping or scaling) under the closed form; the vLLM backend (it serves no hidden states).

Example: donod_closed_form(np.zeros((2, 1)), np.ones((1, 1)), [0], lr=1.0) -> (0.7071…, 0.7071…)
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.adapters import accepts_frames
from curate.backends.base import ScoreItem, encode_pair, open_backend
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
from curate.filters.topsis_rank import Normalize, TopsisFit, topsis_closeness, topsis_fit
from curate.model_stage import ModelStage
from curate.registry import register

log = logging.getLogger(__name__)

SCORE_COLUMNS: dict[str, pa.DataType] = {
    "donod_don": pa.float64(),
    "donod_nod": pa.float64(),
    "donod_n_tokens": pa.int32(),      # T: response tokens + EOS that were scored (after truncation)
    "donod_skip_reason": pa.string(),  # null when scored; missing_response, prompt_too_long, non_finite
    "donod_model": pa.string(),
}
SELECT_COLUMNS: dict[str, pa.DataType] = {"donod_topsis": pa.float64(), "donod_keep": pa.bool_()}
Sign = Literal["benefit", "cost"]
Tied = Literal["closed_form", "autograd"]
# Configs whose logits are not `W h + b`: the closed form does not apply to them.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_softcapping", "logits_scaling", "logit_scale")


# The scores of one sample (METHODS §7 (c)) ------------------------------------------------------


def _tensor(x: Any, dtype: Any = None, device: Any = None) -> Any:
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device=device if device is not None else t.device, dtype=dtype if dtype is not None else t.dtype)


def _inputs(W: Any, H: Any, targets: Any, bias: Any = None) -> tuple[Any, Any, Any, Any]:
    """W (V, d) as a float tensor, H (T, d) in W's dtype and device, targets (T,) long, bias (V,) or None."""
    import torch

    W = _tensor(W)
    if not W.is_floating_point():
        W = W.double()
    H = _tensor(H, W.dtype, W.device)
    y = _tensor(targets, torch.long, W.device).reshape(-1)
    if W.ndim != 2 or H.ndim != 2 or H.shape[1] != W.shape[1]:
        raise ValueError(f"expected W (V, d) and H (T, d) with the same d, got {tuple(W.shape)} and {tuple(H.shape)}")
    if len(y) != H.shape[0] or len(y) == 0:
        raise ValueError(f"expected one target per row of H (T >= 1), got {len(y)} targets for T={H.shape[0]}")
    if int(y.min()) < 0 or int(y.max()) >= W.shape[0]:
        raise ValueError(f"targets must lie in [0, V={W.shape[0]}), got [{int(y.min())}, {int(y.max())}]")
    if bias is not None:
        bias = _tensor(bias, W.dtype, W.device).reshape(-1)
        if len(bias) != W.shape[0]:
            raise ValueError(f"bias has {len(bias)} entries for V={W.shape[0]}")
    return W, H, y, bias


def closed_form_terms(W: Any, H: Any, targets: Any, *, chunk: int | None = 256, bias: Any = None) -> tuple[float, float]:
    """(<W, G>, ||G||²) of one sample's mean-NLL gradient G on the output layer, without building G.

    `bias` (V,) enters the softmax only (it is not monitored). Blocks of `chunk` positions bound
    the memory to two `chunk x V` blocks plus the T x T position Gram (None: one block).
    Example: closed_form_terms(np.zeros((2, 1)), np.ones((1, 1)), [0]) -> (0.0, 0.5)
    """
    import torch

    W, H, y, bias = _inputs(W, H, targets, bias)
    T = H.shape[0]
    step = T if chunk is None else int(chunk)
    if step < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    blocks = [(a, min(a + step, T)) for a in range(0, T, step)]

    def residual(a: int, b: int) -> tuple[Any, Any]:
        """p - e of positions a..b-1 (in place over p) and their share of T·<W, G>: Σ (pᵀz - z[y])."""
        z = H[a:b] @ W.T  # logits without the bias: <W, G> pairs W with (p - e) hᵀ
        p = torch.softmax(z if bias is None else z + bias, dim=-1)
        part = (torch.dot(p.reshape(-1), z.reshape(-1)) - z.gather(1, y[a:b, None]).sum()).double()
        del z
        p[torch.arange(b - a, device=W.device), y[a:b]] -= 1.0
        return p, part

    inner = torch.zeros((), dtype=torch.float64, device=W.device)
    gram = torch.zeros((), dtype=torch.float64, device=W.device)
    with torch.no_grad():
        for i, (a, b) in enumerate(blocks):
            r_i, part = residual(a, b)
            inner += part
            gram += ((r_i @ r_i.T) * (H[a:b] @ H[a:b].T)).sum().double()
            for c, e in blocks[i + 1:]:  # off-diagonal blocks count twice (the Gram is symmetric)
                r_j = residual(c, e)[0]
                gram += 2.0 * ((r_i @ r_j.T) * (H[a:b] @ H[c:e].T)).sum().double()
    return float(inner) / T, float(gram) / (T * T)


def don_nod_from_terms(w_norm_sq: float, inner: float, g_norm_sq: float, lr: float) -> tuple[float, float]:
    """(DON, NOD) of the step W' = W - lr·G from ||W||², <W, G> and ||G||² (stable quotient for DON).

    Example: don_nod_from_terms(0.0, 0.0, 0.5, 1.0) -> (0.7071…, 0.7071…)
    """
    change = lr * lr * g_norm_sq - 2.0 * lr * inner  # ||W'||² - ||W||²
    old = math.sqrt(max(w_norm_sq, 0.0))
    new = math.sqrt(max(w_norm_sq + change, 0.0))
    don = change / (old + new) if old + new > 0.0 else 0.0
    return don, lr * math.sqrt(max(g_norm_sq, 0.0))


def donod_closed_form(W: Any, H: Any, targets: Any, lr: float, *, chunk: int | None = 256, bias: Any = None,
                      w_norm_sq: float | None = None) -> tuple[float, float]:
    """(DON, NOD) of one sample by the closed form (module docstring): one forward pass, no V x d gradient.

    W is the untied output-layer weight (V x d), H the final-layer hidden states at the positions
    that predict each response token (T x d), `targets` the T token ids; loss = mean NLL, plain
    SGD with step `lr`. Computes in W's dtype (pass float64 for exact checks); `w_norm_sq`
    (||W||², float64) can be passed to skip recomputing it per sample.
    Example: donod_closed_form(np.zeros((2, 1)), np.ones((1, 1)), [0], lr=1.0) -> (0.70710678…, 0.70710678…)
    """
    inner, g_sq = closed_form_terms(W, H, targets, chunk=chunk, bias=bias)
    if w_norm_sq is None:
        w = _tensor(W).double()
        w_norm_sq = float((w * w).sum())
    return don_nod_from_terms(w_norm_sq, inner, g_sq, lr)


def donod_closed_form_batch(W: Any, hidden: Sequence[Any], targets: Sequence[Any], lr: float, *, chunk: int | None = 256,
                            bias: Any = None, w_norm_sq: float | None = None,
                            block_rows: int = 512) -> list[tuple[float, float]]:
    """`donod_closed_form` of many samples, their logits computed in shared matrix products.

    Samples are packed, in order, into blocks of at most `block_rows` positions: one `rows x d`
    by `d x V` product per block instead of one per sample reads W once per block (short
    replies gain most: 1.7-1.9x per sample at T ~ 12 on a 2-core CPU, none at T ~ 100). Memory:
    two `block_rows x V` arrays. Each sample's ||G||² still uses only its own positions. Samples longer than `min(chunk, block_rows)` go through
    `donod_closed_form` alone. Same values as the per-sample call up to rounding.
    Example: donod_closed_form_batch(W, [H1, H2], [y1, y2], lr=1e-4) -> [(don1, nod1), (don2, nod2)]
    """
    import torch

    if len(hidden) != len(targets):
        raise ValueError(f"{len(hidden)} hidden-state arrays for {len(targets)} target arrays")
    W = _tensor(W)
    if not W.is_floating_point():
        W = W.double()
    if w_norm_sq is None:
        w_norm_sq = float((W.double() * W.double()).sum())
    limit = min(block_rows, chunk or block_rows)
    out: list[tuple[float, float] | None] = [None] * len(hidden)
    samples = [_inputs(W, h, y, bias) for h, y in zip(hidden, targets)]
    bias_t = samples[0][3] if samples else None
    group: list[int] = []

    def flush() -> None:
        if not group:
            return
        H = torch.cat([samples[i][1] for i in group])
        y = torch.cat([samples[i][2] for i in group])
        with torch.no_grad():
            z = H @ W.T
            p = torch.softmax(z if bias_t is None else z + bias_t, dim=-1)
            per_row = torch.linalg.vecdot(p, z) - z.gather(1, y[:, None])[:, 0]
            del z
            p[torch.arange(len(y), device=W.device), y] -= 1.0
            start = 0
            for i in group:
                T = len(samples[i][2])
                r, h = p[start:start + T], H[start:start + T]
                inner = float(per_row[start:start + T].double().sum()) / T
                g_sq = float(((r @ r.T) * (h @ h.T)).sum().double()) / (T * T)
                out[i] = don_nod_from_terms(w_norm_sq, inner, g_sq, lr)
                start += T
        group.clear()

    rows = 0
    for i, (_, H, _, _) in enumerate(samples):
        T = H.shape[0]
        if T > limit:
            out[i] = donod_closed_form(W, H, samples[i][2], lr, chunk=chunk, bias=bias, w_norm_sq=w_norm_sq)
            continue
        if rows + T > block_rows:
            flush()
            rows = 0
        group.append(i)
        rows += T
    flush()
    return out  # type: ignore[return-value]


def donod_autograd(W: Any, H: Any, targets: Any, lr: float, *, bias: Any = None) -> tuple[float, float]:
    """(DON, NOD) by an explicit torch autograd step `W' = W - lr·∇_W L`, norms taken literally.

    The check of `donod_closed_form` (METHODS §7 (f): equal within 1e-9 in float64). It sees the
    output layer's use only: with tied embeddings the shared tensor's real gradient also has the
    input-embedding part, which needs the whole model (`donod_autograd_model`). The literal
    `||W'|| - ||W||` cancels badly below float64; use float64 W here.
    Example: donod_autograd(np.zeros((2, 1)), np.ones((1, 1)), [0], lr=1.0) -> (0.70710678…, 0.70710678…)
    """
    import torch

    W, H, y, bias = _inputs(W, H, targets, bias)
    weight = W.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = H @ weight.T
        loss = torch.nn.functional.cross_entropy(logits if bias is None else logits + bias, y)
        (grad,) = torch.autograd.grad(loss, weight)
    with torch.no_grad():
        stepped = W - lr * grad
        return float(stepped.norm() - W.norm()), float((stepped - W).norm())


def donod_autograd_model(model: Any, input_ids: Sequence[int], start: int, lr: float, *, n_targets: int | None = None,
                         weight64: Any = None, w_norm_sq: float | None = None) -> tuple[float, float]:
    """(DON, NOD) of a real SGD step on the model's output-embedding parameter (one forward + backward).

    `input_ids` is `P + R + [EOS]` (METHODS §0) with R starting at `start`; the loss is the mean
    NLL of the first `n_targets` response tokens (all by default). Only that parameter gets a
    gradient, so with tied embeddings it holds the output use *and* the input-embedding use
    (`tied="autograd"`); untied, it equals the closed form. Norms in float64 (stable DON).
    Example: donod_autograd_model(model, ids, start, lr=1e-4) -> (don, nod)
    """
    import torch

    weight = model.get_output_embeddings().weight
    k = len(input_ids) - start if n_targets is None else n_targets
    if not 1 <= k <= len(input_ids) - start or start < 1:
        raise ValueError(f"bad span: start={start}, n_targets={n_targets}, length={len(input_ids)}")
    device = weight.device
    ids = torch.tensor([list(input_ids[: start + k])], dtype=torch.long, device=device)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(p is weight)
        with torch.enable_grad():
            logits = model(input_ids=ids).logits[0, start - 1: start - 1 + k]
            loss = torch.nn.functional.cross_entropy(logits.double(), ids[0, start: start + k])
            (grad,) = torch.autograd.grad(loss, weight)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    with torch.no_grad():
        w = weight64 if weight64 is not None else weight.detach().double()
        g = grad.double()
        w_sq = float((w * w).sum()) if w_norm_sq is None else w_norm_sq
        return don_nod_from_terms(w_sq, float((w * g).sum()), float((g * g).sum()), lr)


# Global selection (METHODS §7 (d), §9 global quantiles) ------------------------------------------


def keep_count(n_scored: int, keep_fraction: float) -> int:
    """Rows kept of n scored: ceil(fraction · n), so 30% of 10 keeps 3 and of 11 keeps 4.

    Example: keep_count(10, 0.3) -> 3
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    return math.ceil(round(keep_fraction * n_scored, 9))  # round: 0.3 * 10 is 3.0000000000000004


def _benefit(don_sign: Sign, nod_sign: Sign) -> tuple[bool, bool]:
    for name, sign in (("don_sign", don_sign), ("nod_sign", nod_sign)):
        if sign not in ("benefit", "cost"):
            raise ValueError(f"{name} must be 'benefit' or 'cost', got {sign!r}")
    return don_sign == "benefit", nod_sign == "benefit"


def _valid_scores(table: pa.Table) -> tuple[np.ndarray, pa.Array]:
    """Mask of rows with finite donod_don and donod_nod, and the (n, 2) float64 matrix (NaN elsewhere)."""
    columns = []
    for name in ("donod_don", "donod_nod"):
        col = table.column(name)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        columns.append(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64))
    x = np.column_stack(columns) if columns[0].size else np.zeros((0, 2))
    return x, pa.array(np.isfinite(x).all(axis=1) if len(x) else np.zeros(0, bool))


def donod_fit(tables: Iterable[pa.Table], keep_fraction: float = 0.3, weights: Sequence[float] = (0.5, 0.5),
              don_sign: Sign = "benefit", nod_sign: Sign = "cost", normalize: Normalize = "vector") -> pa.Table:
    """The global TOPSIS state over every part: one row of column scales, ideal points and the cut.

    Rows with a null or non-finite `donod_don`/`donod_nod` take no part. The scored rows are
    ordered by (closeness descending, id ascending), a strict order even with tied scores, and the
    first `keep_count` stay: `threshold` and `threshold_id` are the last kept row's closeness and
    id (null when none stays). So ties at the threshold go to the smaller id, and the kept set
    depends only on the rows, never on how they are split into parts.
    Example: donod_fit([scored]).column("threshold")[0]
    """
    good = _benefit(don_sign, nod_sign)
    ids: list[pa.Array] = []
    mats: list[np.ndarray] = []
    for table in tables:
        x, valid = _valid_scores(table)
        mask = valid.to_numpy(zero_copy_only=False)
        ids.append(pc.filter(table.column("id"), valid).combine_chunks() if table.num_rows else pa.array([], pa.string()))
        mats.append(x[mask])
    x = np.concatenate(mats) if mats else np.zeros((0, 2))
    id_array = pa.concat_arrays([a.cast(pa.string()) for a in ids]) if ids else pa.array([], pa.string())
    n = len(x)
    count = keep_count(n, keep_fraction)
    nan = [None, None]
    row: dict[str, Any] = {"n_scored": n, "keep_count": count, "normalize": normalize, "weights": list(map(float, weights)),
                           "don_sign": don_sign, "nod_sign": nod_sign, "shift": nan, "scale": nan, "best": nan,
                           "worst": nan, "threshold": None, "threshold_id": None}
    if n:
        fit = topsis_fit(x, weights, good, normalize)
        closeness = topsis_closeness(x, fit)
        row.update(shift=fit.shift.tolist(), scale=fit.scale.tolist(), best=fit.best.tolist(), worst=fit.worst.tolist())
        if count:
            ranked = pa.table({"c": closeness, "id": id_array})
            order = pc.sort_indices(ranked, sort_keys=[("c", "descending"), ("id", "ascending")])
            last = ranked.take(order.slice(count - 1, 1))
            row["threshold"], row["threshold_id"] = last.column("c")[0].as_py(), last.column("id")[0].as_py()
    log.info("donod fit: keep %d of %d scored rows (%.3g), closeness threshold %s", count, n, keep_fraction, row["threshold"])
    pair = pa.list_(pa.float64(), 2)
    schema = pa.schema([("n_scored", pa.int64()), ("keep_count", pa.int64()), ("normalize", pa.string()),
                        ("weights", pair), ("don_sign", pa.string()), ("nod_sign", pa.string()), ("shift", pair),
                        ("scale", pair), ("best", pair), ("worst", pair), ("threshold", pa.float64()),
                        ("threshold_id", pa.string())])
    return pa.Table.from_pylist([row], schema=schema)


def _state_fit(state: pa.Table) -> TopsisFit | None:
    row = state.slice(0, 1).to_pylist()[0]
    if row["scale"] is None or row["scale"][0] is None:
        return None
    return TopsisFit(*(np.asarray(row[k], dtype=np.float64) for k in ("shift", "scale", "weights", "best", "worst")))


def donod_mark(table: pa.Table, state: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Row-local apply of a fitted state: (closeness, keep) per row; both null where the row is unscored.

    keep = closeness > threshold, or closeness == threshold and id <= threshold_id.
    Example: c, keep = donod_mark(part, donod_fit(parts))
    """
    x, valid = _valid_scores(table)
    mask = valid.to_numpy(zero_copy_only=False)
    fit = _state_fit(state)
    closeness = np.full(len(x), np.nan)
    if fit is not None and mask.any():
        closeness[mask] = topsis_closeness(x[mask], fit)
    c = pa.array(closeness, pa.float64(), mask=~mask)
    keep = inside_cut(c, table.column("id"), state.column("threshold")[0], state.column("threshold_id")[0], "above")
    return c, pc.if_else(valid, keep, pa.scalar(None, pa.bool_()))


@accepts_frames
def donod_select(table: pa.Table, keep_fraction: float = 0.3, weights: Sequence[float] = (0.5, 0.5),
                 don_sign: Sign = "benefit", nod_sign: Sign = "cost", normalize: Normalize = "vector") -> pa.Table:
    """Add `donod_topsis` (closeness, null if unscored) and `donod_keep` over the whole table.

    Defaults: keep the top 30% (METHODS §7 (d)), weights (½, ½) [ours], DON a benefit and NOD a
    cost; both directions are [unverified] readings of the abstract (§7 (c)): flip them with
    `don_sign` / `nod_sign`. Ties at the cut go to the smaller id; unscored rows get False.
    Nothing is dropped. Example: donod_select(scored).filter(pc.field("donod_keep"))
    """
    state = donod_fit([table], keep_fraction, weights, don_sign, nod_sign, normalize)
    closeness, keep = donod_mark(table, state)
    return put_columns(table, {"donod_topsis": closeness, "donod_keep": pc.fill_null(keep, False)})


# Scoring a table through the backend ---------------------------------------------------------


@dataclass
class OutputLayer:
    """The monitored weight of a loaded model, in float64 on its device, with ||W||² computed once.

    Example: layer = OutputLayer.of(backend.model); layer.tied -> True for SmolLM2
    """

    weight: Any
    bias: Any
    norm_sq: float
    tied: bool

    @classmethod
    def of(cls, model: Any) -> "OutputLayer":
        import torch

        for name in LOGIT_TRANSFORMS:
            value = getattr(model.config, name, None)
            if value not in (None, 0, 0.0, 1, 1.0):
                raise NotImplementedError(
                    f"{type(model).__name__} transforms its logits ({name}={value}); DONOD's closed form assumes "
                    "logits = W h + b")
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to monitor")
        inputs = model.get_input_embeddings()
        tied = inputs is not None and inputs.weight.data_ptr() == head.weight.data_ptr()
        with torch.no_grad():
            weight = head.weight.detach().to(torch.float64)
            bias = getattr(head, "bias", None)
            bias = bias.detach().to(torch.float64) if bias is not None else None
            return cls(weight, bias, float((weight * weight).sum()), tied)


_warned_tied: set[str] = set()


def score_with_backend(table: pa.Table, backend: Any, lr: float = 1e-4, column: str = "chosen", chunk: int | None = 256,
                       tied: Tied = "closed_form", max_length: int | None = 2048, chunk_rows: int = 64,
                       model_name: str | None = None, layer: OutputLayer | None = None) -> tuple[pa.Table, dict[str, int]]:
    """`donod_scores` on an open transformers backend; also returns counters.

    Each row's `P + R + [EOS]` (METHODS §0; R = the `column` text) is cut to `max_length` tokens:
    a longer response keeps its first `max_length - P` targets, whose hidden states are the
    full row's (attention is causal); a prompt that fills the budget is skipped
    (`prompt_too_long`), a null response too (`missing_response`). Hidden states come from
    `backend.hidden_states`, `chunk_rows` rows at a time. Example: t, c = score_with_backend(t, backend)
    """
    if tied not in ("closed_form", "autograd"):
        raise ValueError(f"tied must be 'closed_form' or 'autograd', got {tied!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    budget = token_budget(max_length)
    layer = layer or OutputLayer.of(backend.model)
    name = model_name or backend.name
    if layer.tied and tied == "closed_form" and name not in _warned_tied:
        _warned_tied.add(name)
        log.warning("%s ties its input and output embeddings: DONOD scores the output-layer use only "
                    "(tied=closed_form); tied=autograd steps the whole shared tensor (METHODS §7, unverified)", name)
    tokenizer = backend.tokenizer
    prompts = [as_messages(p) for p in table.column("prompt").to_pylist()]
    responses = table.column(column).to_pylist()
    n = table.num_rows
    don: list[float | None] = [None] * n
    nod: list[float | None] = [None] * n
    n_tokens = [0] * n
    reasons: list[str | None] = [None] * n
    encoded: dict[int, tuple[list[int], int]] = {}
    truncated = 0
    for i in range(n):
        if responses[i] is None:
            reasons[i] = "missing_response"
            continue
        ids, start = encode_pair(tokenizer, prompts[i], responses[i])
        if budget is not None and start >= budget:
            reasons[i] = "prompt_too_long"
            continue
        full = len(ids) - start
        n_tokens[i] = full if budget is None else min(full, budget - start)
        truncated += n_tokens[i] < full
        encoded[i] = (ids, start)

    def record(i: int, value: tuple[float, float]) -> None:
        if math.isfinite(value[0]) and math.isfinite(value[1]):
            don[i], nod[i] = value
        else:
            reasons[i] = "non_finite"

    rows = sorted(encoded)
    if layer.tied and tied == "autograd":
        for i in rows:
            ids, start = encoded[i]
            record(i, donod_autograd_model(backend.model, ids, start, lr, n_targets=n_tokens[i],
                                           weight64=layer.weight, w_norm_sq=layer.norm_sq))
    else:
        for first in range(0, len(rows), chunk_rows):
            part = rows[first:first + chunk_rows]
            hidden = backend.hidden_states([ScoreItem(prompts[i], responses[i]) for i in part])
            spans, targets = [], []
            for i, h in zip(part, hidden):
                ids, start = encoded[i]
                if len(h) != len(ids) - start:
                    raise RuntimeError(f"backend returned {len(h)} hidden rows for {len(ids) - start} response tokens")
                spans.append(h[:n_tokens[i]])
                targets.append(ids[start:start + n_tokens[i]])
            values = donod_closed_form_batch(layer.weight, spans, targets, lr, chunk=chunk, bias=layer.bias,
                                             w_norm_sq=layer.norm_sq)
            for i, value in zip(part, values):
                record(i, value)
    for i, reason in enumerate(reasons):
        if reason is not None:
            n_tokens[i] = 0
    columns = {
        "donod_don": pa.array(don, pa.float64()),
        "donod_nod": pa.array(nod, pa.float64()),
        "donod_n_tokens": pa.array(n_tokens, pa.int32()),
        "donod_skip_reason": pa.array(reasons, pa.string()),
        "donod_model": pa.array([name] * n, pa.string()),
    }
    skipped = Counter(r for r in reasons if r is not None)
    counters = {"rows_scored": n - sum(skipped.values()), "rows_skipped": sum(skipped.values()),
                "rows_truncated": truncated, "tokens": sum(n_tokens)}
    counters.update({f"skipped_{reason}": count for reason, count in skipped.items()})
    return put_columns(table, columns), counters


@accepts_frames
def donod_scores(table: pa.Table, model: str = "smollm2-135m-instruct", lr: float = 1e-4, column: str = "chosen",
                 dtype: str = "float32", chunk: int | None = 256, tied: Tied = "closed_form",
                 max_length: int | None = 2048) -> pa.Table:
    """Add `donod_don`, `donod_nod` (float64), `donod_n_tokens`, `donod_skip_reason`, `donod_model`.

    Scores each row's `prompt` + `column` reply as an SFT example (METHODS §7 (a) [ours]) with the
    transformers backend in `dtype`: hidden states from the backend, the output layer read from
    `model.get_output_embeddings().weight`, DONOD math in float64. `lr` = η of the SGD step
    (1e-4 is a scale only, §7 (d); NOD rankings do not depend on it, DON's to first order).
    `tied` matters only for tied embeddings (module docstring). Skipped rows get null scores.
    Example: donod_scores(pairs, model="smollm2-135m-instruct").column("donod_nod")
    """
    backend = open_backend("transformers", model, dtype=dtype)
    scored, _ = score_with_backend(table, backend, lr, column, chunk, tied, max_length, model_name=model)
    return scored


# Stages -------------------------------------------------------------------------------------


class DonodScoreParams(HiddenStateParams):
    """Params of filters.donod_score. Example: DonodScoreParams(model="smollm2-135m-instruct", lr=1e-4)"""

    model: str = Field(description="scoring model (the paper scores with the model to be fine-tuned, §7 (d))")
    lr: float = Field(1e-4, gt=0, description="SGD step η; a scale only [unverified], METHODS §7 (d)")
    column: str = Field("chosen", description="reply scored after `prompt` as an SFT example (§7 (a) [ours])")
    tied: Tied = Field("closed_form", description="tied embeddings: output-layer use only, or the whole shared tensor")
    max_length: int = Field(2048, description="token budget for prompt + reply; -1 = none")
    chunk: int = execution_field(256, ge=1, description="response positions per block of the ||G||² Gram (bounds memory)")
    chunk_rows: int = execution_field(64, ge=1, description="rows whose hidden states are held in memory at once")


@register
class DonodScore(ModelStage):
    """Score each row's reply with DON and NOD of the output layer (module docstring); writes `donod_*`.

    Example: - stage: filters.donod_score
               params: {model: smollm2-135m-instruct, lr: 1.0e-4}
    """

    name = "filters.donod_score"
    Params = DonodScoreParams
    identity_as_list = False
    _layer: OutputLayer | None = None

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), "prompt": TEXT_TYPES, self.params.column: pa.string()}, self.name)
        return with_fields(schema, SCORE_COLUMNS)

    def backend(self) -> Any:
        """The loaded scoring backend; its output layer is read once (float64 copy, ||W||²)."""
        backend = self.models.get(self.params.model)
        if self._layer is None:
            self._layer = OutputLayer.of(backend.model)
        return backend

    def open(self) -> None:
        self.backend()

    def close(self) -> None:
        super().close()
        self._layer = None

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        backend = self.backend()
        scored, counters = score_with_backend(table, backend, p.lr, p.column, p.chunk, p.tied, p.max_length,
                                              p.chunk_rows, p.model, self._layer)
        return StageOutput(scored, counters=counters)


class DonodFilterParams(Params):
    """Params of filters.donod. Example: DonodFilterParams(keep_fraction=0.3, action="mark")"""

    keep_fraction: float = Field(0.3, ge=0.0, le=1.0, description="share of scored rows kept (§7 (d): keep 30%)")
    weights: tuple[float, float] = Field((0.5, 0.5), description="TOPSIS weights of (DON, NOD) [ours]")
    don_sign: Sign = Field("benefit", description="DON direction [unverified]: benefit = higher is better")
    nod_sign: Sign = Field("cost", description="NOD direction [unverified]: cost = lower is better")
    normalize: Normalize = Field("vector", description="TOPSIS column normalisation: vector (§7) or minmax")
    action: Literal["drop", "mark"] = Field("drop", description="drop the rest (donod_pruned), or only mark donod_keep")


@register
class DonodFilter(Stage):
    """Keep the rows TOPSIS ranks best on (DON, NOD) over the whole dataset; reasons `donod_pruned`, `donod_unscored`.

    `fit` reads `id`, `donod_don`, `donod_nod` of every part and stores the column scales, ideal
    points and the closeness cut (`donod_fit`); apply computes each row's closeness from that
    state alone, so the kept ids do not depend on the parts. Ties at the cut go to the smaller id.
    Both modes write `donod_topsis` and `donod_keep`; rows without finite scores get null / False.
    Example: - stage: filters.donod
               params: {keep_fraction: 0.3, action: drop}
    """

    name = "filters.donod"
    kind = "global"
    Params = DonodFilterParams

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), "donod_don": pa.float64(), "donod_nod": pa.float64()}, self.name)
        return with_fields(schema, SELECT_COLUMNS)

    def fit_columns(self, schema: pa.Schema) -> list[str]:
        return ["id", "donod_don", "donod_nod"]

    def fit(self, tables: Iterable[pa.Table]) -> pa.Table:
        p = self.params
        return donod_fit(tables, p.keep_fraction, p.weights, p.don_sign, p.nod_sign, p.normalize)

    def fit_summary(self, state: pa.Table) -> dict[str, Any]:
        row = state.to_pylist()[0]
        return {k: row[k] for k in ("n_scored", "keep_count", "threshold", "threshold_id", "scale", "best", "worst")}

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput | Verdict:
        if state is None:
            raise ValueError("filters.donod needs the fitted TOPSIS state (a global stage)")
        closeness, mask = donod_mark(table, state)
        marked = put_columns(table, {"donod_topsis": closeness, "donod_keep": pc.fill_null(mask, False)})
        if self.params.action == "mark":
            return StageOutput(marked)
        keep, reason = keep_all(table.num_rows)
        keep, reason = mark_dropped(keep, reason, pc.is_null(mask), "donod_unscored")
        keep, reason = mark_dropped(keep, reason, pc.invert(mask), "donod_pruned")
        return Verdict(marked, keep, reason)


__all__ = ["donod_closed_form", "donod_closed_form_batch", "donod_autograd", "donod_autograd_model", "closed_form_terms",
           "don_nod_from_terms", "keep_count", "donod_fit", "donod_mark", "donod_select", "donod_scores",
           "score_with_backend", "OutputLayer", "DonodScore", "DonodFilter"]
