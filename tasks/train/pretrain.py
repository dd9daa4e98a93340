"""``pretrain``: train a decoder-only LM from scratch on the ``tokenize`` stage's packed sequences.

The model is a ``models.presets`` Llama preset sized to the tokenizer (vocabulary, special token
ids) and the sequence length of the token index. Training is the shared loop
(``tasks/train/loop.py``) with the next-token objective on Ray Train; its checkpoints live in this
stage's folder (``checkpoints/``), so a rerun after a crash continues from the latest one.

Output: ``model/`` in Hugging Face format (``config.json``, ``model.safetensors``,
``generation_config.json`` and the tokenizer files, chat template included), loadable with
``AutoModelForCausalLM`` / ``AutoTokenizer``; ``checkpoints/`` (Ray Train's, the last
``keep_checkpoints``). The model is registered in MLflow under ``registered_model`` with the
alias ``alias`` (fail-soft).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pyarrow.fs as pafs
from pydantic import Field, model_validator

from models.flops import parameter_count
from models.presets import PRESETS, PresetName, build_model, model_config
from tasks.data.tokenize import TokenIndex, load_token_shards, read_token_index
from tasks.data.tokenizer import tokenizer_uri
from tasks.errors import ConfigError
from tasks.stage import Stage, StageContext, StageResult
from tasks.store import filesystem_for
from tasks.tracking import Registration
from tasks.train.settings import TrainConfig

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"


class PretrainConfig(TrainConfig):
    """Model preset and registry settings, plus the shared training settings."""

    preset: PresetName = Field("tiny", description="model size: tiny, demo, 124m, 350m, 1b (see models/presets.py)")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="LlamaConfig fields replacing the preset's (e.g. num_hidden_layers: 6)"
    )
    registered_model: str | None = Field(None, description="MLflow registered model name; default: the pipeline name")
    alias: str = Field("pretrain", description="MLflow alias moved to the new model version")

    @model_validator(mode="after")
    def _tokenizer_fields_not_overridden(self) -> PretrainConfig:
        reserved = sorted({"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"} & set(self.overrides))
        if reserved:
            raise ValueError(f"{', '.join(reserved)} come from the tokenizer and cannot be overridden")
        return self


def pretrain_inputs(cfg: PretrainConfig, _pipeline: Any) -> str:
    """Nothing outside the config counts; the overrides are checked here, at plan time, before any run.

    Only building the ``LlamaConfig`` finds unknown fields and bad values (a hidden size the heads
    do not divide), and that loads transformers and torch: in the config's validator, every config
    load (``crucible status``, the Prefect form) would pay seconds for it. A preset alone is valid.
    """
    if cfg.overrides:
        from huggingface_hub.errors import StrictDataclassError

        try:
            model_config(cfg.preset, 256, **cfg.overrides)
        except (TypeError, ValueError, StrictDataclassError) as exc:
            raise ConfigError("config", [("pretrain.overrides", str(exc))]) from exc
    return ""


def model_arguments(cfg: PretrainConfig, index: TokenIndex) -> dict[str, Any]:
    """``build_model`` keyword arguments: the tokenizer's ids, room for the sequence length, the overrides."""
    positions = max(PRESETS[cfg.preset]["max_position_embeddings"], index.seq_len)
    return {
        "vocab_size": index.vocab_size,
        "bos_token_id": index.bos_token_id,
        "eos_token_id": index.eos_token_id,
        "pad_token_id": index.pad_token_id,
        "max_position_embeddings": positions,
        **cfg.overrides,
    }


def _copy_tokenizer(source_uri: str, dest: str, fs: pafs.FileSystem) -> None:
    source_fs, source = filesystem_for(source_uri)
    pafs.copy_files(source, dest, source_filesystem=source_fs, destination_filesystem=fs)


def _report(cfg: PretrainConfig, params: int, summary: dict[str, float], registration: Registration) -> str:
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in summary.items())
    return (
        f"Pretrained a **{cfg.preset}** model ({params / 1e6:.2f}M parameters) for {cfg.steps} steps on "
        f"{cfg.num_workers} worker(s), strategy `{cfg.strategy.kind}`; exported to `{MODEL_DIR}/`. {registration.line()}\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"
    )


def run(ctx: StageContext) -> StageResult:
    # torch and transformers load here, not when the registry imports this module
    from tasks.train.data import PackedSequences
    from tasks.train.loop import TrainJob, run_training
    from tasks.train.objectives import NextToken

    cfg: PretrainConfig = ctx.config
    tokens = ctx.upstream["tokenize"]
    index = read_token_index(tokens)
    has_val = "val" in index.splits and index.splits["val"].sequences > 0
    arguments = model_arguments(cfg, index)
    job = TrainJob(
        config=cfg,
        build_model=partial(build_model, cfg.preset, **arguments),
        objective=NextToken(),
        train_data=PackedSequences(load_token_shards(tokens, "train")),
        val_data=PackedSequences(load_token_shards(tokens, "val")) if has_val else None,
        logger=ctx.log,
        export_path=ctx.out.path(MODEL_DIR),
        export_fs=ctx.out.fs,
    )
    outcome = run_training(job, storage_path=ctx.out.path(CHECKPOINT_DIR), storage_fs=ctx.out.fs)
    _copy_tokenizer(tokenizer_uri(ctx.upstream["tokenizer"]), ctx.out.path(MODEL_DIR), ctx.out.fs)

    params = parameter_count(model_config(cfg.preset, **arguments))
    final = outcome.metrics
    summary = {
        "params": float(params),
        "steps": final["step"],
        "train_loss": final["train/loss"],
        "tokens_seen": final["train/tokens_seen"],
        "tokens_per_s": final["train/mean_tokens_per_s"],
        "mfu": final["train/mean_mfu"],
        "cost_usd": final["train/cost_usd"],
    }
    if has_val:
        summary |= {
            "val_loss": final["val/loss"],
            "val_perplexity": final["val/perplexity"],
            "val_unigram_entropy": load_token_shards(tokens, "val").unigram_entropy(index.vocab_size),
        }
    name = cfg.registered_model or ctx.pipeline.name
    registration = ctx.log.register_model(
        name, ctx.out.uri_of(MODEL_DIR), cfg.alias, {"crucible.stage": ctx.name, "crucible.fingerprint": ctx.out.root.rsplit("/", 1)[-1]},
    )
    return StageResult(
        tokens=int(final["train/tokens_seen"]),
        metrics=summary,
        report=_report(cfg, params, summary, registration),
    )


STAGE = Stage(name="pretrain", upstream=("tokenize", "tokenizer"), version="1", run=run, inputs=pretrain_inputs)
