"""The torch side of the ``reward`` stage: the reward model, its objective and held-out metrics.

Kept apart from ``reward.py`` (the stage's config and declaration), which the registry imports,
so that loading torch waits until the stage runs.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from models.heads import reward_model_from, sequence_rewards
from tasks.train.objectives import Objective, ObjectiveOutput
from tasks.train.post_data import PairExamples
from tasks.train.post_objectives import bradley_terry_loss
from tasks.train.post_stage import eval_device, materialize, on_device


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
