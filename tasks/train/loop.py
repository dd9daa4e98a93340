"""The one training loop every training stage runs, on Ray Train.

``run_training(job, storage)`` starts a ``TorchTrainer``: ``config.num_workers`` workers, each
building the model, wrapping it in the configured strategy (DDP, DeepSpeed ZeRO, FSDP) and
training on its slice of every global batch (``tasks/train/order.py``). What is optimised comes
from the job's ``Objective``; everything else is here: AdamW with warm-up + cosine, gradient
accumulation, clipping, precision, validation, metrics, checkpoints and export.

Recovery. Every ``checkpoint_every`` steps (and at the last step) the workers write model,
optimizer, schedule, data position and RNG states and report them with ``ray.train.report``.
Ray Train restarts a failed worker group from the latest checkpoint (``max_failures`` times), and
because the storage lives in the stage's own folder, rerunning the stage after a crash resumes
from there too: Ray Train v2 restores a run's checkpoints from its storage folder. A run found
already at its last step only re-exports.

Metrics go to MLflow from rank 0 through ``RunLogger`` (Ray Train v2 has no MLflow callback);
an attempt that starts from a checkpoint logs ``train/resumed_from_step`` once, at that step.
For tests of that recovery, ``CRUCIBLE_TRAIN_FAULT_STEP=k`` makes the last worker exit abruptly
at step k of a run that did not start from a checkpoint.
"""

from __future__ import annotations

import math
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from models.flops import mfu, training_flops_per_token
from tasks.tracking import RunLogger
from tasks.train.checkpoint import Progress, load_checkpoint, save_checkpoint, seed_everything
from tasks.train.data import ExampleSource
from tasks.train.export import export_hf
from tasks.train.metrics import Stopwatch, cost_usd, progress_line
from tasks.train.objectives import Objective, ObjectiveOutput
from tasks.train.order import GlobalOrder, micro_batch_position, validation_indices
from tasks.train.settings import TrainConfig
from tasks.train.strategies import Strategy, build_strategy

FAULT_ENV = "CRUCIBLE_TRAIN_FAULT_STEP"


@dataclass
class TrainJob:
    """Everything a run needs; pickled to every Ray worker, so sources open their files lazily."""

    config: TrainConfig
    build_model: Callable[[], PreTrainedModel]  # called on each worker, after seeding
    objective: Objective
    train_data: ExampleSource
    val_data: ExampleSource | None = None
    logger: RunLogger | None = None  # used on rank 0 only
    export_path: str | None = None  # where rank 0 writes the final model (HF format)
    export_fs: pafs.FileSystem | None = None
    adapter_path: str | None = None  # where rank 0 writes LoRA adapters, for a model that has them


@dataclass
class TrainOutcome:
    metrics: dict[str, float]  # the final summary (train/val loss, tokens, throughput, cost)
    checkpoint_path: str | None


# ---------------------------------------------------------------------------------- one worker


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _all_reduce_sum(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Sum scalars over workers in one collective."""
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(packed)
    return packed.tolist()


def _flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    try:
        return training_flops_per_token(model.config, seq_len)
    except AttributeError:  # not a Llama-style config: the 6N estimate alone
        return 6.0 * model.num_parameters()


def _throughput(prefix: str, tokens: int, flops: float, seconds: float, peak: float, world: int) -> dict[str, float]:
    if seconds <= 0 or tokens == 0:
        return {f"{prefix}tokens_per_s": 0.0, f"{prefix}mfu": 0.0}
    return {
        f"{prefix}tokens_per_s": tokens / seconds,
        f"{prefix}mfu": mfu(tokens / seconds, flops / tokens, peak, world),
    }


def evaluate(
    strategy: Strategy, objective: Objective, source: ExampleSource, cfg: TrainConfig, rank: int, world: int
) -> dict[str, float]:
    """Token-weighted validation loss over a fixed prefix of ``source``, its perplexity, and the
    objective's own metrics averaged over micro-batches.

    Every rank runs the same number of forward passes (sharded strategies need them in step).
    """
    strategy.model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=strategy.device)
    token_sum = torch.zeros((), dtype=torch.float64, device=strategy.device)
    extra: dict[str, torch.Tensor] = {}
    batches = validation_indices(len(source), rank, world, cfg.batch_size, cfg.eval_batches)
    with torch.no_grad():
        for indices in batches:
            batch = _to_device(source.collate(indices), strategy.device)
            with strategy.autocast():
                out = objective.compute(strategy.model, batch)
            loss_sum += out.loss.double() * out.tokens
            token_sum += out.tokens
            _accumulate(extra, out.metrics, strategy.device)
    strategy.model.train()
    names = sorted(extra)
    total_loss, total_tokens, count, *sums = _all_reduce_sum(
        [loss_sum, token_sum, len(batches), *(extra[k] for k in names)], strategy.device
    )
    loss = total_loss / max(total_tokens, 1.0)
    metrics = {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}
    return metrics | {f"val/{k}": v / max(count, 1.0) for k, v in zip(names, sums)}


class _Window:
    """Per-worker sums since the last log, reduced over workers when the loop reports."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float32, device=self.device)
        self.extra: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.tokens = 0
        self.flops = 0.0

    def add(self, out: ObjectiveOutput, tokens: int, flops: float) -> None:
        self.loss += out.loss.detach().float()
        _accumulate(self.extra, out.metrics, self.device)
        self.micro_batches += 1
        self.tokens += tokens
        self.flops += flops

    def reduce(self) -> tuple[dict[str, float], int, float]:
        """(mean loss and objective metrics, tokens, FLOPs) over every worker; clears the window."""
        names = sorted(self.extra)
        count, tokens, flops, loss, *extra = _all_reduce_sum(
            [self.micro_batches, self.tokens, self.flops, self.loss, *(self.extra[k] for k in names)], self.device
        )
        means = {"loss": loss / max(count, 1.0)} | {k: v / max(count, 1.0) for k, v in zip(names, extra)}
        self.reset()
        return means, int(tokens), flops


def _accumulate(sums: dict[str, torch.Tensor], metrics: dict[str, Any], device: torch.device) -> None:
    for name, value in metrics.items():
        value = torch.as_tensor(value).detach().to(device, torch.float32)
        sums[name] = sums[name] + value if name in sums else value


def _report_checkpoint(strategy: Strategy, objective: Objective, progress: Progress, rank: int, metrics: dict[str, float]) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="crucible-ckpt-") as tmp:
        save_checkpoint(tmp, strategy, progress, rank, objective)
        ray.train.report(
            {"step": progress.step, **metrics},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step_{progress.step:08d}",
        )


def _die_after_checkpoints_commit() -> None:
    """The injected fault: exit abruptly, once the controller has recorded every checkpoint so far.

    (A report still queued on a worker dies with it; real crashes come long after the report.)
    """
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    os._exit(1)


def _train_step(
    job: TrainJob, strategy: Strategy, order: GlobalOrder, step: int, rank: int, world: int, window: _Window
) -> torch.Tensor:
    """One optimizer step over this worker's micro-batches; returns the gradient norm."""
    cfg = job.config
    for micro in range(cfg.grad_accum):
        start = micro_batch_position(step, micro, rank, world=world, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)
        batch = _to_device(job.train_data.collate(order.take(start, cfg.batch_size)), strategy.device)
        with strategy.autocast():
            out = job.objective.compute(strategy.model, batch)
        strategy.backward(out.loss, sync=micro == cfg.grad_accum - 1)
        n_seq, seq_len = batch["input_ids"].shape
        window.add(out, n_seq * seq_len, _flops_per_token(strategy.unwrapped, seq_len) * n_seq * seq_len)
    return strategy.step()


def train_worker(payload: dict[str, Any]) -> None:
    """The per-worker body of the loop (Ray Train's ``train_loop_per_worker``)."""
    import ray.train
    import ray.train.torch

    job: TrainJob = payload["job"]
    cfg = job.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    attempt_start = time.time()

    seed_everything(cfg.seed)  # identical initial weights on every rank
    strategy = build_strategy(job.build_model(), cfg, device)
    job.objective.prepare(device)
    progress = Progress()
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            progress = load_checkpoint(directory, strategy, rank, job.objective)
    else:
        seed_everything(cfg.seed + rank)  # distinct dropout streams per rank
    logger = job.logger if rank == 0 else None
    if logger is not None and restored is not None:  # where this attempt picked up, for operators and tests
        logger.log_metrics({"train/resumed_from_step": progress.step}, step=progress.step)
    elapsed_before = progress.elapsed_s
    fault_step = payload.get("fault_step") if restored is None and rank == world - 1 else None

    order = GlobalOrder(len(job.train_data), cfg.seed)
    watch = Stopwatch(torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    window = _Window(device)
    attempt_tokens, attempt_flops = 0, 0.0
    grad_norm = torch.zeros(())
    watch.resume()
    while progress.step < cfg.steps:
        if fault_step == progress.step + 1:
            _die_after_checkpoints_commit()
        lr = strategy.lr  # the rate this step uses (DeepSpeed advances its schedule inside backward)
        grad_norm = _train_step(job, strategy, order, progress.step, rank, world, window)
        progress.step += 1
        progress.examples += cfg.global_batch

        last = progress.step == cfg.steps
        checkpointing = progress.step % cfg.checkpoint_every == 0 or last
        evaluating = job.val_data is not None and (progress.step % cfg.eval_every == 0 or last)
        if not (progress.step % cfg.log_every == 0 or checkpointing or evaluating):
            continue
        seconds = watch.lap()
        means, tokens, flops = window.reduce()
        attempt_tokens += tokens
        attempt_flops += flops
        progress.tokens += tokens
        progress.elapsed_s = elapsed_before + time.time() - attempt_start
        metrics = {
            **{f"train/{k}": v for k, v in means.items()},
            "train/lr": lr,
            "train/grad_norm": float(grad_norm),
            **_throughput("train/", tokens, flops, seconds, cfg.peak_flops, world),
            "train/tokens_seen": float(progress.tokens),
            "train/cost_usd": cost_usd(progress.elapsed_s, world, cfg.price_per_device_hour),
        }
        if evaluating:
            metrics.update(evaluate(strategy, job.objective, job.val_data, cfg, rank, world))
        if last:  # this attempt's averages and this worker's peak memory, for the stage summary
            metrics.update(_throughput("train/mean_", attempt_tokens, attempt_flops, watch.total, cfg.peak_flops, world))
            metrics["train/peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if logger is not None:
            logger.log_metrics(metrics, step=progress.step)
        if rank == 0:
            print(progress_line(progress.step, cfg.steps, metrics), flush=True)
        if checkpointing:
            _report_checkpoint(strategy, job.objective, progress, rank, metrics)
        watch.resume()
    watch.pause()

    if job.export_path is not None:
        state = strategy.full_state_dict()
        if rank == 0:
            export_hf(
                strategy.unwrapped, state, job.export_path, job.export_fs or pafs.LocalFileSystem(),
                rebuild=job.build_model, adapter_dest=job.adapter_path,
            )
        if dist.is_initialized():
            dist.barrier()
    if logger is not None:
        logger.spill()  # the worker ends here: what MLflow has not taken yet goes to the spool


# ---------------------------------------------------------------------------------- the driver


def run_training(
    job: TrainJob,
    storage_path: str,
    storage_fs: pafs.FileSystem | None = None,
    name: str = "train",
) -> TrainOutcome:
    """Run ``job`` on Ray Train with its checkpoints under ``storage_path``; resume if any are there.

    Raises ``ray.train.TrainingFailedError`` once workers have failed more than ``max_failures``
    times; a later call with the same storage resumes from the latest checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = job.config
    fault = os.environ.get(FAULT_ENV)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job, "fault_step": int(fault) if fault else None},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=cfg.resources_per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    return TrainOutcome(metrics=metrics, checkpoint_path=result.checkpoint.path if result.checkpoint else None)
