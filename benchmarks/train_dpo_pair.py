"""A real policy / reference pair made here from curate's own output (issue 14, item 3).

1. Runs pipelines/hh.yaml (HH-RLHF harmless-base pairs: parsed, non-empty, length-capped,
   deduplicated, TRL columns) on the local file in ../shared/data into `--run-dir`.
2. Reads the published shards with `datasets` as TRL reads them, leaves out every pair whose
   prompt is in one of the evaluation samples (benchmarks/eval_judges_hh.py seeds 0-2, 100 pairs;
   benchmarks/eval_noise_hh.py seeds 0-2, 200 rows), so the evaluations never score training pairs.
3. Trains SmolLM2-135M-Instruct with TRL's `DPOTrainer` (sigmoid loss, fp32, CPU) for `--steps`
   steps and saves the policy and its tokenizer to `--out` (default
   `$CURATE_CACHE/trained/smollm2-135m-dpo-hh`), with `training.json` (steps, seconds, loss and
   reward accuracy per logged step, the data it saw). The untouched SmolLM2-135M-Instruct is its
   reference: the DPO-over-SFT pair SPA's implicit reward, SCIR's p_imp and CDR assume.

Nothing is downloaded: the model is the offline built-in, the data the local HH file.
Example: python benchmarks/train_dpo_pair.py --steps 300
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time

from curate.config import load_pipeline
from curate.models import cache_dir, resolve_model
from curate.record import load_run
from curate.runner import run_pipeline
from hh_data import HH_FILE, hh_pairs  # benchmarks/ is on sys.path when run as a script

MODEL = "smollm2-135m-instruct"
HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINE = os.path.join(HERE, "..", "pipelines", "hh.yaml")
DEFAULT_OUT = os.path.join(cache_dir(), "trained", "smollm2-135m-dpo-hh")
log = logging.getLogger("train_dpo_pair")


def prompt_text(messages: list[dict]) -> str:
    """One string per conversational prompt, for matching. Example: prompt_text([{"role": "user", "content": "hi"}]) -> 'user: hi'"""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def evaluation_prompts() -> set[str]:
    """Prompts of every seeded evaluation sample the HH scripts draw (judges: 100 pairs; noise: 200 rows)."""
    from eval_noise_hh import load_subset  # beside hh_data on sys.path

    held = set()
    for seed in (0, 1, 2):
        for table in (hh_pairs(100, seed=seed), load_subset(HH_FILE, 200, seed, 0.0)[0]):
            held.update(prompt_text(p) for p in table.column("prompt").to_pylist())
    return held


def curate_pairs(run_dir: str) -> list[str]:
    """Run pipelines/hh.yaml on the local HH file into run_dir; return the published shards."""
    pipeline = load_pipeline(PIPELINE, [f"source.path={HH_FILE}", f"output={run_dir}"])
    stats = run_pipeline(pipeline)
    log.info("curate: %s pairs in, %s out", stats.get("rows_in"), stats.get("rows_out"))
    return load_run(run_dir).data_files


def training_set(files: list[str], held: set[str], rows: int, seed: int):
    """The curate shards as a `datasets` table, evaluation prompts left out, shuffled, first `rows`."""
    import datasets

    data = datasets.load_dataset("parquet", data_files=files, split="train")
    kept = data.filter(lambda row: prompt_text(row["prompt"]) not in held)
    log.info("pairs: %d published, %d after leaving out evaluation prompts", data.num_rows, kept.num_rows)
    kept = kept.shuffle(seed=seed)
    return kept.select(range(min(rows, kept.num_rows))), data.num_rows, kept.num_rows


def train(args: argparse.Namespace) -> dict:
    """DPO on curate's HH output; saves the policy to args.out and returns the training record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(args.seed)
    files = curate_pairs(args.run_dir)
    dataset, published, eligible = training_set(files, evaluation_prompts(), args.steps * args.batch, args.seed)
    reference = resolve_model(MODEL).path
    tokenizer = AutoTokenizer.from_pretrained(reference)
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    config = DPOConfig(output_dir=os.path.join(args.run_dir, "trainer"), max_steps=args.steps,
                       per_device_train_batch_size=args.batch, learning_rate=args.lr, beta=args.beta,
                       max_length=args.max_length, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
                       logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
                       dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    tmp = args.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {
        "reference": MODEL, "reference_path": reference, "steps": result.global_step, "batch": args.batch,
        "learning_rate": args.lr, "beta": args.beta, "max_length": args.max_length, "seed": args.seed,
        "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "training_loss": result.training_loss,
        "pairs_published": published, "pairs_eligible": eligible, "pairs_seen": dataset.num_rows,
        "log": [h for h in trainer.state.log_history if "loss" in h],
    }
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(record, f, indent=2)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=192, help="prompt + reply tokens (TRL truncates the rest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default=os.path.join("out", "dpo_pair_hh"))
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    record = train(args)
    tail = record["log"][-1] if record["log"] else {}
    print(f"trained {record['steps']} steps x {record['batch']} pairs in {record['train_seconds']} s "
          f"({record['threads']} threads); loss {record['training_loss']:.4f}; last logged reward accuracy "
          f"{tail.get('rewards/accuracies', float('nan')):.3f}; saved to {args.out}")


if __name__ == "__main__":
    main()
