"""Full fine-tuning vs LoRA on the same model and data: peak memory of the training worker and tokens/s.

Both runs are the whole ``sft`` stage as users run it (``run_pipeline`` on a config with
``init_from``), one after the other in one process, on a freshly initialised checkpoint of a
Llama preset (default ``124m``: ~110M parameters with a 4k vocabulary) saved outside the store,
with the demo chat data. Full fine-tuning keeps gradients and two AdamW moments for every
weight; LoRA keeps them for the adapters only, so its worker's peak RSS should be far lower.

    .venv/bin/python benchmarks/lora_vs_full.py [--preset 124m] [--steps 6] [--batch-size 4]

Prints one row per method: peak RSS of the (rank-0) training worker, mean training tokens/s,
the stage's wall time; then the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("CRUCIBLE_PROGRESS", "0")


def make_checkpoint(folder: Path, preset: str, chat_dir: Path) -> None:
    from models.presets import build_model
    from models.tokenizer import save_tokenizer, train_tokenizer

    texts = []
    for line in (chat_dir / "sft_train.jsonl").read_text().splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    tokenizer = train_tokenizer(texts, 4096)
    build_model(preset, len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="124m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()

    from tasks.config import validate_config
    from tasks.data.demo_chat import write_demo_chat
    from tasks.engine import run_pipeline

    work = Path(tempfile.mkdtemp(prefix="crucible-lora-bench-"))
    os.environ["CRUCIBLE_HOME"] = str(work / "home")
    chat = write_demo_chat(work / "chat")["sft_train"].parent
    checkpoint = work / "checkpoint"
    make_checkpoint(checkpoint, args.preset, chat)
    rows = {}
    for method, lora in (("full", None), ("lora", {"r": 16, "alpha": 32})):
        sft = {
            "init_from": str(checkpoint), "data": [{"name": "chat", "path": str(chat / "sft_train.jsonl")}],
            "val_fraction": 0.0, "steps": args.steps, "batch_size": args.batch_size, "warmup_steps": 1,
            "max_length": args.max_length, "log_every": 1, "checkpoint_every": 10_000, "sample_tokens": 4,
            "resources_per_worker": {"CPU": 2}, **({"lora": lora} if lora else {}),
        }
        cfg = validate_config({"name": f"bench-{method}", "store": str(work / "store"), "sft": sft}, "benchmark")
        started = time.monotonic()
        (outcome,) = run_pipeline(cfg)
        metrics = outcome.manifest.metrics
        rows[method] = {
            "peak_rss_mb": metrics["train/peak_rss_mb"],
            "tokens_per_s": metrics["train/mean_tokens_per_s"],
            "stage_s": time.monotonic() - started,
        }
    print(f"\npreset {args.preset}, {args.steps} steps of {args.batch_size} conversations, 1 worker (2 CPUs)")
    print(f"{'method':<6} {'peak RSS (MB)':>14} {'tokens/s':>10} {'stage (s)':>10}")
    for method, row in rows.items():
        print(f"{method:<6} {row['peak_rss_mb']:>14.0f} {row['tokens_per_s']:>10.0f} {row['stage_s']:>10.1f}")
    print(f"LoRA / full: peak RSS {rows['lora']['peak_rss_mb'] / rows['full']['peak_rss_mb']:.2f}, "
          f"tokens/s {rows['lora']['tokens_per_s'] / rows['full']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
