"""Every filter as a plain function on your own data (README "Filters as library functions").

Runs on 12 HH-RLHF pairs from ../shared/data with SmolLM2-135M-Instruct as the scoring model
and MiniLM for embeddings; each call takes a pyarrow Table, a polars or pandas DataFrame or a
datasets.Dataset and returns the same type. About a minute on 2 CPU cores.

Example: python examples/filters_as_functions.py
"""
import os

import polars as pl

from curate.filters.ches import ches_scores, ches_select
from curate.filters.donod import donod_scores, donod_select
from curate.filters.near_dup import near_duplicates
from curate.filters.noise import noise_filter, pref_conf
from curate.filters.spa import implicit_margins, spa_filter
from curate.sources import SourceSpec, ingest

HH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf-harmless-test", "test.jsonl.gz")
pairs = ingest(SourceSpec(path=HH, parse="hh", sample={"n": 12, "seed": 0}), ".").table
frame = pl.from_arrow(pairs)  # any supported frame type works the same way

frame = ches_scores(frame, model="smollm2-135m-instruct")            # ches, ln_ches
frame = ches_select(frame, mode="keep_lowest", fraction=0.25)       # ches_keep (global quantile)
frame = implicit_margins(frame, "smollm2-135m-instruct", "none")    # spa_margin (no reference here: warned)
frame, eps_hat = pref_conf(frame, "spa_margin")                     # pref_conf, EM flip rate
frame = spa_filter(frame, quantile=0.1, action="smooth")            # spa_noisy, label_smoothing
weighted = noise_filter(frame, "spa_margin", action="weight")       # keep all rows, weights only
frame = donod_scores(frame, model="smollm2-135m-instruct")          # donod_don, donod_nod
frame = donod_select(frame, keep_fraction=0.3)                      # donod_topsis, donod_keep
frame = near_duplicates(frame, level="prompt", threshold=0.95)      # near_dup_keep

print(type(frame).__name__, frame.shape, f"eps_hat={eps_hat:.3f}")
print(frame.select(["id", "ln_ches", "ches_keep", "spa_margin", "pref_conf", "donod_topsis", "donod_keep",
                    "near_dup_keep"]).head(6))
