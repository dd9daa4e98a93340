"""The settings every training stage shares: optimisation, schedule, scale-out, checkpoints, accounting.

Stage configs (``pretrain``, ``sft`` …) subclass ``TrainConfig`` and add what is theirs (model
preset, data, objective knobs), so every training stage reads the same way in YAML and in the
Prefect UI.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrategyConfig(BaseModel):
    """How the model is spread over the workers."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["ddp", "deepspeed", "fsdp"] = Field(
        "ddp", description="ddp: replicate the model; deepspeed: ZeRO sharding; fsdp: PyTorch FSDP2 sharding"
    )
    zero_stage: Literal[1, 2, 3] = Field(
        2, description="DeepSpeed ZeRO stage: 1 shards optimizer state, 2 adds gradients, 3 adds parameters"
    )
    offload_optimizer: bool = Field(False, description="DeepSpeed: keep optimizer state in CPU memory (DeepSpeedCPUAdam)")
    offload_params: bool = Field(False, description="DeepSpeed ZeRO-3: keep parameters in CPU memory")

    @model_validator(mode="after")
    def _offload_needs_deepspeed(self) -> StrategyConfig:
        if (self.offload_optimizer or self.offload_params) and self.kind != "deepspeed":
            raise ValueError("offload_optimizer/offload_params need kind: deepspeed")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3")
        return self


class TrainConfig(BaseModel):
    """Optimisation and execution settings of one training run."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="sequences per worker per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine decays to lr * min_lr_ratio")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay of matrices (not of norms or biases)")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 disables clipping")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU"
    )
    compile: bool = Field(False, description="torch.compile the model")
    strategy: StrategyConfig = StrategyConfig()
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one device each)")
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Ray resources per worker; default 1 CPU (or 1 GPU with use_gpu)"
    )
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (the last step always is one)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on storage")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the latest checkpoint before giving up")
    eval_every: int = Field(100, ge=1, description="steps between validation passes (the end always has one)")
    eval_batches: int = Field(8, ge=1, description="micro-batches per worker in a validation pass")
    log_every: int = Field(10, ge=1, description="steps between metric logs")
    peak_flops: float = Field(
        1e12, gt=0, description="peak FLOP/s of one device for MFU (e.g. 989e12 for an H100 in bf16)"
    )
    price_per_device_hour: float = Field(0.0, ge=0, description="cost of one device for one hour, for the cost estimate")
    seed: int = 0

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        return self

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all workers."""
        return self.batch_size * self.grad_accum * self.num_workers
