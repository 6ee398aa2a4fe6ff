"""CHES scoring overhead: curate's path against a raw batched forward pass, in one run, same model and rows.

- curate: `ches_scores` (METHODS.md §5) through `HFBackend.hidden_states`: token counts for the
  truncation budget, length-bucketed batches, explicit per-row spans, float64 sums, Arrow columns.
- raw: the same token ids (`P + R + [EOS]`, cut to `max_length`) tokenised beforehand and not
  timed, then the model's backbone (no logits) over padded batches and the span sums on the
  tensors: (a) batches of `--batch` rows in arrival order, (b) the backend's own length-sorted
  batches, which leaves only curate's overhead as the difference.
Rows are a seeded sample of HH-RLHF harmless-base pairs. Prints rows/s of each and the ratio
curate/raw (goal >= 0.9); (b) and curate alternate in order over the repeats, (a) runs once.
Leaves out: GPU timings (run it on a GPU machine for those).

Example: python benchmarks/bench_ches.py --rows 64 --repeats 2
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np
import pyarrow as pa

from curate.backends.base import encode_pair, open_backend
from curate.backends.hf import length_batches
from curate.filters.ches import ches_from_sums, ches_scores
from curate.sources import SourceSpec, ingest

HH = "/work/shared/data/hh-rlhf-harmless-test/test.jsonl.gz"


def sample_pairs(path: str, rows: int, seed: int) -> pa.Table:
    """A seeded sample of parsed HH pairs. Example: sample_pairs(HH, 64, 0).num_rows -> 64"""
    table = ingest(SourceSpec(path=path, parse="hh"), ".").table
    picked = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=rows, replace=False))
    return table.take(pa.array(picked))


def encoded_rows(backend, table: pa.Table, max_length: int) -> list[tuple[list[int], int]]:
    """(ids cut to max_length, prompt length) for every chosen and rejected sequence, in row order."""
    out = []
    for messages, chosen, rejected in zip(*(table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected"))):
        for text in (chosen, rejected):
            ids, start = encode_pair(backend.tokenizer, messages, text)
            out.append((ids[:max_length], start))
    return out


def raw_pass(backend, encoded: list[tuple[list[int], int]], batches: list[list[int]]) -> list[tuple[float, float]]:
    """Backbone forward over the given batches (right padding) and the CHES of every pair."""
    import torch

    backbone = backend.model.get_decoder()
    sums: list = [None] * len(encoded)
    with torch.inference_mode():
        for batch in batches:
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), backend.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                ids[b, :len(encoded[i][0])] = torch.tensor(encoded[i][0])
                mask[b, :len(encoded[i][0])] = 1
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            for b, i in enumerate(batch):
                row, start = encoded[i]
                sums[i] = (hidden[b, start - 1: len(row) - 1].double().sum(0).numpy(), len(row) - start)
    return [ches_from_sums(sums[k][0], sums[k][1], sums[k + 1][0], sums[k + 1][1]) for k in range(0, len(sums), 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=HH)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="rows per raw batch in arrival order")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the cores really free)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)

    table = sample_pairs(args.data, args.rows, args.seed)
    backend = open_backend("transformers", args.model, dtype="float32")  # the object ches_scores reuses
    encoded = encoded_rows(backend, table, args.max_length)
    lengths = [len(ids) for ids, _ in encoded]
    arrival = [list(range(i, min(i + args.batch, len(encoded)))) for i in range(0, len(encoded), args.batch)]
    sorted_batches = list(length_batches(lengths, backend.batch_tokens, backend.max_rows))
    cut = sum(len(encode_pair(backend.tokenizer, m, t)[0]) > args.max_length
              for m, c, r in zip(*(table.column(x).to_pylist() for x in ("prompt", "chosen", "rejected"))) for t in (c, r))

    def timed(fn) -> tuple[float, object]:
        started = time.perf_counter()
        result = fn()
        return time.perf_counter() - started, result

    timed(lambda: ches_scores(table.slice(0, 4), model=args.model, max_length=args.max_length))  # warm-up
    seconds, raw = timed(lambda: raw_pass(backend, encoded, arrival))
    rates: dict[str, list[float]] = {"raw_arrival": [args.rows / seconds], "raw_sorted": [], "curate": []}
    for repeat in range(args.repeats):  # alternate the order, so drifting load hits both sides alike
        for side in (("raw_sorted", "curate") if repeat % 2 == 0 else ("curate", "raw_sorted")):
            if side == "curate":
                seconds, out = timed(lambda: ches_scores(table, model=args.model, max_length=args.max_length))
            else:
                seconds, _ = timed(lambda: raw_pass(backend, encoded, sorted_batches))
            rates[side].append(args.rows / seconds)
    scored = np.array(out.column("ln_ches").to_pylist(), dtype=float)
    agree = np.max(np.abs(scored - np.array([v[1] for v in raw])) / np.maximum(1.0, np.abs(scored)))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"CHES scoring, {args.model} fp32, {args.rows} HH pairs ({2 * args.rows} sequences, "
          f"{sum(lengths)} tokens after the {args.max_length}-token cut, {cut} sequences cut), "
          f"{args.threads} torch thread(s), median of {args.repeats}:")
    print(f"  raw backbone, batches of {args.batch} in arrival order: {med['raw_arrival']:7.2f} rows/s (once)")
    print(f"  raw backbone, the backend's length-sorted batches:   {med['raw_sorted']:7.2f} rows/s")
    print(f"  curate ches_scores (HFBackend.hidden_states):          {med['curate']:7.2f} rows/s")
    print(f"  ratio curate/raw: {med['curate'] / med['raw_arrival']:.3f} (arrival order), "
          f"{med['curate'] / med['raw_sorted']:.3f} (same batches)  (goal >= 0.9)")
    print(f"  max relative difference of ln_ches, curate vs raw: {agree:.2e}")
    print(f"  all rates: { {k: [round(x, 2) for x in v] for k, v in rates.items()} }")


if __name__ == "__main__":
    main()
