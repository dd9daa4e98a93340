"""``reward``: a reward model trained on preference pairs, initialised from the SFT model.

The model is the SFT model with a scalar head (``models/heads.py``): a stock
``…ForSequenceClassification`` with one label, scoring a conversation at its last token. It
learns from ``prompt``/``chosen``/``rejected`` pairs with the Bradley–Terry loss
``-log σ(r_chosen - r_rejected - margin)`` (the margin, per pair, is optional). Held-out metrics:
pairwise accuracy (share of pairs where the chosen reply scores higher) and the mean reward gap.

Output: ``model/`` (``AutoModelForSequenceClassification.from_pretrained`` loads it, tokenizer
and chat template included), which ``align`` uses for PPO and GRPO.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from pydantic import Field
from torch import nn
from transformers import PreTrainedModel

from models.heads import reward_model_from, sequence_rewards
from models.tokenizer import load_tokenizer
from tasks.stage import Stage, StageContext, StageResult
from tasks.train.loop import TrainJob, run_training
from tasks.train.objectives import Objective, ObjectiveOutput
from tasks.train.post_data import PairExamples, encode_pair
from tasks.train.post_objectives import bradley_terry_loss
from tasks.train.post_stage import (
    MODEL_DIR,
    PostTrainConfig,
    eval_device,
    inputs_digest,
    materialize,
    model_uri,
    on_device,
    on_worker,
    prepare_data,
    publish_model,
    write_tokenizer,
)


class RewardConfig(PostTrainConfig):
    """Reward modelling on preference pairs (``prompt``, ``chosen``, ``rejected``[, ``margin``])."""

    registered_model: str | None = Field(None, description="MLflow registered model name; default: `{pipeline name}-reward`")
    alias: str = Field("reward", description="MLflow alias moved to the new model version")
    use_margin: bool = Field(True, description="subtract each pair's `margin` (0 when absent) inside the loss")


class PairwiseReward(Objective):
    """Bradley–Terry loss on (chosen, rejected) rows of one batch; logs accuracy and reward gap."""

    def __init__(self, use_margin: bool = True):
        self.use_margin = use_margin

    def compute(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
        chosen, rejected = rewards.chunk(2)
        margin = batch["margin"] if self.use_margin else 0.0
        loss = bradley_terry_loss(chosen, rejected, margin)
        gap = (chosen - rejected).detach()
        return ObjectiveOutput(
            loss=loss,
            tokens=torch.tensor(chosen.numel(), device=chosen.device),
            metrics={"accuracy": (gap > 0).float().mean(), "reward_gap": gap.mean(), "reward_chosen": chosen.detach().mean()},
        )


def load_reward_model(path: str, pad_token_id: int, vocab_size: int | None = None) -> PreTrainedModel:
    model = reward_model_from(materialize(path), pad_token_id, dtype=torch.float32)
    if vocab_size is not None and vocab_size != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)
    return model


def pairwise_metrics(model_path: str, pad_token_id: int, examples: PairExamples, batch_size: int) -> dict[str, float]:
    """Pairwise accuracy, mean reward gap and mean rewards of a reward model over every pair."""
    device = eval_device()
    model = load_reward_model(model_path, pad_token_id).to(device).eval()
    chosen_all, rejected_all = [], []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = on_device(examples.collate(range(start, min(start + batch_size, len(examples)))), device)
            chosen, rejected = sequence_rewards(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
            chosen_all.append(chosen)
            rejected_all.append(rejected)
    chosen, rejected = torch.cat(chosen_all), torch.cat(rejected_all)
    return {
        "heldout/accuracy": (chosen > rejected).float().mean().item(),
        "heldout/reward_gap": (chosen - rejected).mean().item(),
        "heldout/reward_chosen": chosen.mean().item(),
        "heldout/reward_rejected": rejected.mean().item(),
    }


def run(ctx: StageContext) -> StageResult:
    cfg: RewardConfig = ctx.config
    start = model_uri(ctx.upstream["sft"])
    tokenizer, _ = load_tokenizer(materialize(start))
    data = prepare_data(ctx, "preference", lambda pair: encode_pair(tokenizer, pair, cfg.max_length))
    fs, pad = ctx.out.fs, tokenizer.pad_token_id
    train = PairExamples(fs, data.train_path, pad)
    val = PairExamples(fs, data.validation_path, pad) if data.validation_path else None
    job = TrainJob(
        config=cfg,
        build_model=functools.partial(load_reward_model, start, pad),
        objective=PairwiseReward(cfg.use_margin),
        train_data=train,
        val_data=val,
        logger=ctx.log,
        export_path=ctx.out.path(MODEL_DIR),
        export_fs=fs,
    )
    outcome = run_training(job, ctx.out.path("checkpoints"), fs, name=ctx.name)
    write_tokenizer(tokenizer, fs, ctx.out.path(MODEL_DIR))
    final = ctx.out.uri.rstrip("/") + f"/{MODEL_DIR}"
    metrics = {k: v for k, v in outcome.metrics.items() if k.startswith(("train/", "val/"))}
    if val is not None:
        metrics.update(on_worker(cfg, pairwise_metrics, final, pad, val, cfg.batch_size))
        ctx.log.log_metrics({k: v for k, v in metrics.items() if k.startswith("heldout/")})
    registered, version = publish_model(ctx, cfg, default_name=f"{ctx.pipeline.name}-reward")

    report = [f"Reward model from `{start}` trained on **{data.counts['train_examples']}** pairs; "
              f"**{data.counts['quarantined']}** quarantined (see `quarantine/`)."]
    if "heldout/accuracy" in metrics:
        report.append(
            f"\nHeld-out pairwise accuracy **{metrics['heldout/accuracy']:.3f}**, mean reward gap "
            f"**{metrics['heldout/reward_gap']:.3f}** ({data.counts['validation_examples']} pairs)."
        )
    if version:
        report.append(f"\nRegistered as MLflow model **{registered}** version {version} (alias `{cfg.alias}`).")
    return StageResult(rows=data.counts["train_examples"], counts=data.counts, metrics=metrics, report="\n".join(report) + "\n")


def reward_inputs(cfg: RewardConfig, _pipeline: Any) -> str:
    return inputs_digest(cfg, "reward")


STAGE = Stage(name="reward", upstream=("sft",), version="1", run=run, inputs=reward_inputs)
