"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), on the shared training loop.

The trained module is ``PolicyWithValueHead`` (``models/heads.py``): the policy and a value head
on its last hidden state. A rollout batch is the loop's ``grad_accum`` micro-batches of prompts;
each is answered by sampling from the policy and scored by the reward model (or a verifier).
Per reply token the reward is ``-kl_coef · (log π_old - log π_ref)``, with the scalar score
added on the last token; advantages and returns come from GAE over the reply, and advantages
are whitened. The rollout batch is then optimised for ``epochs`` consecutive optimizer steps
(one step = one pass over its micro-batches) with the clipped policy loss and the clipped value
loss; then the next prompts are sampled. The KL coefficient is fixed, or adapts towards
``kl_target`` (``AdaptiveKLController``) from the KL measured over all workers.

The loop calls ``compute`` exactly ``grad_accum`` times per optimizer step, so the objective
tells a new rollout from a further epoch by counting training calls (validation runs without
gradients and always samples afresh). Checkpoints keep the call count, the adaptive coefficient
and the rollout batch in use, so a resumed run goes on with the same epoch of the same batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.heads import positions
from tasks.train.objectives import ObjectiveOutput
from tasks.train.post_objectives import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    token_entropy,
    token_logprobs,
)
from tasks.train.rollout import Experience, RolloutObjective, Sampling, Scorer


def policy_and_values(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, token log-probs, values) of a policy-with-value-head on rollout rows.

    ``values[:, t]`` is the value of the state *before* token t (the value head read at t-1), so
    it lines up with the action ``log π(token_t | …)`` at the same index.
    """
    logits, raw_values = model(sequences, attention_mask, positions(attention_mask))
    return logits, token_logprobs(logits, sequences), F.pad(raw_values[:, :-1], (1, 0))


class PPO(RolloutObjective):
    def __init__(
        self, scorer: Scorer, sampling: Sampling, reference_path: str | None, settings: Any, grad_accum: int,
        stop_penalty: float = 0.0,
    ):
        super().__init__(scorer, sampling, reference_path, stop_penalty)
        self.settings, self.grad_accum = settings, grad_accum  # grad_accum micro-batches = one rollout batch
        self.kl = AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
        self._calls = 0
        self._rollouts: dict[int, dict[str, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_rollouts": {}}

    def state_dict(self) -> dict:
        return {"calls": self._calls, "kl_coef": self.kl.value, "rollouts": self._rollouts}

    def load_state_dict(self, state: dict) -> None:
        self._calls, self.kl.value, self._rollouts = state["calls"], state["kl_coef"], state["rollouts"]

    def _mean_over_workers(self, value: torch.Tensor) -> float:
        value = value.detach().float().clone()
        if dist.is_initialized():
            dist.all_reduce(value)
            value /= dist.get_world_size()
        return value.item()

    def rollout(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sample and score replies, and turn them into per-token advantages and returns (no gradients)."""
        exp: Experience = self.experience(model, batch)
        rollout, P = exp.rollout, exp.rollout.prompt_length
        with torch.no_grad():
            _, old_logp, old_values = policy_and_values(model, rollout.sequences, rollout.attention_mask)
        mask = rollout.response_mask[:, P:].float()
        old_logp, old_values, ref_logp = old_logp[:, P:], old_values[:, P:], exp.ref_logprobs[:, P:]
        kl = kl_estimate(old_logp, ref_logp, "k1") * mask
        rewards = -self.kl.value * kl
        last = (mask.sum(-1).long() - 1).clamp(min=0)
        rewards[torch.arange(len(last)), last] += exp.rewards
        advantages, returns = gae(rewards, old_values, mask, self.settings.gamma, self.settings.lam)
        if self.settings.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return {
            "sequences": rollout.sequences, "attention_mask": rollout.attention_mask, "mask": mask,
            "old_logp": old_logp, "old_values": old_values, "advantages": advantages, "returns": returns,
            "score": exp.rewards, "kl": kl.sum(-1), "stopped": exp.stopped, "length": mask.sum(-1),
        }

    def compute(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        training = torch.is_grad_enabled()
        if training:
            micro = self._calls % self.grad_accum
            epoch = (self._calls // self.grad_accum) % self.settings.epochs
            self._calls += 1
            if epoch == 0 or micro not in self._rollouts:
                self._rollouts[micro] = self.rollout(model, batch)
                kl_now = self._mean_over_workers(self._rollouts[micro]["kl"].mean())
                self.kl.update(kl_now, samples=len(self._rollouts[micro]["kl"]))
            data = self._rollouts[micro]
        else:
            data = self.rollout(model, batch)
        P = data["sequences"].shape[1] - data["mask"].shape[1]
        logits, logp, values = policy_and_values(model, data["sequences"], data["attention_mask"])
        logp, values, mask = logp[:, P:], values[:, P:], data["mask"]
        surrogate, clip_fraction, approx_kl = clipped_policy_loss(logp, data["old_logp"], data["advantages"], mask, self.settings.clip)
        policy_loss = masked_mean(surrogate, mask)
        value_loss, value_clip_fraction = clipped_value_loss(values, data["old_values"], data["returns"], mask, self.settings.value_clip)
        loss = policy_loss + self.settings.value_coef * value_loss
        with torch.no_grad():
            metrics = {
                "reward/mean": data["score"].mean(),
                "kl": data["kl"].mean(),
                "kl_coef": torch.tensor(self.kl.value),
                "entropy": masked_mean(token_entropy(logits.detach())[:, P:], mask),
                "clip_fraction": clip_fraction,
                "approx_kl": approx_kl,
                "policy_loss": policy_loss.detach(),
                "value_loss": value_loss.detach(),
                "value_clip_fraction": value_clip_fraction,
                "response_length": data["length"].mean(),
                "stopped": data["stopped"].mean(),
            }
        return ObjectiveOutput(loss=loss, tokens=mask.sum(), metrics=metrics)
