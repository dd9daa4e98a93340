"""``sft``: supervised fine-tuning on conversations, loss on the assistant's tokens only.

Starts from the ``pretrain`` stage's model, or from any Hugging Face causal-LM folder on local
disk (``init_from``; no data or pretrain stages needed then), training every weight or LoRA
adapters (``lora``; the output then has ``adapter/`` beside the merged ``model/``). Conversations are rendered with the tokenizer's chat template; the loss
covers every assistant turn (its text and closing ``<|end|>``), never the system prompt, the
user turns or the role headers. With ``packing``, conversations share rows without attending to
each other (position ids restart per conversation; see ``tasks/train/post_data.py``).

Runs on the shared training loop (Ray Train; DDP or DeepSpeed; checkpoints and resume), logs to
MLflow from rank 0, and writes ``model/``: weights, config and the tokenizer with its chat
template, which ``transformers``, vLLM and the next stages load as they are. The held-out
assistant-token loss is measured before and after training, and a few held-out replies are kept
in ``samples.jsonl``.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from pydantic import Field

from tasks.errors import ConfigError
from tasks.stage import Stage, StageContext, StageResult
from tasks.train.post_config import PostTrainConfig, data_stages, inputs_digest

SAMPLES = 8


class SFTConfig(PostTrainConfig):
    """Supervised fine-tuning: chat data (``messages``) and where to start from."""

    alias: str = Field("sft", description="MLflow alias moved to the new model version")
    packing: bool = Field(False, description="pack several conversations per row (no attention across them)")
    sample_tokens: int = Field(64, ge=1, description="reply length of the held-out samples written after training")


def run(ctx: StageContext) -> StageResult:
    # torch and transformers load here, not when the registry imports this module
    from tasks.train.post_data import ChatExamples, encode_conversation, pack
    from tasks.train.post_stage import (
        load_causal_lm, on_worker, prepare_data, publish_model, stage_tokenizer, start_model, train_and_export, with_lora,
    )
    from tasks.train.sft_objective import AssistantTokens, assistant_loss, held_out_samples

    cfg: SFTConfig = ctx.config
    start = start_model(ctx, "pretrain")
    tokenizer, added = stage_tokenizer(ctx, start)
    if added and cfg.lora:
        raise ConfigError("config", [("sft.lora", (
            f"the chat template adds tokens the checkpoint lacks ({', '.join(added)}), whose embeddings LoRA "
            "keeps frozen: give sft.chat_template a template written with the checkpoint's own tokens"))])
    vocab_size = len(tokenizer) if added else None
    data = prepare_data(
        ctx, "chat", lambda messages: encode_conversation(tokenizer, messages, cfg.max_length),
        finish_train=(lambda rows: pack(rows, cfg.max_length)) if cfg.packing else (lambda rows: rows),
    )
    fs = ctx.out.fs
    train = ChatExamples(fs, data.train_path, tokenizer.pad_token_id, packed=cfg.packing)
    val = ChatExamples(fs, data.validation_path, tokenizer.pad_token_id, packed=False) if data.validation_path else None

    metrics: dict[str, float] = {}
    if val is not None:
        metrics["heldout/loss_init"] = on_worker(cfg, assistant_loss, start, val, cfg.batch_size, vocab_size)
    build_model = with_lora(cfg, functools.partial(load_causal_lm, start, vocab_size))
    final, trained = train_and_export(ctx, build_model, AssistantTokens(), train, val, tokenizer)
    metrics.update(trained)

    samples_md = ""
    if val is not None:
        metrics["heldout/loss"] = on_worker(cfg, assistant_loss, final, val, cfg.batch_size)
        metrics["heldout/perplexity"] = math.exp(min(metrics["heldout/loss"], 50.0))
        samples = on_worker(cfg, held_out_samples, final, tokenizer, data.validation[:SAMPLES], cfg.sample_tokens)
        lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        ctx.out.write_bytes_atomic("samples.jsonl", lines.encode())
        ctx.log.log_text(lines, "samples.jsonl")
        samples_md = "\n".join(f"| {_cell(s['prompt'])} | {_cell(s['reply'])} | {_cell(s['reference'])} |" for s in samples)
    ctx.log.log_metrics({k: v for k, v in metrics.items() if k.startswith("heldout/")})
    registration = publish_model(ctx, cfg)

    layout = f"packed into {data.counts['train_rows']} rows" if cfg.packing else "one per row"
    report = [f"SFT from `{start}` on **{data.counts['train_examples']}** conversations ({layout}); "
              f"**{data.counts['quarantined']}** examples quarantined (see `quarantine/`)."]
    if "heldout/loss" in metrics:
        report.append(
            f"\nHeld-out assistant-token loss: **{metrics['heldout/loss_init']:.3f}** before, "
            f"**{metrics['heldout/loss']:.3f}** after ({data.counts['validation_examples']} conversations)."
        )
    report.append("\n" + registration.line())
    if samples_md:
        report.append("\n| prompt | reply | reference |\n|---|---|---|\n" + samples_md)
    return StageResult(rows=data.counts["train_examples"], counts=data.counts, metrics=metrics, report="\n".join(report) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def sft_inputs(cfg: SFTConfig, _pipeline: Any) -> str:
    return inputs_digest(cfg, "sft")


def sft_needs(cfg: SFTConfig) -> tuple[str, ...]:
    return (() if cfg.init_from else ("pretrain",)) + data_stages(cfg)


STAGE = Stage(name="sft", upstream=("pretrain",), version="1", run=run, inputs=sft_inputs, needs=sft_needs)
