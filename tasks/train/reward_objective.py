"""The torch side of the ``reward`` stage: the reward model, its objective and held-out metrics.

Kept apart from ``reward.py`` (the stage's config and declaration), which the registry imports,
so that loading torch waits until the stage runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from models.heads import RewardModelWithLMHead, reward_model_from, sequence_rewards
from tasks.train.objectives import Objective, ObjectiveOutput
from tasks.train.post_data import PairExamples
from tasks.train.post_objectives import bradley_terry_loss, reply_nll
from tasks.train.post_stage import eval_device, materialize, on_device


class PairwiseReward(Objective):
    """Bradley–Terry loss on (chosen, rejected) rows of one batch; logs accuracy and reward gap.

    With ``lm_weight`` the model is a ``RewardModelWithLMHead`` and the loss adds that weight
    times the chosen replies' per-token NLL through the LM head (the hidden-state regulariser).
    """

    def __init__(self, use_margin: bool = True, lm_weight: float = 0.0):
        self.use_margin, self.lm_weight = use_margin, lm_weight

    def compute(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        ids, attention, replies = batch["input_ids"], batch["attention_mask"], batch["response_mask"].bool()
        pairs = len(ids) // 2  # the chosen rows come first
        if self.lm_weight:
            scored = torch.zeros_like(replies)
            scored[:pairs] = replies[:pairs]  # the chosen replies' tokens
            predict = F.pad(scored[:, 1:], (0, 1), value=False)  # the positions that predict them
            rewards, logits = model(ids, attention, predict)
        else:
            rewards = sequence_rewards(model, ids, attention)
        chosen, rejected = rewards.chunk(2)
        margin = batch["margin"] if self.use_margin else 0.0
        loss = bradley_terry_loss(chosen, rejected, margin)
        gap = (chosen - rejected).detach()
        metrics = {"accuracy": (gap > 0).float().mean(), "reward_gap": gap.mean(), "reward_chosen": chosen.detach().mean()}
        if self.lm_weight:
            logp = -F.cross_entropy(logits.float(), ids[scored], reduction="none")
            rows = predict.nonzero()[:, 0]
            per_reply = torch.zeros(len(ids), device=logp.device, dtype=logp.dtype).index_add(0, rows, logp)
            nll = reply_nll(per_reply[:pairs], replies[:pairs].sum(-1))
            loss = loss + self.lm_weight * nll
            metrics["nll/chosen"] = nll.detach()
        return ObjectiveOutput(loss=loss, tokens=torch.tensor(pairs, device=chosen.device), metrics=metrics)


def load_reward_model(path: str, pad_token_id: int, vocab_size: int | None = None) -> PreTrainedModel:
    model = reward_model_from(materialize(path), pad_token_id, dtype=torch.float32)
    if vocab_size is not None and vocab_size != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)
    return model


def load_reward_model_with_lm_head(path: str, pad_token_id: int) -> RewardModelWithLMHead:
    """The model ``lm_weight`` trains: the reward model and the output head of the causal LM at ``path``."""
    return RewardModelWithLMHead.from_causal_lm(materialize(path), pad_token_id, dtype=torch.float32)


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
