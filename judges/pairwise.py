"""The stage `judges.pairwise`: a judge compares two answers in both orders (METHODS.md §8.1, FairEval).

For each pair, the judge prompt (template `pairwise`, hashed into the stage key) shows the
question and the two answers as Assistant 1 and Assistant 2 and asks for a 1-10 score each,
reasons first, ending with `Score of the Assistant 1: s1` and `Score of the Assistant 2: s2`.
- MEC: k samples per order (k=3, T=1 by default, §8.1); the last two score lines are parsed,
  unparseable samples dropped (counted as `parse_failures`, raw text kept).
- BPC: the same with the answers swapped; scores are mapped back to a / b. The final score of
  each answer is the mean over the valid samples of both orders; the verdict is win / tie / lose
  for answer a by comparing the means.
- HITLC: `fe_bpde` is the entropy (nats) of the win/tie/lose distribution of the 2k per-sample
  verdicts; the highest values are the cases to route to people.
Columns: `fe_texts_ab`, `fe_texts_ba` (raw), `fe_scores_ab`, `fe_scores_ba` (list of [a, b]
per valid sample, already in a/b terms), `fe_score_a`, `fe_score_b`, `fe_verdict`, `fe_bpde`,
`fe_swap_consistent` (the verdict of the first order alone equals that of the swapped order
alone). stats.json gets `swap_consistent` / `pairs_with_both_orders`: the share of pairs whose
verdict survives the swap. With `action: relabel`, pairs the judge reverses are swapped (reason
for ties: `fe_tie`), and every `fe_*` column and chosen/rejected score column is swapped with
them, so a relabelled row reads as a `win` for its new chosen; `mark` only adds the columns. Leaves out: routing to people itself.

Example: verdict_entropy(["win", "win", "win", "lose", "lose", "lose"]) -> 0.693
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.backends.base import ChatRequest, GenerationParams
from curate.backends.params import FREE_TEXT_CHAR, ModelParams, constrains, run_batched
from curate.contract import MESSAGES, StageOutput, put_columns, require, with_fields, with_reason
from curate.judges.templates import conversation_text, load_template
from curate.keys import row_seed
from curate.model_stage import ModelStage
from curate.pairing import swap_pairs
from curate.registry import register

SCORE_LINE = re.compile(r"Score of the Assistant ([12]):\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)
Verdict = Literal["win", "tie", "lose"]


def parse_pair_scores(text: str | None, low: float = 1.0, high: float = 10.0) -> tuple[float, float] | None:
    """(score of Assistant 1, score of Assistant 2) from the last lines naming each, or None.

    Example: parse_pair_scores("...\\nScore of the Assistant 1: 8\\nScore of the Assistant 2: 6") -> (8.0, 6.0)
    """
    if not text:
        return None
    found: dict[str, float] = {}
    for which, value in SCORE_LINE.findall(text):
        found[which] = float(value)  # later lines win: the last two lines count (§8.1 MEC)
    if set(found) != {"1", "2"} or not all(low <= v <= high for v in found.values()):
        return None
    return found["1"], found["2"]


def compare(a: float, b: float) -> Verdict:
    """Verdict for answer a. Example: compare(7, 5) -> 'win'"""
    return "win" if a > b else "lose" if a < b else "tie"


def verdict_entropy(verdicts: list[str]) -> float:
    """Entropy (nats) of the win/tie/lose distribution (BPDE, §8.1 HITLC).

    Example: verdict_entropy(["win"] * 3 + ["lose"] * 3) -> 0.6931
    """
    if not verdicts:
        return float("nan")
    counts = Counter(verdicts)
    return -sum(c / len(verdicts) * math.log(c / len(verdicts)) for c in counts.values())


def combine_orders(ab: list[tuple[float, float]], ba: list[tuple[float, float]]) -> dict[str, Any]:
    """Mean scores, verdict, entropy and swap consistency from both orders, in a/b terms.

    `ab` holds (a, b) per valid sample of the first order; `ba` holds (score shown as Assistant 1,
    Assistant 2) of the swapped order, i.e. (b, a). Example: combine_orders([(8, 6)], [(7, 5)])
    -> means 6.5 / 6.5, verdict 'tie' (§8.1 test)
    """
    mapped = [(a, b) for b, a in ba]
    both = ab + mapped
    if not both:
        return {"score_a": None, "score_b": None, "verdict": None, "bpde": None, "swap_consistent": None}
    score_a = sum(a for a, _ in both) / len(both)
    score_b = sum(b for _, b in both) / len(both)

    def order_verdict(samples: list[tuple[float, float]]) -> Verdict | None:
        if not samples:
            return None
        return compare(sum(a for a, _ in samples) / len(samples), sum(b for _, b in samples) / len(samples))

    first, second = order_verdict(ab), order_verdict(mapped)
    return {
        "score_a": score_a,
        "score_b": score_b,
        "verdict": compare(score_a, score_b),
        "bpde": verdict_entropy([compare(a, b) for a, b in both]),
        "swap_consistent": None if first is None or second is None else first == second,
    }


def constrained_regex(max_tokens: int) -> str:
    """Reasons on one line (printable ASCII, `FREE_TEXT_CHAR`), then the two score lines, short enough to fit in max_tokens.

    Example: constrained_regex(300) -> '[ -~]{1,242}\\nScore of the Assistant 1: ...'
    """
    score = "(10|[1-9])"
    tail = len("\nScore of the Assistant 1: 10\nScore of the Assistant 2: 10")  # 58 characters after the reasons
    return FREE_TEXT_CHAR + (r"{1,%d}\nScore of the Assistant 1: %s\nScore of the Assistant 2: %s"
                             % (max(16, max_tokens - tail), score, score))


class PairwiseParams(ModelParams):
    """Params of judges.pairwise. Example: PairwiseParams(model="smollm2-135m-instruct", samples=3)"""

    model: str = Field(description="the judge model")
    template: str = Field("pairwise", description="built-in template name or a .txt file with {prompt}, {answer_1}, {answer_2}")
    samples: int = Field(3, ge=1, description="samples per order (k), §8.1 MEC default 3")
    generation: GenerationParams = Field(GenerationParams(max_tokens=512, temperature=1.0),
                                         description="judge sampling (§8.1: T=1, max_tokens 512); n is set to `samples`")
    constrained: bool = Field(True, description="vllm, or a vLLM server (openai): constrain the output to reasons + the two score lines")
    a: str = Field("chosen", description="column of answer a")
    b: str = Field("rejected", description="column of answer b")
    action: Literal["mark", "relabel"] = Field("mark", description="mark: add columns; relabel: swap pairs the judge reverses, drop ties")


@register
class PairwiseJudge(ModelStage):
    """Judge two answers in both orders with k samples each (module docstring). Example: - stage: judges.pairwise"""

    name = "judges.pairwise"
    Params = PairwiseParams
    uses_seed = True

    def __init__(self, params: PairwiseParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        self.template = load_template(self.params.template, required=("prompt", "answer_1", "answer_2"))

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        p = self.params
        require(schema, {"id": pa.string(), "prompt": MESSAGES, p.a: pa.string(), p.b: pa.string()}, self.name)
        pairs = pa.list_(pa.list_(pa.float64()))
        return with_fields(schema, {
            "fe_texts_ab": pa.list_(pa.string()), "fe_texts_ba": pa.list_(pa.string()),
            "fe_scores_ab": pairs, "fe_scores_ba": pairs,
            "fe_score_a": pa.float64(), "fe_score_b": pa.float64(), "fe_verdict": pa.string(),
            "fe_bpde": pa.float64(), "fe_swap_consistent": pa.bool_(), "fe_model": pa.string(),
            self.error_column: pa.string(),
        })

    def _request(self, row_id: str, order: str, messages: list[dict], first: str, second: str) -> ChatRequest:
        p = self.params
        params = p.generation.model_copy(update={"n": p.samples})
        regex = constrained_regex(params.max_tokens) if constrains(p) else None
        text = self.template.render(prompt=conversation_text(messages), answer_1=first, answer_2=second)
        return ChatRequest([{"role": "user", "content": text}], params,
                           seed=row_seed(row_id, f"{self.stage_id}:{order}", self.seed) % (2**31), guided_regex=regex)

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        p = self.params
        rows = list(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist(),
                        table.column(p.a).to_pylist(), table.column(p.b).to_pylist()))
        requests = []
        for row_id, messages, a, b in rows:
            requests += [self._request(row_id, "ab", messages, a, b), self._request(row_id, "ba", messages, b, a)]
        answers = run_batched(self.models.get(p.model), requests, p.batch_size)
        return self._assemble(table, answers)

    def _assemble(self, table: pa.Table, answers: list) -> StageOutput:
        """Columns, errors, counters, and (relabel) the swapped / dropped rows."""
        cols: dict[str, list] = {k: [] for k in ("fe_texts_ab", "fe_texts_ba", "fe_scores_ab", "fe_scores_ba",
                                                 "fe_score_a", "fe_score_b", "fe_verdict", "fe_bpde",
                                                 "fe_swap_consistent", self.error_column)}
        counters = Counter(judgments=0, parse_failures=0, request_errors=0, row_errors=0, pairs_with_both_orders=0,
                           swap_consistent=0, verdict_win=0, verdict_tie=0, verdict_lose=0)
        for i in range(0, len(answers), 2):
            texts = [[c.text if c.error is None else None for c in answers[i + j]] for j in (0, 1)]
            parsed = [[parse_pair_scores(t) for t in order] for order in texts]
            valid = [[list(s) for s in order if s is not None] for order in parsed]
            summary = combine_orders([tuple(s) for s in valid[0]], [tuple(s) for s in valid[1]])
            counters["judgments"] += len(texts[0]) + len(texts[1])
            counters["request_errors"] += sum(t is None for order in texts for t in order)
            counters["parse_failures"] += sum(t is not None and s is None for o, so in zip(texts, parsed) for t, s in zip(o, so))
            if summary["verdict"] is None:
                counters["row_errors"] += 1
            else:
                counters[f"verdict_{summary['verdict']}"] += 1
            if summary["swap_consistent"] is not None:
                counters["pairs_with_both_orders"] += 1
                counters["swap_consistent"] += summary["swap_consistent"]
            cols["fe_texts_ab"].append(texts[0])
            cols["fe_texts_ba"].append(texts[1])
            cols["fe_scores_ab"].append(valid[0])
            cols["fe_scores_ba"].append([[a, b] for b, a in valid[1]])
            for key in ("score_a", "score_b", "verdict", "bpde", "swap_consistent"):
                cols[f"fe_{key}"].append(summary[key])
            cols[self.error_column].append(None if summary["verdict"] is not None else "no parseable verdict in either order")
        schema = self.output_schema(table.schema)
        arrays = {name: pa.array(values, schema.field(name).type) for name, values in cols.items()}
        arrays["fe_model"] = pa.array([self.params.model] * table.num_rows, pa.string())
        out = put_columns(table, arrays)
        return self._act(out, dict(counters))

    def _swapped(self, table: pa.Table, flip: pa.ChunkedArray) -> pa.Table:
        """Rows where `flip` is true with a and b exchanged, and every judge column re-oriented to match:
        `fe_score_a/b`, the two orders' texts and score lists, the verdict (lose -> win); with a/b =
        chosen/rejected also the other `*chosen*` / `*rejected*` columns and signed margins (`swap_pairs`).

        Example: stage._swapped(t, pa.chunked_array([[True]])).column("fe_verdict")[0] -> 'win'
        """
        p = self.params
        if (p.a, p.b) == ("chosen", "rejected"):
            table = swap_pairs(table, flip)
        else:
            table = put_columns(table, {p.a: pc.if_else(flip, table.column(p.b), table.column(p.a)),
                                        p.b: pc.if_else(flip, table.column(p.a), table.column(p.b))})
        column = table.column

        def reversed_pairs(name: str) -> pa.Array:  # each [a, b] sample as [b, a]
            rows = [None if row is None else [[s[1], s[0]] for s in row] for row in column(name).to_pylist()]
            return pa.array(rows, table.schema.field(name).type)

        scores_ab, scores_ba = reversed_pairs("fe_scores_ba"), reversed_pairs("fe_scores_ab")
        return put_columns(table, {
            "fe_score_a": pc.if_else(flip, column("fe_score_b"), column("fe_score_a")),
            "fe_score_b": pc.if_else(flip, column("fe_score_a"), column("fe_score_b")),
            "fe_texts_ab": pc.if_else(flip, column("fe_texts_ba"), column("fe_texts_ab")),
            "fe_texts_ba": pc.if_else(flip, column("fe_texts_ab"), column("fe_texts_ba")),
            "fe_scores_ab": pc.if_else(flip, scores_ab, column("fe_scores_ab")),
            "fe_scores_ba": pc.if_else(flip, scores_ba, column("fe_scores_ba")),
            "fe_verdict": pc.if_else(flip, pa.scalar("win"), column("fe_verdict")),
        })

    def _act(self, table: pa.Table, counters: dict[str, int]) -> StageOutput:
        """`relabel`: swap a/b where the verdict is lose; drop ties and unjudged rows with a reason."""
        if self.params.action == "mark":
            return StageOutput(table, counters=counters)
        verdict = table.column("fe_verdict")
        lose = pc.fill_null(pc.equal(verdict, "lose"), False)
        table = self._swapped(table, lose)
        verdict = table.column("fe_verdict")
        drop = pc.fill_null(pc.equal(verdict, "tie"), True)
        reasons = pc.if_else(pc.is_null(verdict), pa.scalar("fe_no_verdict"), pa.scalar("fe_tie"))
        rejected = with_reason(table.filter(drop), reasons.filter(drop))
        counters["relabelled"] = int(pc.sum(lose).as_py() or 0)
        return StageOutput(table.filter(pc.invert(drop)), rejected if rejected.num_rows else None, counters)
