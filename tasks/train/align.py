"""``align``: tuning the SFT model towards preferred behaviour, ``method: dpo | grpo | ppo | sft``.

The policy starts from the ``sft`` stage's model or from ``init_from`` (any local Hugging Face
causal LM); with ``lora`` only adapters train and the reference is the same model with its
adapters switched off. Only GRPO/PPO scored by a reward model need the ``reward`` stage.

- ``dpo`` (``tasks/train/dpo.py``): preference pairs, a frozen SFT reference; no sampling.
- ``grpo`` (``tasks/train/grpo.py``): prompts; groups of sampled replies per prompt scored by the
  reward model or a verifier (``reward: arithmetic`` checks the reply's answer), group-normalised
  advantages, a k3 KL term to the SFT reference.
- ``sft``: chat rows, loss on the assistant's tokens, as in the ``sft`` stage: supervised
  alignment on revised replies (SL-CAI, with ``data: [{stage: feedback, split: revisions}]``).
- ``ppo`` (``tasks/train/ppo.py``): prompts; sampled replies scored by the reward model (or a
  verifier), a per-token KL penalty against the reference in the reward (fixed or adaptive
  coefficient), a value head, GAE, clipped policy and value losses, several epochs per rollout.

Each runs on the shared training loop (Ray Train, DDP or DeepSpeed, checkpoints and resume); the
reference and reward models are loaded, frozen, by every worker next to the policy. Before and
after training the stage measures the held-out split with the SFT model and the aligned one:
implicit-reward preference accuracy and margins for DPO; assistant-token loss for SFT; greedy-reply reward (and exact match
for verifiers) for GRPO and PPO. Output: ``model/`` (the policy as a plain causal LM, with the
tokenizer), registered in MLflow under the alias ``aligned``.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.stage import Stage, StageContext, StageResult
from tasks.tracking import Registration
from tasks.train.post_config import PostTrainConfig, data_stages, inputs_digest
from tasks.train.rewards import VERIFIERS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DPOSettings(_Section):
    beta: float = Field(0.1, gt=0, description="strength of the KL constraint: larger stays closer to the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed share of flipped preference labels (cDPO)")
    nll_weight: float = Field(0.0, ge=0, description="weight of the chosen replies' per-token NLL added to the loss (RPO)")


class SamplingSettings(_Section):
    """How GRPO and PPO sample replies during training."""

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 samples from the whole vocabulary")
    top_p: float = Field(1.0, gt=0, le=1)


class GRPOSettings(_Section):
    group_size: int = Field(4, ge=2, description="replies sampled per prompt")
    beta: float = Field(0.04, ge=0, description="weight of the KL(π ‖ π_ref) term in the loss")
    clip: float = Field(0.2, gt=0, description="ratio clip range ε")
    scale_rewards: bool = Field(True, description="divide advantages by the group's reward std (Dr. GRPO sets False)")


class PPOSettings(_Section):
    kl_coef: float = Field(0.05, ge=0, description="initial coefficient of the per-token KL penalty in the reward")
    kl_target: float | None = Field(None, gt=0, description="adapt the coefficient towards this KL per reply (None: fixed)")
    kl_horizon: int = Field(10_000, ge=1, description="replies over which the adaptive coefficient moves by its step")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    clip: float = Field(0.2, gt=0, description="policy ratio clip range ε")
    value_clip: float = Field(0.2, gt=0, description="value clip range around the rollout's values")
    value_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    epochs: int = Field(4, ge=1, description="optimisation epochs over each rollout batch")
    whiten_advantages: bool = Field(True, description="normalise advantages over the rollout batch")


METHOD_SECTIONS = ("dpo", "grpo", "ppo")


class AlignConfig(PostTrainConfig):
    """Preference tuning of the SFT model. ``data`` holds preference pairs for ``dpo`` and prompts
    (``prompt``[, ``answer``]) for ``grpo`` and ``ppo``; ``batch_size`` counts pairs or prompts."""

    method: Literal["dpo", "grpo", "ppo", "sft"] = Field(
        "dpo", description="dpo: preference pairs; grpo, ppo: sampling and rewards; sft: chat rows (e.g. CAI revisions)"
    )
    alias: str = Field("aligned", description="MLflow alias moved to the new model version")
    max_prompt_length: int = Field(256, ge=1, description="grpo/ppo: longest prompt in tokens; longer ones go to quarantine")
    reward: str = Field("model", description="grpo/ppo: `model` (the reward stage's model) or a verifier: arithmetic")
    stop_penalty: float = Field(0.0, ge=0, description="grpo/ppo: subtracted from the reward of replies that never stop")
    eval_tokens: int = Field(64, ge=1, description="grpo/ppo: reply length of the greedy held-out evaluation")
    eval_samples: int = Field(4, ge=0, description="grpo/ppo: replies per held-out prompt sampled as in training, besides the greedy one (0: greedy only)")
    sampling: SamplingSettings = SamplingSettings()
    dpo: DPOSettings = DPOSettings()
    grpo: GRPOSettings = GRPOSettings()
    ppo: PPOSettings = PPOSettings()

    @model_validator(mode="after")
    def _settings_match_the_method(self) -> AlignConfig:
        # Compare with the defaults, not with what was typed: a form (the Prefect UI) sends every field.
        changed = {name for name, f in type(self).model_fields.items() if getattr(self, name) != f.get_default(call_default_factory=True)}
        others = [s for s in METHOD_SECTIONS if s != self.method and s in changed]
        if others:
            raise ValueError(f"settings for {', '.join(others)} given, but method is {self.method}")
        sampling_only = sorted({"reward", "sampling", "stop_penalty", "max_prompt_length", "eval_tokens", "eval_samples"} & changed)
        if self.method in ("dpo", "sft") and sampling_only:
            raise ValueError(f"{', '.join(sampling_only)} apply to grpo and ppo, not {self.method}")
        if self.reward != "model" and self.reward not in VERIFIERS:
            raise ValueError(f"unknown reward '{self.reward}' (model, {', '.join(VERIFIERS)})")
        return self


def run(ctx: StageContext) -> StageResult:
    # torch and transformers load here, not when the registry imports this module
    from tasks.train.align_objective import check_reward_model, method_objective, policy_with_value_head, training_sampling
    from tasks.train.dpo import preference_metrics
    from tasks.train.post_data import ChatExamples, PairExamples, PromptExamples, encode_conversation, encode_pair, encode_prompt_row
    from tasks.train.post_stage import (
        load_causal_lm, model_uri, on_worker, prepare_data, publish_model, stage_tokenizer, start_model,
        train_and_export, with_lora,
    )
    from tasks.train.rollout import Scorer, generation_metrics
    from tasks.train.sft_objective import assistant_loss

    cfg: AlignConfig = ctx.config
    sft = start_model(ctx, "sft")
    reward_model = model_uri(ctx.upstream["reward"]) if "reward" in ctx.upstream else None
    tokenizer, _ = stage_tokenizer(ctx, sft)
    fs, pad = ctx.out.fs, tokenizer.pad_token_id
    scorer = None
    if cfg.method == "sft":
        data = prepare_data(ctx, "chat", lambda messages: encode_conversation(tokenizer, messages, cfg.max_length))
        train = ChatExamples(fs, data.train_path, pad, packed=False)
        val = ChatExamples(fs, data.validation_path, pad, packed=False) if data.validation_path else None
    elif cfg.method == "dpo":
        data = prepare_data(ctx, "preference", lambda pair: encode_pair(tokenizer, pair, cfg.max_length))
        train = PairExamples(fs, data.train_path, pad)
        val = PairExamples(fs, data.validation_path, pad) if data.validation_path else None
    else:
        if cfg.reward == "model":
            check_reward_model(sft, reward_model)
        scorer = Scorer(tokenizer, cfg.reward, reward_model if cfg.reward == "model" else None)
        data = prepare_data(ctx, "prompt", lambda row: encode_prompt_row(tokenizer, row, cfg.max_prompt_length))
        train = PromptExamples(fs, data.train_path, pad)
        val = PromptExamples(fs, data.validation_path, pad) if data.validation_path else None

    def measure(policy: str) -> dict[str, float]:
        if cfg.method == "sft":
            return {"heldout/loss": on_worker(cfg, assistant_loss, policy, val, cfg.batch_size)}
        if cfg.method == "dpo":
            return on_worker(cfg, preference_metrics, policy, sft, val, cfg.dpo.beta, cfg.batch_size)
        return on_worker(
            cfg, generation_metrics, policy, scorer, val, cfg.eval_tokens, cfg.batch_size,
            training_sampling(cfg), cfg.eval_samples, cfg.seed,
        )

    metrics: dict[str, float] = {}
    if val is not None:
        metrics.update({f"{k}_sft": v for k, v in measure(sft).items()})
    build_model = with_lora(cfg, functools.partial(policy_with_value_head if cfg.method == "ppo" else load_causal_lm, sft))
    reference = None if cfg.lora else sft  # with LoRA the reference is the policy's own base weights
    final, trained = train_and_export(ctx, build_model, method_objective(cfg, reference, scorer), train, val, tokenizer)
    metrics.update(trained)
    if val is not None:
        metrics.update(measure(final))
        ctx.log.log_metrics({k: v for k, v in metrics.items() if k.startswith("heldout/")})
    registration = publish_model(ctx, cfg)
    return StageResult(
        rows=data.counts["train_examples"], counts=data.counts, metrics=metrics,
        report=_report(cfg, data.counts, metrics, registration),
    )


def _report(cfg: AlignConfig, counts: dict[str, int], metrics: dict[str, float], registration: Registration) -> str:
    what = {"dpo": "pairs", "sft": "conversations"}.get(cfg.method, "prompts")
    lines = [f"**{cfg.method.upper()}** on {counts['train_examples']} {what} for {cfg.steps} steps; "
             f"**{counts['quarantined']}** quarantined (see `quarantine/`)."]
    held = sorted(k.removesuffix("_sft") for k in metrics if k.startswith("heldout/") and k.endswith("_sft"))
    if held:
        rows = "\n".join(f"| {k.removeprefix('heldout/')} | {metrics[k + '_sft']:.4g} | {metrics.get(k, float('nan')):.4g} |" for k in held)
        lines.append(f"\nHeld-out split ({counts['validation_examples']} {what}):\n\n| metric | SFT | aligned |\n|---|---|---|\n{rows}")
    lines.append("\n" + registration.line())
    return "\n".join(lines) + "\n"


def align_inputs(cfg: AlignConfig, _pipeline: Any) -> str:
    return inputs_digest(cfg, "align")


def align_needs(cfg: AlignConfig) -> tuple[str, ...]:
    """The policy's start (``sft`` unless ``init_from``) and the reward model when one scores replies."""
    policy = () if cfg.init_from else ("sft",)
    return policy + (("reward",) if cfg.method in ("grpo", "ppo") and cfg.reward == "model" else ()) + data_stages(cfg)


STAGE = Stage(name="align", upstream=("sft", "feedback", "reward"), version="2", run=run, inputs=align_inputs, needs=align_needs)
