"""``reward``: a reward model trained on preference pairs, initialised from the SFT model.

The model is the SFT model with a scalar head (``models/heads.py``): a stock
``…ForSequenceClassification`` with one label, scoring a conversation at its last token. It
learns from ``prompt``/``chosen``/``rejected`` pairs with the Bradley–Terry loss
``-log σ(r_chosen - r_rejected - margin)`` (the margin, per pair, is optional). Held-out metrics:
pairwise accuracy (share of pairs where the chosen reply scores higher) and the mean reward gap.

``lm_weight`` adds a next-token loss on the chosen replies through the SFT model's output head
(tied to the embeddings when the SFT model's was; not part of the saved model): the trunk stays a
language model while the scalar head learns, so the reward generalises past the training prompts
instead of memorising them (Yang et al. 2024).

Output: ``model/`` (``AutoModelForSequenceClassification.from_pretrained`` loads it, tokenizer
and chat template included), which ``align`` uses for PPO and GRPO.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import Field

from tasks.stage import Stage, StageContext, StageResult
from tasks.train.post_config import PostTrainConfig, data_stages, inputs_digest


class RewardConfig(PostTrainConfig):
    """Reward modelling on preference pairs (``prompt``, ``chosen``, ``rejected``[, ``margin``])."""

    registered_model: str | None = Field(None, description="MLflow registered model name; default: `{pipeline name}-reward`")
    alias: str = Field("reward", description="MLflow alias moved to the new model version")
    use_margin: bool = Field(True, description="subtract each pair's `margin` (0 when absent) inside the loss")
    lm_weight: float = Field(
        0.0, ge=0,
        description="weight of the chosen replies' next-token loss through the SFT model's output head (0: plain Bradley-Terry)",
    )


def run(ctx: StageContext) -> StageResult:
    # torch and transformers load here, not when the registry imports this module
    from tasks.train.post_data import PairExamples, encode_pair
    from tasks.train.post_stage import on_worker, prepare_data, publish_model, stage_tokenizer, start_model, train_and_export, with_lora
    from tasks.train.reward_objective import (
        PairwiseReward,
        load_reward_model,
        load_reward_model_with_lm_head,
        pairwise_metrics,
    )

    cfg: RewardConfig = ctx.config
    start = start_model(ctx, "sft")
    tokenizer, _ = stage_tokenizer(ctx, start)
    data = prepare_data(ctx, "preference", lambda pair: encode_pair(tokenizer, pair, cfg.max_length))
    fs, pad = ctx.out.fs, tokenizer.pad_token_id
    train = PairExamples(fs, data.train_path, pad)
    val = PairExamples(fs, data.validation_path, pad) if data.validation_path else None
    build_model = with_lora(
        cfg, functools.partial(load_reward_model_with_lm_head if cfg.lm_weight else load_reward_model, start, pad), "SEQ_CLS",
    )
    objective = PairwiseReward(cfg.use_margin, cfg.lm_weight)
    final, metrics = train_and_export(ctx, build_model, objective, train, val, tokenizer)
    if val is not None:
        metrics.update(on_worker(cfg, pairwise_metrics, final, pad, val, cfg.batch_size))
        ctx.log.log_metrics({k: v for k, v in metrics.items() if k.startswith("heldout/")})
    registration = publish_model(ctx, cfg, default_name=f"{ctx.pipeline.name}-reward")

    report = [f"Reward model from `{start}` trained on **{data.counts['train_examples']}** pairs; "
              f"**{data.counts['quarantined']}** quarantined (see `quarantine/`)."]
    if "heldout/accuracy" in metrics:
        report.append(
            f"\nHeld-out pairwise accuracy **{metrics['heldout/accuracy']:.3f}**, mean reward gap "
            f"**{metrics['heldout/reward_gap']:.3f}** ({data.counts['validation_examples']} pairs)."
        )
    report.append("\n" + registration.line())
    return StageResult(rows=data.counts["train_examples"], counts=data.counts, metrics=metrics, report="\n".join(report) + "\n")


def reward_inputs(cfg: RewardConfig, _pipeline: Any) -> str:
    return inputs_digest(cfg, "reward")


def reward_needs(cfg: RewardConfig) -> tuple[str, ...]:
    return (() if cfg.init_from else ("sft",)) + data_stages(cfg)


STAGE = Stage(name="reward", upstream=("sft", "feedback"), version="1", run=run, inputs=reward_inputs, needs=reward_needs)
