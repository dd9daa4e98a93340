"""Direct Preference Optimisation: learn from preference pairs without a reward model or sampling.

The policy starts as the SFT model; a frozen copy of the SFT model is the reference, loaded by
each Ray Train worker next to the policy (no gradients). With LoRA the reference is the policy
itself with its adapters switched off: no second copy of the model. A batch of B pairs is one forward of 2B
rows (chosen, then rejected); each row's log-probability is the sum over its reply tokens.
The loss is ``-log σ(β·((log π_c - log π_ref,c) - (log π_r - log π_ref,r)))``
(``post_objectives.dpo_loss``), plus ``nll_weight`` times the chosen replies' per-token NLL
when that is set (RPO); the logged implicit rewards are ``β·(log π - log π_ref)``.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.train.lora import base_weights
from tasks.train.objectives import Objective, ObjectiveOutput
from tasks.train.post_data import PairExamples
from tasks.train.post_objectives import dpo_loss, reply_nll, token_logprobs
from tasks.train.post_stage import eval_device, frozen, load_causal_lm, on_device


def response_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each row's response tokens (``response_mask``)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return (token_logprobs(logits, batch["input_ids"]) * batch["response_mask"]).sum(-1)


def preference_stats(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Implicit rewards of (chosen, rejected) halves and how often chosen wins (ties count half)."""
    chosen, rejected = (beta * (policy - reference)).chunk(2)
    margin = chosen - rejected
    logp_chosen, logp_rejected = policy.chunk(2)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margin": margin.mean(),
        "rewards/accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(),
        "logps/chosen": logp_chosen.mean(),
        "logps/rejected": logp_rejected.mean(),
        "logps/accuracy": (logp_chosen > logp_rejected).float().mean(),
    }


class DPO(Objective):
    """DPO against a frozen reference: the model at ``reference_path``, or (None) the policy's LoRA base."""

    def __init__(self, reference_path: str | None, beta: float, label_smoothing: float = 0.0, nll_weight: float = 0.0):
        self.reference_path, self.beta, self.label_smoothing = reference_path, beta, label_smoothing
        self.nll_weight = nll_weight
        self.reference: nn.Module | None = None

    def __getstate__(self) -> dict:  # workers load their own reference
        return {**self.__dict__, "reference": None}

    def prepare(self, device: torch.device) -> None:
        if self.reference_path is not None:
            self.reference = frozen(load_causal_lm(self.reference_path), device)

    def compute(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        with torch.no_grad():
            if self.reference is not None:
                reference = response_logprobs(self.reference, batch)
            else:
                with base_weights(model):
                    reference = response_logprobs(model, batch)
        policy = response_logprobs(model, batch)
        chosen, rejected = policy.chunk(2)
        ref_chosen, ref_rejected = reference.chunk(2)
        loss, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing)
        stats = preference_stats(policy.detach(), reference, self.beta)
        if self.nll_weight:
            nll = reply_nll(chosen, batch["response_mask"].sum(-1).chunk(2)[0])
            loss = loss + self.nll_weight * nll
            stats["nll/chosen"] = nll.detach()
        return ObjectiveOutput(loss=loss, tokens=torch.tensor(chosen.numel(), device=loss.device), metrics=stats)


def preference_metrics(
    policy_path: str, reference_path: str, examples: PairExamples, beta: float, batch_size: int
) -> dict[str, float]:
    """``preference_stats`` over every pair of ``examples``, pair-weighted."""
    device = eval_device()
    policy, reference = (frozen(load_causal_lm(p), device) for p in (policy_path, reference_path))
    totals: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            rows = range(start, min(start + batch_size, len(examples)))
            batch = on_device(examples.collate(rows), device)
            stats = preference_stats(response_logprobs(policy, batch), response_logprobs(reference, batch), beta)
            for name, value in stats.items():
                totals[name] = totals.get(name, 0.0) + value.item() * len(rows)
    return {f"heldout/{name}": total / len(examples) for name, total in totals.items()}
