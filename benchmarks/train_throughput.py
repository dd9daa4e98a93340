"""Tokens/s of the pretrain loop on Ray Train vs a bare single-process PyTorch loop.

Both train the same preset on the same random token rows, with the same micro-batch, sequence
length, optimizer (AdamW, clipping, warm-up + cosine) and number of CPU threads; the Ray Train run
uses one worker holding all the threads. Both count training time only (after the model is built;
the Ray loop's clock pauses while it logs and checkpoints), so the ratio measures what the loop and
Ray cost per step, not Ray's start-up. Each side's figure is the median of its per-step tokens/s
(the Ray loop logs every step to a throw-away MLflow store), which keeps a busy shared machine's
spikes out; the first step (allocator warm-up) is left out of both. The bare loop runs before and
after the Ray run, and the ratio is taken against the mean of its two medians. Target: >= 0.9.

    .venv/bin/python benchmarks/train_throughput.py --preset demo --seq-len 256 --batch-size 8 --steps 12
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from functools import partial

import numpy as np


def bare_loop(args: argparse.Namespace, rows: np.ndarray) -> list[float]:
    """The reference: a nanoGPT-style loop, nothing between PyTorch and the model. Tokens/s per step."""
    import torch

    from models.presets import build_model
    from tasks.train.optim import build_adamw, build_scheduler, parameter_groups
    from tasks.train.settings import TrainConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, warmup_steps=min(10, args.steps))
    model = build_model(args.preset, args.vocab, max_position_embeddings=max(512, args.seq_len))
    optimizer = build_adamw(parameter_groups(model, cfg.weight_decay), cfg, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg)
    order = np.random.default_rng(0).permutation(len(rows))
    rates = []
    for step in range(args.steps):
        start = time.perf_counter()
        idx = np.sort(order[step * args.batch_size : (step + 1) * args.batch_size])
        batch = torch.from_numpy(rows[idx].astype(np.int64))
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(args.batch_size * args.seq_len / (time.perf_counter() - start))
    return rates[1:]


def ray_train_loop(args: argparse.Namespace, path: str, workdir: str) -> tuple[list[float], int]:
    """The pretrain loop on Ray Train, one worker; tokens/s per step and the worker's torch threads."""
    import ray
    from mlflow import MlflowClient

    from models.presets import build_model
    from tasks.data.tokenize import TokenShards
    from tasks.tracking import RunLogger, start_run
    from tasks.train.data import PackedSequences
    from tasks.train.loop import TrainJob, run_training
    from tasks.train.objectives import NextToken
    from tasks.train.settings import TrainConfig

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    threads = ray.get(ray.remote(num_cpus=args.threads)(lambda: __import__("torch").get_num_threads()).remote())
    uri = f"sqlite:///{workdir}/mlflow.db"
    run_id = start_run(uri, "train-throughput", "ray", None, {})
    rows = np.load(path, mmap_mode="r")
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, warmup_steps=min(10, args.steps), num_workers=1,
        resources_per_worker={"CPU": args.threads}, checkpoint_every=args.steps, log_every=1, max_failures=0,
    )
    job = TrainJob(
        config=cfg,
        build_model=partial(build_model, args.preset, args.vocab, max_position_embeddings=max(512, args.seq_len)),
        objective=NextToken(),
        train_data=PackedSequences(TokenShards([path], [len(rows)], args.seq_len, str(rows.dtype))),
        logger=RunLogger(run_id, uri),
    )
    run_training(job, os.path.join(workdir, "ray"))
    ray.shutdown()
    history = MlflowClient(uri).get_metric_history(run_id, "train/tokens_per_s")
    return [m.value for m in sorted(history, key=lambda m: m.step) if m.step > 1], threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    # Threads set up as Ray sets up its workers (OMP_NUM_THREADS before torch loads), so that the
    # two loops differ only in what runs around the step.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory(prefix="crucible-bench-") as workdir:
        path = os.path.join(workdir, "tokens.npy")
        rng = np.random.default_rng(0)
        np.save(path, rng.integers(0, args.vocab, (args.steps * args.batch_size, args.seq_len), dtype=np.uint16))
        rows = np.load(path, mmap_mode="r")
        before = bare_loop(args, rows)
        ray_rates, threads = ray_train_loop(args, path, workdir)
        after = bare_loop(args, rows)

    bare = (statistics.median(before) + statistics.median(after)) / 2
    ray_median = statistics.median(ray_rates)
    print(f"preset={args.preset} vocab={args.vocab} seq_len={args.seq_len} batch={args.batch_size} "
          f"steps={args.steps} threads={args.threads} (torch threads in the Ray worker: {threads})")
    print(f"bare PyTorch loop : median {statistics.median(before):8.1f} tokens/s before, "
          f"{statistics.median(after):8.1f} after the Ray run")
    print(f"Ray Train loop    : median {ray_median:8.1f} tokens/s")
    print(f"ratio (Ray / bare): {ray_median / bare:.3f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
