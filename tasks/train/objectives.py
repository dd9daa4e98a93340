"""Training objectives: what a step optimises, separate from how the step runs.

The loop (``tasks/train/loop.py``) owns optimisation, distribution, checkpoints and metrics;
an objective only turns (model, batch) into a loss. Next-token prediction lives here; masked SFT,
pairwise reward, DPO and PPO/GRPO objectives implement the same interface in their own modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ObjectiveOutput:
    """One micro-batch's result.

    ``loss`` is the differentiable mean over the ``tokens`` that count towards it (validation
    averages micro-batches weighted by ``tokens``). ``metrics`` are extra scalars (0-dim tensors
    or floats) that the loop averages over micro-batches and workers and logs as ``train/<name>``
    and ``val/<name>``; an objective returns the same names at every call, on every worker.
    """

    loss: torch.Tensor
    tokens: torch.Tensor  # 0-dim count; a tensor so the training step never waits on the device
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


class Objective(ABC):
    """A training objective. Instances are pickled to every Ray worker, so keep them light."""

    def prepare(self, device: torch.device) -> None:
        """Load what the objective needs besides the trained model (a frozen reference, a reward model)."""

    def state_dict(self) -> dict:
        """What this worker's objective carries from step to step (PPO: its KL coefficient and the
        rollout batch it is still optimising); saved in every checkpoint, so a resumed run goes on
        where the interrupted one was."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    @abstractmethod
    def compute(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """Loss of ``model`` on ``batch``; called under the strategy's autocast."""


class NextToken(Objective):
    """Causal language modelling: predict every token from the ones before it.

    ``labels`` default to ``input_ids``; positions labelled -100 do not count (the HF convention,
    which the model's loss applies after shifting labels by one).
    """

    def compute(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        labels = batch.get("labels", batch["input_ids"])
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels)
        tokens = (labels[:, 1:] != -100).sum()
        return ObjectiveOutput(loss=out.loss, tokens=tokens)
