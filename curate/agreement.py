"""Agreement of a judge with reference labels: counts, the share and its 95% Wilson interval.

Used by the judge evaluations (benchmarks/eval_judges_hh.py) and by ICAI's evaluation mode
(METHODS.md §4 (c) 6), so every agreement figure in this repo is computed the same way.
Leaves out: running any judge.

Example: agreement(agree=60, disagree=30, undecided=10)["share"] -> 0.6
"""
from __future__ import annotations

import math
from typing import Any


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n. Example: wilson(50, 100) -> (0.404, 0.596)"""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def agreement(agree: int, disagree: int, undecided: int = 0) -> dict[str, Any]:
    """Share of rows where the judge matches the label (undecided rows count as misses), with its
    95% Wilson interval, and the share among decided rows.

    Example: agreement(6, 3, 1) -> {'rows': 10, 'agree': 6, ..., 'share': 0.6, 'ci95': [0.31, 0.83]}
    """
    n = agree + disagree + undecided
    low, high = wilson(agree, n)
    decided = agree + disagree
    return {"rows": n, "agree": agree, "disagree": disagree, "undecided": undecided,
            "share": agree / n if n else None, "ci95": [low, high] if n else None,
            "share_of_decided": agree / decided if decided else None}
