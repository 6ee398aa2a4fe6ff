"""DONOD scores: the closed form against a naive per-sample SGD step on the output layer, in one run.

Same samples, same weights, same dtype for both:
- closed form: `donod_closed_form` (METHODS.md §7 (c)): logits, softmax and the T x T Gram per
  sample; ||W||² once for the run. Never builds the V x d gradient. Also batched
  (`donod_closed_form_batch`, what `filters.donod_score` runs): logits of several samples in
  one matrix product.
- naive: for each sample, copy the lm_head weight, `loss.backward()` through the output layer
  (logits = H Wᵀ, mean NLL), `W -= lr·grad`, take ||W'|| - ||W|| and ||W' - W||, restore W from the
  copy. This is what a per-sample weight-change score costs without the closed form.
The default setting is SmolLM2's output layer (V=49,152, d=576) with random weights (init
scale 0.02), random hidden states and targets, T drawn in [64, 128], 30 samples, float64. The
closed form must agree within `--tolerance` (1e-6, relative; asserted) with an untimed float64
reference: the same naive steps with DON taken without cancellation, (2<W,D> + ||D||²) /
(||W'|| + ||W||). The literal ||W'|| - ||W|| of norms ~1e2 that differ by ~1e-6 keeps only
~1e-6 relative in float64 (printed); with `--dtype float32` the naive step itself is below the
weights' resolution (lr·g ~1e-11 against ulp(0.02) ~2e-9), so only the closed form stays
meaningful there (run it with `--tolerance 1e-3`). Prints milliseconds per sample and the
speed ratio naive / closed form (goal >= 20x).

Then, with `--rows N` (> 0), the whole scorer against its honest limit: the closed form needs
exactly one forward pass, so `donod_scores` (through `filters.donod.score_with_backend`: the
transformers backend's hidden states in its length-sorted batches, then the batched closed
form in float64) is timed against a raw batched forward of the same model on the same rows:
the backbone over the same `P + R + [EOS]` ids in the same length-sorted batches and padding
(tokenised beforehand, not timed), then the output layer in fp32 at exactly the positions that
predict response tokens, the logits DONOD reads (logits at every prompt position too would make
the raw side do more than DONOD needs). The two alternate over `--forward-repeats` (median). Model:
`--model` (default SmolLM2-135M-Instruct, fp32) or `--random-model` (a random Llama at SmolLM2's
dimensions, for a machine without the model files, e.g. a GPU); rows: HH pairs' chosen replies
where the data is present, else seeded synthetic text. Prints `donod vs raw forward: X`
(rows/s of donod_scores over rows/s of the raw forward; goal >= 0.9).
Leaves out: the tied-embedding autograd variant.

Example: python benchmarks/bench_donod.py --samples 30 --dtype float64 --rows 32
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa


def naive_step_scores(weight, hs, ys, lr: float, stable: bool = False) -> list[tuple[float, float]]:
    """Per sample: copy W, backward on the output layer, W -= lr·grad, norms, restore W.

    DON is `||W'|| - ||W||` as defined, or with `stable` the same step's
    `(2<W, D> + ||D||²) / (||W'|| + ||W||)`, D = W' - W (equal in exact arithmetic; the literal
    difference of two norms of ~1e2 keeps only ~1e-12 absolute in float64).
    """
    import torch

    out = []
    for h, y in zip(hs, ys):
        saved = weight.detach().clone()
        weight.grad = None
        loss = torch.nn.functional.cross_entropy(h @ weight.T, y)
        loss.backward()
        with torch.no_grad():
            weight -= lr * weight.grad
            delta = weight - saved
            nod = float(delta.norm())
            if stable:
                don = float((2.0 * (saved * delta).sum() + nod * nod) / (weight.norm() + saved.norm()))
            else:
                don = float(weight.norm() - saved.norm())
            weight.copy_(saved)
        out.append((don, nod))
    return out


def closed_form_scores(weight, hs, ys, lr: float, chunk: int) -> list[tuple[float, float]]:
    """Per sample `donod_closed_form`, with ||W||² computed once for the run."""
    from curate.filters.donod import donod_closed_form

    w = weight.detach()
    norm_sq = float((w.double() * w.double()).sum())
    return [donod_closed_form(w, h, y, lr, chunk=chunk, w_norm_sq=norm_sq) for h, y in zip(hs, ys)]


def batched_scores(weight, hs, ys, lr: float, chunk: int, block_rows: int) -> list[tuple[float, float]]:
    """`donod_closed_form_batch`: the samples' logits in shared products of up to `block_rows` positions."""
    from curate.filters.donod import donod_closed_form_batch

    w = weight.detach()
    norm_sq = float((w.double() * w.double()).sum())
    return donod_closed_form_batch(w, hs, ys, lr, chunk=chunk, w_norm_sq=norm_sq, block_rows=block_rows)


def timed(fn, repeats: int) -> tuple[float, list]:
    """Best wall time of `repeats` calls and the last result (CUDA synchronised)."""
    import torch

    times, result = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times), result


def forward_rows(rows: int, seed: int) -> pa.Table:
    """HH pairs (seeded sample) where the data is present, else seeded synthetic prompt / reply text."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hh_data import HH_FILE, hh_pairs

    if os.path.exists(HH_FILE):
        return hh_pairs(rows, seed=seed)
    rng = np.random.default_rng(seed)
    words = ("the data model pair reply prompt answer question token score rows part stage judge "
             "filter seed batch label reward policy").split()
    text = [" ".join(rng.choice(words, size=int(k))) for k in rng.integers(20, 160, size=2 * rows)]
    return pa.table({"id": [f"s{i}" for i in range(rows)],
                     "prompt": pa.array([[{"role": "user", "content": text[2 * i]}] for i in range(rows)],
                                        pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                     "chosen": [text[2 * i + 1] for i in range(rows)]})


def random_model_folder(tokenizer_from: str | None) -> str:
    """A random Llama at SmolLM2-135M's dimensions (tied embeddings) saved to a temporary folder."""
    import tempfile

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    path = tempfile.mkdtemp(prefix="donod-random-")
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return path


def raw_forward(backend, encoded: list[tuple[list[int], int]], batches: list[list[int]]) -> None:
    """The model's forward over the given batches (the backend's padding side), then the output layer
    (fp32 logits over the vocabulary) at exactly the positions that predict response tokens: the
    forward pass DONOD's closed form needs, and no more."""
    import torch

    backbone = backend.model.get_decoder()
    head = backend.model.get_output_embeddings()
    with torch.inference_mode():
        for batch in batches:
            ids, mask, positions, offsets = backend._padded([encoded[i][0] for i in batch], backend.padding_side)
            hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            for b, i in enumerate(batch):
                row, start = encoded[i]
                head(hidden[b, offsets[b] + start - 1: offsets[b] + len(row) - 1])
            if torch.cuda.is_available():
                torch.cuda.synchronize()


def forward_ratio(args: argparse.Namespace) -> None:
    """`donod_scores` rows/s over a raw batched forward's rows/s, same model, rows and batches."""
    from curate.backends.base import encode_pair, open_backend
    from curate.backends.hf import length_batches
    from curate.filters.donod import OutputLayer, score_with_backend

    model = args.model
    if args.random_model:
        from curate.models import resolve_model

        model = random_model_folder(args.tokenizer or resolve_model("smollm2-135m-instruct").path)
    table = forward_rows(args.rows, args.seed)
    backend = open_backend("transformers", model, dtype="float32")
    layer = OutputLayer.of(backend.model)  # read once, as the stage does in open()
    messages, replies = table.column("prompt").to_pylist(), table.column("chosen").to_pylist()
    encoded = [(ids[:args.max_length], start) for ids, start in
               (encode_pair(backend.tokenizer, m, r) for m, r in zip(messages, replies))]
    batches = list(length_batches([len(e) for e, _ in encoded], backend.batch_tokens, backend.max_rows))
    tokens = sum(len(e) for e, _ in encoded)
    print(f"\nforward check: {args.rows} rows ({tokens} tokens, {len(batches)} length-sorted batches), "
          f"{'random ' if args.random_model else ''}{backend.name}, fp32 weights, on {backend.device}")
    score_with_backend(table.slice(0, 2), backend, max_length=args.max_length, layer=layer)  # warm-up
    raw_forward(backend, encoded, [[0, 1]])
    rates: dict[str, list[float]] = {"donod": [], "raw": []}
    for repeat in range(args.forward_repeats):
        for side in (("raw", "donod") if repeat % 2 == 0 else ("donod", "raw")):
            started = time.perf_counter()
            if side == "raw":
                raw_forward(backend, encoded, batches)
            else:
                score_with_backend(table, backend, max_length=args.max_length, layer=layer)
            rates[side].append(args.rows / (time.perf_counter() - started))
    donod, raw = statistics.median(rates["donod"]), statistics.median(rates["raw"])
    print(f"donod_scores: {donod:8.3f} rows/s   raw forward (response logits): {raw:8.3f} rows/s   "
          f"(medians of {args.forward_repeats}, alternating)")
    print(f"donod vs raw forward: {donod / raw:.3f}  (goal >= 0.9)")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152, help="V (SmolLM2: 49,152)")
    parser.add_argument("--dim", type=int, default=576, help="d (SmolLM2: 576)")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--t-min", type=int, default=64)
    parser.add_argument("--t-max", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--chunk", type=int, default=256, help="positions per Gram block of the closed form")
    parser.add_argument("--block-rows", type=int, default=512, help="positions per shared product of the batched form")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each (best is kept)")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest relative difference allowed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a busy machine 1 avoids stalls of small products")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=0, help="rows of the forward check (0: skip it)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model of the forward check")
    parser.add_argument("--random-model", action="store_true", help="forward check on a random Llama at SmolLM2's size")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --random-model (default: SmolLM2's)")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per row of the forward check")
    parser.add_argument("--forward-repeats", type=int, default=3, help="alternating timed runs of the forward check")
    parser.add_argument("--skip-step", action="store_true", help="only the forward check")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if not args.skip_step:
        step_ratio(args)
    if args.rows > 0:
        forward_ratio(args)


def step_ratio(args: argparse.Namespace) -> None:
    """The closed form against the naive per-sample SGD step on the output layer alone."""
    import torch

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    weight = (0.02 * torch.randn(args.vocab, args.dim, generator=gen, dtype=torch.float64)).to(args.device, dtype)
    weight = torch.nn.Parameter(weight)
    lengths = np.random.default_rng(args.seed).integers(args.t_min, args.t_max + 1, size=args.samples)
    # Hidden states of norm ~ 4·sqrt(d), like a final RMSNorm output: logits have std ~ 2.
    hs = [(4.0 * torch.randn(int(t), args.dim, generator=gen, dtype=torch.float64)).to(args.device, dtype) for t in lengths]
    ys = [torch.randint(0, args.vocab, (int(t),), generator=gen).to(args.device) for t in lengths]
    print(f"V={args.vocab} d={args.dim} samples={args.samples} T in [{lengths.min()}, {lengths.max()}] "
          f"(mean {lengths.mean():.0f}) {args.dtype} on {args.device}, torch threads {torch.get_num_threads()}")

    closed_form_scores(weight, hs[:2], ys[:2], args.lr, args.chunk)  # warm-up: allocator, kernels
    naive_step_scores(weight, hs[:2], ys[:2], args.lr)
    t_closed, closed = timed(lambda: closed_form_scores(weight, hs, ys, args.lr, args.chunk), args.repeats)
    batched_scores(weight, hs[:2], ys[:2], args.lr, args.chunk, args.block_rows)
    t_batch, batch = timed(lambda: batched_scores(weight, hs, ys, args.lr, args.chunk, args.block_rows), args.repeats)
    t_naive, naive = timed(lambda: naive_step_scores(weight, hs, ys, args.lr), args.repeats)

    # Untimed reference: the same naive steps in float64 with DON taken without cancellation.
    if args.dtype == "float64":
        weight64, hs64 = weight, hs
    else:
        weight64 = torch.nn.Parameter(weight.detach().double())
        hs64 = [h.double() for h in hs]
    checked = naive_step_scores(weight64, hs64, ys, args.lr, stable=True)

    a, b, c = np.array(closed), np.array(naive), np.array(checked)

    def rel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.abs(x - y) / np.maximum(np.abs(y), 1e-300)

    print(f"DON range [{c[:, 0].min():.4g}, {c[:, 0].max():.4g}], NOD range [{c[:, 1].min():.4g}, {c[:, 1].max():.4g}]")
    exact = np.maximum(rel(a, c), rel(np.array(batch), c))
    print(f"closed form ({args.dtype}, per sample and batched) vs the float64 naive step: largest relative difference DON {exact[:, 0].max():.3g}, "
          f"NOD {exact[:, 1].max():.3g} (tolerance {args.tolerance:g}; naive DON as (2<W,D> + ||D||²) / (||W'|| + ||W||))")
    literal = rel(b, c)
    print(f"timed naive step ({args.dtype}, DON = ||W'|| - ||W||) vs the same reference: DON {literal[:, 0].max():.3g}, "
          f"NOD {literal[:, 1].max():.3g} (||W|| = {float(weight.detach().double().norm()):.4g}: the norms cancel)")
    rho = np.corrcoef(np.argsort(np.argsort(b[:, 0])), np.argsort(np.argsort(c[:, 0])))[0, 1]
    print(f"DON rank correlation of the timed naive step with the reference: {rho:.6f}")
    print(f"closed form, per sample: {t_closed / args.samples * 1e3:9.2f} ms/sample   ({statistics.fmean(lengths):.0f} tokens)")
    print(f"closed form, batched:    {t_batch / args.samples * 1e3:9.2f} ms/sample   (blocks of {args.block_rows} positions)")
    print(f"naive step:              {t_naive / args.samples * 1e3:9.2f} ms/sample")
    print(f"speed ratio naive / closed form: {t_naive / t_closed:.1f}x per sample, {t_naive / t_batch:.1f}x batched (goal >= 20x)")
    assert exact.max() <= args.tolerance, f"closed form and naive step differ by {exact.max():.3g} (relative)"


if __name__ == "__main__":
    main()
