"""Inverse Constitutional AI, the math (METHODS.md §4): votes, their combination, filter, order, metrics.

ICAI compresses a preference set into a short ordered list of principles (a "constitution")
that lets an LLM reconstruct the labels. The steps are stages (`curate.judges.icai_stages`:
propose, embed, vote; `curate.judges.icai_fit`: cluster, filter) and one library function
(`curate.judges.icai_library.mine_principles`); this module holds what they share and what can
be checked by hand:
- the reply formats of proposing (`{"principles": [...]}`) and voting (`{"1": "A", ...}`),
  their parsers and the regexes that constrain a vLLM judge to them (§4 (c) 1, 4);
- the vote mapping back to the original order (§4 (c) 4): the preferred sample -> `for`, the
  other -> `against`, None -> `abstain`, Both -> `both`, anything else -> `invalid`;
- the combination over seeds: `unanimous` (all seeds equal, else abstain) or `majority` (more
  than half, else abstain);
- the filter (`for > against`, `for >= min_relevance * total`, `invalid < for + against +
  abstain`, optionally `for > abstain`) and the order (`for - against` or `for`, descending);
- the per-principle metrics acc = for/(for+against), relevance = (for+against)/total,
  perf = 2(acc - 0.5)·relevance (§4 (c) 6, Feedback-Forensics).
Leaves out: models, embeddings, KMeans (the stages) and the evaluation annotator
(`curate.judges.constitution`).

Example: combine_seeds(["for", "for", "against"], "majority") -> 'for'
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Literal

from curate.backends.params import FREE_TEXT_UNQUOTED
from curate.keys import row_coin

VOTES = ("for", "against", "abstain", "both", "invalid")
ANSWERS = ("A", "B", "Both", "None")
PREFIX = "Select the response that"
Combine = Literal["unanimous", "majority"]
OrderBy = Literal["for_minus_against", "for"]


# Proposing (§4 (c) 1) ---------------------------------------------------------------------------------


def propose_regex(count: int, max_tokens: int) -> str:
    """The JSON reply with exactly `count` principles, each `Select the response that ...` on one line.

    Principles are printable ASCII (`FREE_TEXT_UNQUOTED`: one byte each, and a token is at least
    one byte), so a reply of at most `max_tokens` characters always ends before `max_tokens` cuts
    it; each principle gets an equal share of what is left.
    Example: propose_regex(2, 160) -> '\\{"principles": \\["Select the response that [^"\\\\\\n]{3,37}", ...\\]\\}'
    """
    fixed = len('{"principles": []}') + count * (len(PREFIX) + len('"", ') + 1)
    free = max(12, (max_tokens - fixed) // max(1, count))
    item = r'"%s [a-z]%s{2,%d}"' % (PREFIX, FREE_TEXT_UNQUOTED, free - 1)  # a word first: never "..." or "<rule>"
    return r'\{"principles": \[' + ", ".join([item] * count) + r"\]\}"


def parse_principles(text: str | None) -> list[str] | None:
    """The principles of a proposal reply (JSON `{"principles": [...]}`, or quoted `Select the
    response that ...` strings when the JSON is broken), stripped and de-duplicated; None if none.

    Example: parse_principles('{"principles": ["Select the response that is shorter."]}') -> ['Select the response that is shorter.']
    """
    if not text:
        return None
    found: list[str] = []
    match = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        data = json.loads(match.group(0)) if match else None
        items = data.get("principles") if isinstance(data, dict) else None
        if isinstance(items, list):
            found = [s for s in items if isinstance(s, str)]
    except json.JSONDecodeError:
        pass
    if not found:
        found = re.findall(r'"(%s[^"\n]*)"' % PREFIX, text)
    out: list[str] = []
    for item in (" ".join(s.split()) for s in found):
        if item and item not in out:
            out.append(item)
    return out or None


# Voting (§4 (c) 4) -------------------------------------------------------------------------------------


def numbered(principles: list[str]) -> str:
    """Principles as a numbered list, 1-based, one per line. Example: numbered(["a", "b"]) -> '1. a\\n2. b'"""
    return "\n".join(f"{i}. {p}" for i, p in enumerate(principles, 1))


def vote_regex(count: int) -> str:
    """The JSON vote reply for `count` numbered principles, in order: {"1": "A", "2": "None", ...}.

    Example: vote_regex(2) -> '\\{"1": "(A|B|Both|None)", "2": "(A|B|Both|None)"\\}'
    """
    answer = "(" + "|".join(ANSWERS) + ")"
    return r"\{" + ", ".join(f'"{i}": "{answer}"' for i in range(1, count + 1)) + r"\}"


def vote_reply_chars(count: int) -> int:
    """The longest reply `vote_regex(count)` matches, in characters (so a token budget that fits it).

    Example: vote_reply_chars(2) -> 26
    """
    return 2 + sum(len(f'"{i}": "None"') for i in range(1, count + 1)) + 2 * max(0, count - 1)


def parse_votes(text: str | None, count: int) -> list[str | None]:
    """The answer per numbered principle (A, B, Both, None; None where missing or not one of those).

    Reads a JSON object, else `"n": "X"` pairs anywhere in the text. Example:
    parse_votes('{"1": "A", "2": "None"}', 3) -> ['A', 'None', None]
    """
    answers: dict[int, str] = {}
    if text:
        match = re.search(r"\{.*\}", text, re.DOTALL)
        try:
            data = json.loads(match.group(0)) if match else None
        except json.JSONDecodeError:
            data = None
        pairs = data.items() if isinstance(data, dict) else re.findall(r'"(\d+)"\s*:\s*"([^"]*)"', text)
        for key, value in pairs:
            try:
                number = int(key)
            except (TypeError, ValueError):
                continue
            canonical = {a.lower(): a for a in ANSWERS}.get(str(value).strip().lower())
            if canonical is not None and 1 <= number <= count:
                answers[number] = canonical
    return [answers.get(i) for i in range(1, count + 1)]


def map_vote(answer: str | None, flipped: bool) -> str:
    """One answer in the original order: A/B -> for/against (swapped when the shown order was flipped).

    `flipped` means the preferred sample was shown as B. Example: map_vote("B", flipped=True) -> 'for'
    """
    if answer in ("A", "B"):
        return "for" if (answer == "A") != flipped else "against"
    return {"Both": "both", "None": "abstain"}.get(answer or "", "invalid")


def combine_seeds(votes: list[str], method: Combine = "unanimous") -> str:
    """One vote from the votes of several seeds (§4 (c) 4): unanimous, or more than half; else abstain.

    Example: combine_seeds(["for", "for", "against"]) -> 'abstain'; with "majority" -> 'for'
    """
    if not votes:
        return "abstain"
    value, count = Counter(votes).most_common(1)[0]
    if method == "unanimous":
        return value if count == len(votes) else "abstain"
    if method == "majority":
        return value if count > len(votes) / 2 else "abstain"
    raise ValueError(f"combine must be 'unanimous' or 'majority', got {method!r}")


def heldout(row_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a row is held out for evaluation (§4 (c) 6): a seeded draw from its id, so the
    split does not depend on the sharding. Example: heldout("r1", 0.0) -> False
    """
    return row_coin(row_id, "icai:holdout", seed, fraction)


def chunks(order: list[int], size: int) -> list[list[int]]:
    """Principle indices cut into prompts of at most `size`. Example: chunks([3, 1, 2], 2) -> [[3, 1], [2]]"""
    return [order[i:i + size] for i in range(0, len(order), size)]


# Filter, order, metrics (§4 (c) 5, 6) -------------------------------------------------------------------


def tally(votes: list[str]) -> dict[str, int]:
    """Counts of each vote value and their total. Example: tally(["for", "abstain"])["total"] -> 2"""
    counts = Counter(votes)
    out = {v: counts.get(v, 0) for v in VOTES}
    out["total"] = sum(out.values())
    return out


def metrics(counts: dict[str, int]) -> dict[str, float | None]:
    """acc, relevance and perf of one principle from its vote counts (§4 (c) 6).

    Example: metrics({"for": 6, "against": 2, "total": 10}) -> {'acc': 0.75, 'relevance': 0.8, 'perf': 0.4}
    """
    decided = counts["for"] + counts["against"]
    total = counts["total"]
    acc = counts["for"] / decided if decided else None
    relevance = decided / total if total else None
    perf = 2 * (acc - 0.5) * relevance if acc is not None and relevance is not None else None
    return {"acc": acc, "relevance": relevance, "perf": perf}


def drop_reason(counts: dict[str, int], min_relevance: float | None = 0.1, majority_true: bool = True,
                majority_valid: bool = True, majority_relevant: bool = False) -> str | None:
    """Why a principle fails the filter of §4 (c) 5, or None when it is kept (first failing check).

    Example: drop_reason({"for": 1, "against": 0, "abstain": 19, "both": 0, "invalid": 0, "total": 20}) -> 'low_relevance'
    """
    f, a, total = counts["for"], counts["against"], counts["total"]
    if majority_true and f <= a:
        return "not_majority_for"
    if majority_relevant and f <= counts["abstain"]:
        return "not_majority_relevant"
    if min_relevance and f < min_relevance * total:
        return "low_relevance"
    if majority_valid and counts["invalid"] >= f + a + counts["abstain"]:
        return "mostly_invalid"
    return None


def order_key(counts: dict[str, int], order_by: OrderBy = "for_minus_against") -> int:
    """The sort key of a kept principle (descending). Example: order_key({"for": 6, "against": 2}) -> 4"""
    return counts["for"] - counts["against"] if order_by == "for_minus_against" else counts["for"]


def recluster_pool(max_principles: int, ratio: float = 1.5) -> int:
    """How many top principles are clustered again to pick `max_principles` (⌈ratio·n⌉, §4 (c) 5).

    Example: recluster_pool(5) -> 8
    """
    return math.ceil(ratio * max_principles)
