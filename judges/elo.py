"""Elo ratings (METHODS.md §8.2): the update, and the average over match orders that Multi-Elo uses.

`E_a = 1 / (1 + 10^((R_b − R_a) / 400))`, `R_a += K(S_a − E_a)` and the same for b, K = 32 and
every player starting at 1000 ([ours] in §8.2). Elo depends on the order of the matches, so
§8.2 averages over several random orders: `elo_ratings` plays *every* distinct order when there
are at most `exact_orders` (720, e.g. the 6 matches of 4 candidates; all at once with numpy),
which makes the result symmetric (one win, one loss and two draws is exactly a tie; equal
records give equal ratings), and `orders` seeded shuffles beyond that. Leaves out: where the
matches come from (`curate.judges.multi_elo`).

Example: elo_update(1000, 1000, 1.0) -> (1016.0, 984.0)
"""
from __future__ import annotations

import functools
import math
import random
from collections import Counter
from typing import Hashable, Sequence

import numpy as np

K_FACTOR = 32.0  # §8.2 [ours]: K = 32
INITIAL = 1000.0  # §8.2 [ours]: every player starts at 1000
ORDERS = 16  # §8.2: "average over several random match orders"; 16 is ours
EXACT_ORDERS = 720  # ours: every distinct order is played when there are at most this many (6 distinct matches)
Match = tuple[Hashable, Hashable, float]  # (player a, player b, score of a: 1 win, 0.5 draw, 0 loss)


def expected_score(rating_a: float, rating_b: float) -> float:
    """E_a = 1 / (1 + 10^((R_b − R_a)/400)) (§8.2). Example: expected_score(1000, 1000) -> 0.5"""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))


def elo_update(rating_a: float, rating_b: float, score_a: float, k: float = K_FACTOR) -> tuple[float, float]:
    """Both ratings after one match: R_a += K(S_a − E_a), R_b += K((1 − S_a) − (1 − E_a)) (§8.2).

    Example: elo_update(1000, 1000, 1.0) -> (1016.0, 984.0)
    """
    delta = k * (score_a - expected_score(rating_a, rating_b))
    return rating_a + delta, rating_b - delta


def play(matches: Sequence[Match], k: float = K_FACTOR, initial: float = INITIAL) -> dict[Hashable, float]:
    """Ratings after playing `matches` once, in the order given. Example: play([("a", "b", 0.5)]) -> {'a': 1000.0, 'b': 1000.0}"""
    ratings: dict[Hashable, float] = {}
    for a, b, score in matches:
        ratings[a], ratings[b] = elo_update(ratings.get(a, initial), ratings.get(b, initial), score, k)
    return ratings


def order_count(matches: Sequence[Match]) -> int:
    """How many distinct orders a list of matches has: n! / Π(repeats!). Example: order_count([("a", "b", 1.0)] * 2) -> 1"""
    total = math.factorial(len(matches))
    for repeats in Counter(matches).values():
        total //= math.factorial(repeats)
    return total


@functools.lru_cache(maxsize=512)
def order_table(counts: tuple[int, ...]) -> np.ndarray:
    """Every distinct order of a multiset with these repeat counts, as rows of kind indices (cached).

    Example: order_table((2, 1)).tolist() -> [[0, 0, 1], [0, 1, 0], [1, 0, 0]]
    """
    left, prefix, rows = list(counts), [], []

    def extend() -> None:
        if len(prefix) == sum(counts):
            rows.append(list(prefix))
            return
        for kind, n in enumerate(left):
            if n:
                left[kind] -= 1
                prefix.append(kind)
                extend()
                prefix.pop()
                left[kind] += 1

    extend()
    return np.array(rows, dtype=np.int64).reshape(len(rows), sum(counts))


def play_every_order(matches: Sequence[Match], k: float = K_FACTOR, initial: float = INITIAL) -> dict[Hashable, float]:
    """The mean of `play` over every distinct order of the matches, all orders at once (numpy).

    Example: play_every_order([("a", "b", 1.0), ("a", "b", 0.0)]) -> {'a': 1000.0, 'b': 1000.0}
    """
    counts = Counter(matches)
    kinds = list(counts)
    players = list(dict.fromkeys(p for a, b, _ in kinds for p in (a, b)))
    index = {p: i for i, p in enumerate(players)}
    first = np.array([index[a] for a, _, _ in kinds])
    second = np.array([index[b] for _, b, _ in kinds])
    score = np.array([s for _, _, s in kinds], dtype=np.float64)
    orders = order_table(tuple(counts[m] for m in kinds))
    ratings = np.full((len(orders), len(players)), float(initial))
    rows = np.arange(len(orders))
    for step in range(orders.shape[1]):
        kind = orders[:, step]
        a, b = first[kind], second[kind]
        expected = 1.0 / (1.0 + 10.0 ** ((ratings[rows, b] - ratings[rows, a]) / 400.0))
        delta = k * (score[kind] - expected)
        ratings[rows, a] += delta
        ratings[rows, b] -= delta
    return dict(zip(players, ratings.mean(axis=0).tolist()))


def elo_ratings(matches: Sequence[Match], k: float = K_FACTOR, initial: float = INITIAL, orders: int = ORDERS,
                seed: int = 0, exact_orders: int = EXACT_ORDERS) -> dict[Hashable, float]:
    """Every player's Elo averaged over match orders (§8.2): every distinct order when there are at most
    `exact_orders`, else `orders` seeded shuffles. Rounded to 1e-9, so symmetric records tie exactly.

    Players who play no match are not in the result. Example: elo_ratings([("a", "b", 1.0)]) -> {'a': 1016.0, 'b': 984.0}
    """
    if orders < 1:
        raise ValueError(f"orders must be at least 1, got {orders}")
    if not matches:
        return {}
    if order_count(matches) <= exact_orders:
        return {player: round(rating, 9) for player, rating in play_every_order(matches, k, initial).items()}
    rng, order = random.Random(seed), list(matches)
    totals: dict[Hashable, float] = {}
    for _ in range(orders):
        rng.shuffle(order)
        for player, rating in play(order, k, initial).items():
            totals[player] = totals.get(player, 0.0) + rating
    return {player: round(total / orders, 9) for player, total in totals.items()}
