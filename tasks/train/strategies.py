"""Distribution strategies behind one small interface, so there is one training loop.

- ``ddp``: PyTorch DistributedDataParallel (default); bf16 by autocast.
- ``fsdp``: PyTorch FSDP2 (``fully_shard`` on every decoder layer, then the root); bf16 by a
  mixed-precision policy (bf16 compute, fp32 gradient reduction).
- ``deepspeed``: ZeRO stage 1/2/3, optionally offloading optimizer state (DeepSpeedCPUAdam) and,
  at stage 3, parameters to CPU; bf16 by DeepSpeed's own bf16 mode.

All of them run on CPU with the gloo backend and on GPUs with NCCL. A strategy owns the model
wrapper, the optimizer and the LR schedule, and knows how to checkpoint them: PyTorch strategies
write a torch.distributed.checkpoint (each rank its shard), DeepSpeed writes its own format.
Either way every rank writes distinct file names into its local checkpoint folder, which Ray
Train merges into one checkpoint on storage.
"""

from __future__ import annotations

import contextlib
import logging
import os
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel

from tasks.train.optim import build_adamw, build_scheduler, lr_schedule, parameter_groups
from tasks.train.settings import TrainConfig

SCHEDULER_FILE = "scheduler.pt"
DEEPSPEED_TAG = "deepspeed"


def resolve_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """``auto`` means bf16 on GPU and fp32 on CPU (CPU bf16 is slower on most machines)."""
    if cfg.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class Strategy(ABC):
    """A model prepared for distributed training, with its optimizer and schedule."""

    model: nn.Module  # call this for the forward pass

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.dtype = resolve_precision(cfg, device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """Backpropagate one micro-batch's mean loss; ``sync`` is True on the last one of a step."""

    @abstractmethod
    def step(self) -> torch.Tensor:
        """Clip, update, advance the schedule, clear gradients; return the pre-clip gradient norm."""

    @property
    @abstractmethod
    def lr(self) -> float: ...

    @property
    @abstractmethod
    def unwrapped(self) -> PreTrainedModel:
        """The Hugging Face model inside the wrappers (its config, its ``save_pretrained``)."""

    @abstractmethod
    def save(self, directory: str) -> None:
        """Write model, optimizer and scheduler state (collective: every rank calls it)."""

    @abstractmethod
    def load(self, directory: str) -> None:
        """Restore what ``save`` wrote (collective)."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The unsharded model weights on rank 0, None elsewhere (collective)."""


class TorchStrategy(Strategy):
    """DDP or FSDP2, with AdamW and the warm-up + cosine schedule."""

    def __init__(self, model: PreTrainedModel, cfg: TrainConfig, device: torch.device):
        super().__init__(cfg, device)
        self._hf = model
        model.to(device)
        if cfg.compile:
            model.compile()
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if cfg.strategy.kind == "fsdp":
            self.model = self._shard(model)
        elif distributed:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        else:
            self.model = model
        self.optimizer = build_adamw(parameter_groups(self.model, cfg.weight_decay), cfg, device)
        self.scheduler = build_scheduler(self.optimizer, cfg)

    def _shard(self, model: PreTrainedModel) -> nn.Module:
        """Every decoder layer, the language model that ``generate`` calls when a wrapper (LoRA,
        a value head) holds it, then the root.

        Generation enters the inner model without passing the root, so that model is a unit of
        its own, and one forward through the root first lets FSDP initialise from the root.
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mp_policy=policy)
        inner = generation_model(model)
        if inner is not model:
            fully_shard(inner, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        if inner is not model:
            with torch.no_grad():
                model(input_ids=torch.ones((1, 1), dtype=torch.long, device=self.device))
            model.reshard()  # the root keeps its weights gathered after a forward: the optimizer must see the shards
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32 or self.cfg.strategy.kind == "fsdp":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        scaled = loss / self.cfg.grad_accum
        if self.cfg.strategy.kind == "fsdp":
            self.model.set_requires_gradient_sync(sync)
            scaled.backward()
        elif isinstance(self.model, nn.parallel.DistributedDataParallel) and not sync:
            with self.model.no_sync():
                scaled.backward()
        else:
            scaled.backward()

    def step(self) -> torch.Tensor:
        max_norm = self.cfg.clip if self.cfg.clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def unwrapped(self) -> PreTrainedModel:
        return self._hf

    def save(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
        if _rank() == 0:
            torch.save(self.scheduler.state_dict(), os.path.join(directory, SCHEDULER_FILE))

    def load(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(torch.load(os.path.join(directory, SCHEDULER_FILE), weights_only=False))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not dist.is_initialized():
            return {k: v.detach().cpu() for k, v in self._hf.state_dict().items()}
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if _rank() == 0 else None


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO; DeepSpeed itself accumulates, clips and steps the schedule."""

    def __init__(self, model: PreTrainedModel, cfg: TrainConfig, device: torch.device):
        import deepspeed

        super().__init__(cfg, device)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        model.to(device)
        if cfg.compile:
            model.compile()
        groups = parameter_groups(model, cfg.weight_decay)
        config = self.deepspeed_config(cfg, device, self.dtype)
        # Offloaded optimizer state is stepped by DeepSpeedCPUAdam (named in the config); otherwise
        # the same torch AdamW as the other strategies.
        optimizer = None if cfg.strategy.offload_optimizer else build_adamw(groups, cfg, device)
        schedule = lr_schedule(cfg)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=config,
            dist_init_required=False,
        )

    @staticmethod
    def deepspeed_config(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> dict:
        on_gpu = device.type == "cuda"
        zero: dict = {"stage": cfg.strategy.zero_stage}
        if cfg.strategy.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        if cfg.strategy.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
        config: dict = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.clip,
            "zero_optimization": zero,
            "bf16": {"enabled": dtype == torch.bfloat16},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if cfg.strategy.offload_optimizer:
            config["optimizer"] = {
                "type": "AdamW",
                "params": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay},
            }
        else:
            config["zero_allow_untested_optimizer"] = True  # torch AdamW is fine for ZeRO sharding
        return config

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        # DeepSpeed counts micro-batches itself: step() after every backward, updating on the boundary.
        self.model.backward(loss)
        self.model.step()

    def step(self) -> torch.Tensor:
        norm = self.model.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def unwrapped(self) -> PreTrainedModel:
        return self.model.module

    def save(self, directory: str) -> None:
        self.model.save_checkpoint(directory, tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, directory: str) -> None:
        path, _ = self.model.load_checkpoint(
            directory, tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint in {directory}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.cfg.strategy.zero_stage == 3:
            state = self.model._zero3_consolidated_16bit_state_dict()  # gathers shards onto rank 0
        else:
            state = self.model.module.state_dict()
        return {k: v.detach().cpu() for k, v in state.items()} if _rank() == 0 else None


def generation_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside training wrappers (a value head's ``released`` model, peft's
    ``PeftModel``): the one whose forward ``generate`` runs."""
    while True:
        if getattr(model, "released", ""):
            model = getattr(model, model.released)
        elif type(model).__module__.startswith("peft."):
            model = model.get_base_model()
        else:
            return model


def build_strategy(model: PreTrainedModel, cfg: TrainConfig, device: torch.device) -> Strategy:
    if cfg.strategy.kind == "deepspeed":
        return DeepSpeedStrategy(model, cfg, device)
    return TorchStrategy(model, cfg, device)

