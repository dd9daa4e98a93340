"""Scalar heads on a causal LM: the reward model and PPO's value head.

- **Reward model**: the SFT model with its LM head replaced by a one-output linear ``score``
  head, i.e. ``AutoModelForSequenceClassification(num_labels=1)`` initialised from the SFT
  weights. The reward is the score at the last non-padding token (``transformers``' own
  pooling), so the saved folder is a stock sequence-classification checkpoint that any
  ``transformers`` user loads with ``AutoModelForSequenceClassification.from_pretrained``.
- **Reward model with LM head**: the reward model plus the output head of the SFT model it
  starts from. A next-token loss on the chosen replies through that head keeps the trunk's
  hidden states those of a language model while the scalar head learns (Yang et al. 2024,
  "Regularizing Hidden States Enables Learning Generalizable Reward Model for LLMs").
- **Policy with value head**: PPO's actor and critic sharing one trunk (the classic
  ``AutoModelForCausalLMWithValueHead`` layout): a linear head on the last hidden state predicts
  each token's value.

The two training wrappers save the released model alone (a plain sequence classifier, a plain
causal LM): the extra head is training state, kept in checkpoints, not part of the release.
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


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (0 at each row's first token, whatever the padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_rewards(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per row: the reward model's score at the row's last token.

    Rows may be left-padded (generation) or right-padded (training); position ids follow the
    attention mask so a row scores the same either way.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask), use_cache=False)
    return out.logits.squeeze(-1).float()


class _WithTrainingHead(nn.Module):
    """A released Hugging Face model (attribute ``released``) plus a head used only in training."""

    released = ""

    def _init_release(self, model: PreTrainedModel) -> None:
        setattr(self, self.released, model)
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # what FSDP shards

    @property
    def config(self) -> Any:
        return getattr(self, self.released).config

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """Write the released model alone (``state_dict``: this module's full weights, if given)."""
        prefix = self.released + "."
        if state_dict is not None:
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        getattr(self, self.released).save_pretrained(str(directory), state_dict=state_dict, **kwargs)


class RewardModelWithLMHead(_WithTrainingHead):
    """A reward model and the output head of the causal LM it came from, on one last hidden state.

    The head is tied to the input embeddings when the causal LM's was (the next-token loss then
    trains the embeddings too, as it did in pre-training), else it is a trained copy.
    """

    released = "reward"

    def __init__(self, reward: PreTrainedModel, untied_head: torch.Tensor | None = None):
        super().__init__()
        self._init_release(reward)
        embeddings = reward.get_input_embeddings().weight
        self.lm_head = nn.Linear(embeddings.shape[1], embeddings.shape[0], bias=False)
        if untied_head is None:
            self.lm_head.weight = embeddings  # one parameter in two modules, as transformers ties them
        else:
            with torch.no_grad():
                self.lm_head.weight.copy_(untied_head)

    @classmethod
    def from_causal_lm(cls, path: str | Path, pad_token_id: int, **kwargs: Any) -> RewardModelWithLMHead:
        """The reward model initialised from the causal LM at ``path``, with that LM's output head."""
        causal = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
        head = causal.get_output_embeddings()
        if head is None:
            raise ValueError(f"{path} has no language-model head to regularise the reward model with")
        tied = head.weight is causal.get_input_embeddings().weight
        return cls(reward_model_from(path, pad_token_id, **kwargs), None if tied else head.weight.detach())

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, predict: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards ``[B]`` as ``sequence_rewards`` computes them, next-token logits ``[N, V]`` at the
        N positions where the boolean ``predict`` ``[B, T]`` is set, in row-major order).

        Only the positions the loss reads go through the head: at a 4k vocabulary the head costs
        as much as the trunk, and most positions are prompts, padding or rejected replies.
        """
        out = self.reward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
            output_hidden_states=True, use_cache=False,
        )
        hidden = out.hidden_states[-1][predict]  # after the final norm: what the output head reads
        return out.logits.squeeze(-1).float(), self.lm_head(hidden.to(self.lm_head.weight.dtype))


class PolicyWithValueHead(_WithTrainingHead):
    """A causal LM and a per-token value head on its last hidden state."""

    released = "policy"

    def __init__(self, policy: PreTrainedModel):
        super().__init__()
        self._init_release(policy)
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: the first returns set their scale
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> PolicyWithValueHead:
        return cls(AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs))

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
