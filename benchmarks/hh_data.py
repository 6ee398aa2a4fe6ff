"""The HH-RLHF file the benchmarks and evaluations read, and a seeded sample of its pairs.

The harmless-base test split lives in ../shared/data (outside the repo); `CURATE_HH_FILE`
points elsewhere. Pairs are parsed as in pipelines/hh.yaml (prompt messages, chosen, rejected).

Example: from hh_data import hh_pairs; hh_pairs(100, seed=0).num_rows -> 100
"""
from __future__ import annotations

import argparse
import os

import pyarrow as pa

from curate.sources import SourceSpec, ingest

HH_FILE = os.environ.get("CURATE_HH_FILE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                        "shared", "data", "hh-rlhf-harmless-test", "test.jsonl.gz"))


def hh_pairs(n: int | None = None, seed: int = 0, path: str = HH_FILE) -> pa.Table:
    """All HH pairs, or a seeded sample of n. Example: hh_pairs(8, seed=1).column_names[:2] -> ['id', 'prompt']"""
    sample = {"n": n, "seed": seed} if n is not None else None
    return ingest(SourceSpec(path=path, parse="hh", sample=sample), ".").table


def hh_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options every HH evaluation shares: --data, --seed, --backend, --threads, --json.

    Example: args = hh_arguments(__doc__).parse_args(); use_threads(args)
    """
    parser = argparse.ArgumentParser(description=description.split("\n")[0])
    parser.add_argument("--data", default=HH_FILE, help="HH-RLHF jsonl(.gz) file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser


def use_threads(args: argparse.Namespace) -> None:
    """Set torch's thread count when `--threads` was given. Example: use_threads(args)"""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
