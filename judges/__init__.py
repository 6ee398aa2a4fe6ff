"""Judges: stages that score or compare candidate responses, and their parsing and scoring math as functions.

Self-rewarding (METHODS §1A), pairwise with both orders (§8.1), UltraFeedback's listwise ratings (§8.3), Multi-Elo (§8.2), CDR density ratios (§2), SCIR
consistency (§1B), CREAM's cross-iteration consistency (§1C), and the prompt templates they render. Each name is imported on first use, so
`import curate.judges` stays cheap.

Example: from curate.judges import parse_score, density_ratio; parse_score("Score: 4") -> 4.0
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from curate.lazy import lazy_attributes

_EXPORTS = {
    **dict.fromkeys(["parse_score", "mean_score", "SelfRewardJudge", "SelfRewardParams"], "self_reward"),
    **dict.fromkeys(["parse_pair_scores", "combine_orders", "verdict_entropy", "compare", "PairwiseJudge",
                     "PairwiseParams"], "pairwise"),
    **dict.fromkeys(["density_ratio", "sequence_score", "customize", "load_customization", "parse_domain",
                     "exemplar_text", "CDRJudge", "CDRParams"], "cdr"),
    **dict.fromkeys(["choice_probability", "order_averaged", "is_consistent", "SCIRFilter", "SCIRParams"], "scir"),
    **dict.fromkeys(["parse_ratings", "listwise_regex", "presentation_order", "map_back", "candidate_means",
                     "monotone_in_position", "load_aspects", "UltraFeedbackJudge", "UltraFeedbackParams"], "ultrafeedback"),
    **dict.fromkeys(["elo_ratings", "elo_update", "expected_score", "play_every_order"], "elo"),
    **dict.fromkeys(["candidate_elos", "multi_elo_ratings", "MultiElo", "MultiEloParams"], "multi_elo"),
    **dict.fromkeys(["load_template", "conversation_text", "Template"], "templates"),
    **dict.fromkeys(["rank_consistency", "consistency_weights", "cream_consistency", "cream_rewards"], "cream"),
    **dict.fromkeys(["CREAMJudge", "CREAMParams", "CREAMAvg"], "cream_stages"),
}

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name loads on first use
    from curate.judges.cream import consistency_weights, cream_consistency, cream_rewards, rank_consistency
    from curate.judges.cream_stages import CREAMAvg, CREAMJudge, CREAMParams
    from curate.judges.cdr import (CDRJudge, CDRParams, customize, density_ratio, exemplar_text, load_customization,
                                   parse_domain, sequence_score)
    from curate.judges.elo import elo_ratings, elo_update, expected_score, play_every_order
    from curate.judges.multi_elo import MultiElo, MultiEloParams, candidate_elos, multi_elo_ratings
    from curate.judges.pairwise import (PairwiseJudge, PairwiseParams, combine_orders, compare, parse_pair_scores,
                                        verdict_entropy)
    from curate.judges.scir import SCIRFilter, SCIRParams, choice_probability, is_consistent, order_averaged
    from curate.judges.self_reward import SelfRewardJudge, SelfRewardParams, mean_score, parse_score
    from curate.judges.templates import Template, conversation_text, load_template
    from curate.judges.ultrafeedback import (UltraFeedbackJudge, UltraFeedbackParams, candidate_means, listwise_regex,
                                             load_aspects, map_back, monotone_in_position, parse_ratings,
                                             presentation_order)
