"""Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath): PPO without a critic.

For each prompt of a micro-batch the current policy samples ``group_size`` replies; each reply's
advantage is its reward minus the group's mean reward, over the group's standard deviation
(``post_objectives.group_advantages``), given to every token of the reply. The loss per token is
PPO's clipped surrogate plus ``beta`` times the k3 estimate of KL(π ‖ π_ref) against the frozen
SFT reference; tokens are averaged per reply, then replies averaged. Rollouts are used for one
update (sampled by the model being updated), so the ratio is 1 and the clip only guards the
sampling/training numerics; the loop's gradient accumulation and data order apply as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.train.objectives import ObjectiveOutput
from tasks.train.post_objectives import (
    clipped_policy_loss,
    group_advantages,
    kl_estimate,
    masked_mean,
    token_entropy,
    token_logprobs,
)
from tasks.train.rollout import RolloutObjective, Sampling, Scorer, causal_logits


class GRPO(RolloutObjective):
    def __init__(
        self, scorer: Scorer, sampling: Sampling, reference_path: str | None, *, group_size: int, beta: float,
        clip: float, scale_rewards: bool = True, stop_penalty: float = 0.0,
    ):
        super().__init__(scorer, sampling, reference_path, stop_penalty)
        self.group_size, self.beta, self.clip, self.scale_rewards = group_size, beta, clip, scale_rewards

    def compute(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        exp = self.experience(model, batch, copies=self.group_size)
        rollout, mask = exp.rollout, exp.rollout.response_mask
        advantages = group_advantages(exp.rewards, self.group_size, scale=self.scale_rewards)
        logits = causal_logits(model, rollout.sequences, rollout.attention_mask)
        logp = token_logprobs(logits, rollout.sequences)
        surrogate, clip_fraction, _ = clipped_policy_loss(logp, logp.detach(), advantages[:, None], mask, self.clip)
        kl = kl_estimate(logp, exp.ref_logprobs, "k3")
        loss = masked_mean(surrogate + self.beta * kl, mask, dim=1).mean()
        with torch.no_grad():
            grouped = exp.rewards.view(-1, self.group_size)
            metrics = {
                "reward/mean": exp.rewards.mean(),
                "reward/group_std": grouped.std(dim=1).mean(),
                "kl": masked_mean(kl.detach(), mask),
                "entropy": masked_mean(token_entropy(logits.detach()), mask),
                "clip_fraction": clip_fraction,
                "response_length": rollout.response_lengths.float().mean(),
                "stopped": exp.stopped.mean(),
            }
        return ObjectiveOutput(loss=loss, tokens=mask.sum(), metrics=metrics)
