"""Scalar heads on a causal LM: the reward model and PPO's value head.

- **Reward model**: the SFT model with its LM head replaced by a one-output linear ``score``
  head, i.e. ``AutoModelForSequenceClassification(num_labels=1)`` initialised from the SFT
  weights. The reward is the score at the last non-padding token (``transformers``' own
  pooling), so the saved folder is a stock sequence-classification checkpoint that any
  ``transformers`` user loads with ``AutoModelForSequenceClassification.from_pretrained``.
- **Policy with value head**: PPO's actor and critic sharing one trunk (the classic
  ``AutoModelForCausalLMWithValueHead`` layout): a linear head on the last hidden state predicts
  each token's value. Saving it writes the policy alone, as a plain causal LM: the value head
  is training state, kept in checkpoints, not part of the released model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel


def reward_model_from(path: str | Path, pad_token_id: int, **kwargs: Any) -> PreTrainedModel:
    """A scalar-head sequence classifier initialised from the causal LM (or reward model) at ``path``.

    The score head is new (normal init, std = the config's ``initializer_range``) unless ``path``
    already holds a reward model; ``pad_token_id`` is what the pooling skips to find the last token.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, pad_token_id=pad_token_id, local_files_only=True, **kwargs
    )
    model.config.pad_token_id = pad_token_id
    return model


def sequence_rewards(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per row: the reward model's score at the row's last token.

    Rows may be left-padded (generation) or right-padded (training); position ids follow the
    attention mask so a row scores the same either way.
    """
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    return out.logits.squeeze(-1).float()


class PolicyWithValueHead(nn.Module):
    """A causal LM and a per-token value head on its last hidden state."""

    def __init__(self, policy: PreTrainedModel):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: the first returns set their scale
        nn.init.zeros_(self.value_head.bias)
        self._no_split_modules = getattr(policy, "_no_split_modules", None)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> PolicyWithValueHead:
        return cls(AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs))

    @property
    def config(self) -> Any:
        return self.policy.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits ``[B, T, V]``, values ``[B, T]``); ``values[:, t]`` estimates the return after token t."""
        out = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            output_hidden_states=True, use_cache=False,
        )
        hidden = out.hidden_states[-1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return out.logits, values.float()

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.policy.generate(*args, **kwargs)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """Write the policy as a plain causal LM (``state_dict``: this module's full weights, if given)."""
        if state_dict is not None:
            state_dict = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
        self.policy.save_pretrained(str(directory), state_dict=state_dict, **kwargs)
