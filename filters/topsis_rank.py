"""TOPSIS: closeness of each row to the ideal best and worst over several criteria (METHODS.md §7, steps 1-4).

Named `topsis_rank`, not `topsis`: a submodule `topsis` would shadow the function `curate.filters.topsis`.

DONOD ranks its (DON, NOD) scores with it (`curate.filters.donod`); the fit is global (column
scales and ideal points over every row) and the closeness row-local, so rows scored part by
part get the same values as in one table.

Example: topsis([[1, 3], [2, 2], [3, 1]]) -> array([0. , 0.5, 1. ])   # first a benefit, second a cost
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

Normalize = Literal["vector", "minmax"]


@dataclass(frozen=True)
class TopsisFit:
    """What TOPSIS learns from the whole column set: r = (x - shift) / scale, v = w·r, ideal best and worst.

    Example: topsis_fit([[1, 3], [2, 2], [3, 1]]).best -> array([0.4009, 0.1336])
    """

    shift: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    best: np.ndarray
    worst: np.ndarray


def _matrix(matrix: Any) -> np.ndarray:
    x = np.asarray(matrix, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an (n, criteria) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("TOPSIS needs finite values (drop or fill rows with null/NaN/inf first)")
    return x


def _weighted(x: np.ndarray, shift: np.ndarray, scale: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """v_ij = w_j (x_ij - shift_j) / scale_j, column by column (elementwise, so a row's v never depends on the others)."""
    return np.column_stack([weights[j] * ((x[:, j] - shift[j]) / scale[j]) for j in range(x.shape[1])])


def topsis_fit(matrix: Any, weights: Sequence[float] = (0.5, 0.5), benefit: Sequence[bool] = (True, False),
               normalize: Normalize = "vector") -> TopsisFit:
    """Steps 1-3 of TOPSIS over all rows: column normalisation, weights, ideal best A⁺ and worst A⁻.

    `normalize="vector"`: r = x / sqrt(Σ x²) (METHODS §7 step 1; signed columns such as DON keep
    their sign). `normalize="minmax"`: r = (x - min) / (max - min), the alternative §7 names. A
    column whose norm or range is 0 normalises to 0 (it then separates no rows). Column sums use
    `math.fsum`, which is exactly rounded, so the result does not depend on the row order.
    Example: topsis_fit([[1, 3], [2, 2], [3, 1]]).scale -> array([3.7417, 3.7417])
    """
    x = _matrix(matrix)
    k = x.shape[1]
    w = np.asarray(weights, dtype=np.float64)
    good = np.asarray(benefit, dtype=bool)
    if w.shape != (k,) or good.shape != (k,):
        raise ValueError(f"need one weight and one direction per criterion ({k}), got {len(w)} and {len(good)}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError(f"weights must be finite and >= 0, got {list(w)}")
    if len(x) == 0:
        raise ValueError("TOPSIS needs at least one row")
    if normalize == "vector":
        shift = np.zeros(k)
        scale = np.array([math.sqrt(math.fsum(x[:, j] * x[:, j])) for j in range(k)])
    elif normalize == "minmax":
        shift = x.min(axis=0)
        scale = x.max(axis=0) - shift
    else:
        raise ValueError(f"normalize must be 'vector' or 'minmax', got {normalize!r}")
    scale = np.where(scale > 0, scale, 1.0)  # x - shift is 0 in such a column (all zero, or constant)
    v = _weighted(x, shift, scale, w)
    best = np.where(good, v.max(axis=0), v.min(axis=0))
    worst = np.where(good, v.min(axis=0), v.max(axis=0))
    return TopsisFit(shift, scale, w, best, worst)


def topsis_closeness(matrix: Any, fit: TopsisFit) -> np.ndarray:
    """Step 4: C_i = d⁻ / (d⁺ + d⁻) of each row against a fitted TOPSIS (0.5 where d⁺ = d⁻ = 0).

    Row-local: a row's C depends only on its values and the fit, so rows scored part by part
    get the bits they get in one table. Example: topsis_closeness([[2, 2]], topsis_fit([[1, 3], [2, 2], [3, 1]])) -> [0.5]
    """
    x = _matrix(matrix)
    v = _weighted(x, fit.shift, fit.scale, fit.weights)
    d_best = np.zeros(len(x))
    d_worst = np.zeros(len(x))
    for j in range(x.shape[1]):
        d_best += (v[:, j] - fit.best[j]) ** 2
        d_worst += (v[:, j] - fit.worst[j]) ** 2
    d_best, d_worst = np.sqrt(d_best), np.sqrt(d_worst)
    total = d_best + d_worst
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, d_worst / np.where(total > 0, total, 1.0), 0.5)


def topsis(matrix: Any, weights: Sequence[float] = (0.5, 0.5), benefit: Sequence[bool] = (True, False),
           normalize: Normalize = "vector") -> np.ndarray:
    """TOPSIS closeness C ∈ [0, 1] per row (METHODS §7 steps 1-4); higher is better.

    Example: topsis([[1, 3], [2, 2], [3, 1]]) -> array([0. , 0.5, 1. ])   # DON benefit, NOD cost
    """
    return topsis_closeness(matrix, topsis_fit(matrix, weights, benefit, normalize))
