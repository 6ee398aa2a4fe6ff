"""Filters: stages that keep or drop rows, each with a reason per dropped row, and their methods as functions.

Every public function takes a `pyarrow.Table` (or a polars / pandas DataFrame or a
`datasets.Dataset`, returned as the same type) and is imported on first use, so
`import curate.filters` stays cheap. Modules: `ches` (METHODS §5), `spa` (SPA margins and
threshold, §6A), `noise` (EM label confidence, §6B), `margins` (their shared numerics),
`spa_rewards` (SPA's per-candidate implicit rewards, §6A), `ranking_difficulty` (§8.6), `donod` (§7) with its TOPSIS ranking in
`topsis_rank`, `near_dup`, `dedup`, `text`, `rps` (§6C), `length_bias` (§8.2).

Example: from curate.filters import ches_scores, ches_select, donod_select
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from curate.lazy import lazy_attributes

_EXPORTS = {
    # CHES, METHODS §5
    **dict.fromkeys(["ches_scores", "ches_select", "ches_cut", "ches_keep_mask", "ches_from_hidden", "ches_from_sums",
                     "ches_from_full", "ChesScore", "ChesFilter"], "ches"),
    # noise-aware label confidence: SPA margins and smoothing (§6A), EM flip rate (§6B)
    **dict.fromkeys(["implicit_margins", "spa_filter", "spa_threshold", "spa_label_smoothing", "SPAScore", "SPAFilter"],
                    "spa"),
    **dict.fromkeys(["pref_conf", "noise_filter", "em_flip_rate", "flip_posterior", "rdpo_loss", "cdpo_loss", "NoiseEM"],
                    "noise"),
    "dpo_loss": "margins",
    "swap_pairs": "curate.pairing",  # one place for swapping chosen and rejected (judges and filters.noise_em)
    **dict.fromkeys(["implicit_rewards", "candidate_rewards"], "spa_rewards"),  # SPA's annotation half, §6A
    # DONOD and TOPSIS, §7
    **dict.fromkeys(["donod_scores", "donod_select", "donod_fit", "donod_mark", "donod_closed_form",
                     "donod_closed_form_batch", "donod_autograd", "DonodScore", "DonodFilter"], "donod"),
    **dict.fromkeys(["topsis", "topsis_fit", "topsis_closeness", "TopsisFit"], "topsis_rank"),
    **dict.fromkeys(["near_duplicates", "prompt_duplicates", "pair_similarity", "greedy_duplicates", "embed",
                     "load_embedder", "NearDup"], "near_dup"),
    **dict.fromkeys(["dedup_keys", "first_ids", "ExactDedup"], "dedup"),
    **dict.fromkeys(["NonEmptyFilter", "LengthFilter", "RangeFilter"], "text"),
    # RPS consensus, §6C; the length-bias check and its rebalancing, §8.2
    **dict.fromkeys(["rps_consensus", "rps_filter", "neighbour_directions", "pair_consensus", "RPSFilter"], "rps"),
    **dict.fromkeys(["length_bias_check", "length_columns", "length_rebalance", "length_buckets", "LengthBalance"],
                    "length_bias"),
    # ranking accuracy and difficulty, §8.6
    **dict.fromkeys(["difficulty_scores", "difficulty_of", "difficulty_columns", "flip_loss_threshold",
                     "ideal_log_margin", "ideal_ratio", "RankingDifficulty"], "ranking_difficulty"),
}

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name loads on first use
    from curate.filters.ches import (ChesFilter, ChesScore, ches_cut, ches_from_full, ches_from_hidden, ches_from_sums,
                                     ches_keep_mask, ches_scores, ches_select)
    from curate.filters.dedup import ExactDedup, dedup_keys, first_ids
    from curate.filters.donod import (DonodFilter, DonodScore, donod_autograd, donod_closed_form, donod_closed_form_batch,
                                      donod_fit, donod_mark, donod_scores, donod_select)
    from curate.filters.near_dup import (NearDup, embed, greedy_duplicates, load_embedder, near_duplicates,
                                         pair_similarity, prompt_duplicates)
    from curate.filters.margins import dpo_loss
    from curate.filters.noise import NoiseEM, cdpo_loss, em_flip_rate, flip_posterior, noise_filter, pref_conf, rdpo_loss
    from curate.filters.spa import (SPAFilter, SPAScore, implicit_margins, spa_filter, spa_label_smoothing,
                                    spa_threshold)
    from curate.pairing import swap_pairs
    from curate.filters.spa_rewards import candidate_rewards, implicit_rewards
    from curate.filters.length_bias import (LengthBalance, length_bias_check, length_buckets, length_columns,
                                            length_rebalance)
    from curate.filters.rps import RPSFilter, neighbour_directions, pair_consensus, rps_consensus, rps_filter
    from curate.filters.ranking_difficulty import (RankingDifficulty, difficulty_columns, difficulty_of,
                                                   difficulty_scores, flip_loss_threshold, ideal_log_margin,
                                                   ideal_ratio)
    from curate.filters.text import LengthFilter, NonEmptyFilter, RangeFilter
    from curate.filters.topsis_rank import TopsisFit, topsis, topsis_closeness, topsis_fit
