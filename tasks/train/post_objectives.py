"""The arithmetic of post-training losses, as plain tensor functions.

Kept apart from the objectives that use them (``sft_objective.py``, ``reward_objective.py``,
``dpo.py``, ``grpo.py``, ``ppo.py``) so each formula can be checked against a hand-computed
example. Conventions: a ``mask`` is 1 on the tokens that count (the response) and 0 elsewhere;
log-probabilities are per token, aligned with the token they score (``token_logprobs``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over everything, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the masked entries; masked-out entries become 0."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` for t ≥ 1; ``out[:, 0] = 0``.

    Same shape as ``input_ids``, so a response mask over ``input_ids`` applies unchanged.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return F.pad(picked, (1, 0), value=0.0)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution, aligned like ``token_logprobs`` (position 0 is 0)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return F.pad(-(logp.exp() * logp).sum(-1), (1, 0), value=0.0)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Pairwise reward loss ``-log σ(r_chosen - r_rejected - margin)``, averaged over pairs.

    The margin (Llama 2's reward models) asks for a larger gap on pairs whose preference is strong.
    """
    return -F.logsigmoid(chosen - rejected - margin).mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation (Rafailov et al. 2023) on summed response log-probs.

    Returns (loss averaged over pairs, chosen implicit rewards, rejected implicit rewards), where
    the implicit reward is ``beta * (log π - log π_ref)``. ``label_smoothing`` ε is cDPO's
    assumed rate of flipped labels: ``-(1-ε) log σ(z) - ε log σ(-z)``.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    z = chosen_rewards - rejected_rewards
    loss = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss.mean(), chosen_rewards.detach(), rejected_rewards.detach()


def reply_nll(logp_sums: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of whole replies, averaged over replies.

    DPO's added term in RPO (Pang et al. 2024): DPO alone can widen the chosen-rejected gap by
    lowering both replies; a weight on the chosen replies' NLL keeps them likely while it does.
    """
    return -(logp_sums / tokens.clamp(min=1)).mean()


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π.

    ``k1 = log π - log π_ref`` (unbiased; the PPO reward penalty), ``k3 = e^{-k1} + k1 - 1``
    (unbiased and never negative; GRPO's loss term, Schulman's "approximating KL" note).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator '{kind}' (k1 or k3)")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens ``[batch, time]``.

    ``mask`` marks each row's tokens, contiguous from the first column; the value after a row's
    last token is 0 (the episode ends there). Returns (advantages, returns = advantages + values),
    both 0 outside the mask.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    steps = values.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, over the group's std when ``scale``.

    ``rewards`` holds consecutive groups of ``group_size`` samples of the same prompt. A group
    whose samples all score the same gets advantage 0: it carries no signal about what to prefer.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True, unbiased=True) + eps)
    return centred.reshape(-1)


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: ``max(-A·r, -A·clip(r, 1-ε, 1+ε))`` with ``r = π/π_old``.

    Returns (per-token loss, clipped fraction over the mask, approximate KL(π_old ‖ π) over the mask).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)
    return loss, clip_fraction.detach(), approx_kl


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss ``½ max((V - R)², (V_clip - R)²)`` with ``V_clip`` within ε of the rollout's value.

    Returns (loss averaged over the mask, fraction of tokens where the clipped term won).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. (2019): steer the observed KL towards ``target``.

    ``coef ← coef · (1 + clip(KL/target - 1, ±0.2) · n / horizon)`` after ``n`` samples; with no
    target the coefficient stays fixed.
    """

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10_000):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, observed_kl: float, samples: int) -> float:
        if self.target is not None:
            error = max(-0.2, min(0.2, observed_kl / self.target - 1.0))
            self.value *= 1.0 + error * samples / self.horizon
        return self.value
