"""LoRA for the post-training stages: adapters on, adapters off for the reference, merge for export.

``add_lora`` wraps a model in ``peft`` adapters: its weights freeze, only the low-rank updates
(and a new scalar head, for a reward model) train, so the optimizer state shrinks to a few
percent of full fine-tuning. The frozen base is also the reference DPO, GRPO and PPO compare
against (``base_weights``): no second copy of the model in memory. ``merge_adapters`` folds the
updates into the weights for the exported plain Hugging Face folder, after the adapters alone
were saved for ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel

    from tasks.train.post_config import LoraSettings


def add_lora(model: nn.Module, settings: LoraSettings, task_type: str = "CAUSAL_LM") -> PeftModel:
    """``model`` with adapters on ``settings.target_modules``; a classifier's score head trains whole."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, config)


def find_lora(module: nn.Module) -> PeftModel | None:
    """The ``PeftModel`` inside a training module: under DDP/DeepSpeed (``.module``) or a
    training wrapper that releases an inner model (``released``); None without adapters."""
    from peft import PeftModel

    while not isinstance(module, PeftModel):
        if isinstance(getattr(module, "module", None), nn.Module):
            module = module.module
        elif getattr(module, "released", ""):
            module = getattr(module, module.released)
        else:
            return None
    return module


@contextlib.contextmanager
def base_weights(module: nn.Module) -> Iterator[None]:
    """Within this block, ``module`` computes with its adapters switched off: the frozen base."""
    peft = find_lora(module)
    if peft is None:
        raise ValueError("base_weights needs a model with LoRA adapters")
    with peft.disable_adapter():
        yield


def merge_adapters(model: nn.Module) -> nn.Module:
    """``model`` with every adapter folded into its weights (in place where it is a wrapper)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    released = getattr(model, "released", "")
    if released and isinstance(getattr(model, released), PeftModel):
        setattr(model, released, getattr(model, released).merge_and_unload())
    return model
