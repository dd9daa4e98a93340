"""What the post-training stages (``sft``, ``reward``, ``align``) share when they run.

Their config (``PostTrainConfig``) and input digest are in ``post_config.py``; this module loads
torch and transformers, so the stages import it from their ``run``.

- Data preparation: read and validate the sources (``tasks/data/chat_data.py``), drop the
  training examples that share an n-gram with an evaluation set (``decontamination``, the
  ``filter`` stage's index; into ``rejected/`` with the reason), split off the held-out set,
  tokenise on the driver, write ``data/{train,validation}.parquet`` and ``quarantine/`` into the
  stage folder. Deterministic, so a rerun after a crash writes the same
  files and the loop resumes on the same examples.
- Model folders: every post-training stage writes a Hugging Face folder ``model/`` (weights,
  config, tokenizer with chat template); ``materialize`` gives workers a local copy when the
  store is an object store.
- ``train_and_export``: the stage's training job on the shared loop (Ray Train), checkpoints in
  ``checkpoints/``, the trained model exported to ``model/`` with the tokenizer beside it.
- ``on_worker``: a one-off function (held-out evaluation) on the resources of one training
  worker, so a GPU cluster evaluates on a GPU.
- ``publish_model``: an MLflow model version pointing at ``model/``, with the stage's alias
  (``RunLogger.register_model``: buffered through an MLflow outage), and one for ``adapter/``
  when the stage trained LoRA.
- ``start_model`` / ``stage_tokenizer`` / ``with_lora``: where a stage starts (its ``init_from``
  checkpoint, else its upstream stage's model), that checkpoint's tokenizer and chat template,
  and the model to train (LoRA adapters on it when the config asks).
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from models.tokenizer import MissingChatTemplate, load_tokenizer, save_tokenizer
from tasks.data.chat_data import ChatSource, DataSource, Example, StageSource, is_held_out, load_examples, write_quarantine
from tasks.data.filters.decontam import build_index
from tasks.errors import ConfigError, StageError
from tasks.stage import Manifest, StageContext
from tasks.store import filesystem_for, is_remote, join_uri
from tasks.tracking import Registration
from tasks.train.data import ExampleSource
from tasks.train.lora import add_lora
from tasks.train.loop import TrainJob, run_training
from tasks.train.objectives import Objective
from tasks.train.post_config import LoraSettings, PostTrainConfig, chat_template_text
from tasks.train.post_data import TooLong, write_examples
from tasks.train.settings import TrainConfig

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
TRAIN_FILE = "data/train.parquet"
VALIDATION_FILE = "data/validation.parquet"
QUARANTINE_FILE = "quarantine/quarantine.parquet"
REJECTED_FILE = "rejected/rejected.parquet"
R = TypeVar("R")


# ---------------------------------------------------------------------------------- data


@dataclass
class PreparedData:
    train_path: str
    validation_path: str | None
    validation: list[Any]  # the held-out examples' parsed values, in file order (for samples)
    counts: dict[str, int]


def prepare_data(
    ctx: StageContext,
    kind: Literal["chat", "preference", "prompt"],
    encode: Callable[[Any], dict[str, Any]],
    finish_train: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] = lambda rows: rows,
) -> PreparedData:
    """Load, split, encode and store the stage's examples; quarantine what cannot be used.

    ``encode(parsed value) -> row`` may raise ``TooLong``; ``finish_train`` post-processes the
    encoded training rows (SFT packing).
    """
    cfg: PostTrainConfig = ctx.config
    train = load_examples(resolve_sources(ctx, cfg.data, kind, "data"), kind, f"{ctx.name}.data")
    quarantine = list(train.quarantine)
    train.rows, rejected = decontaminate(cfg, ctx.name, train.rows)
    write_rows(ctx.out.fs, ctx.out.path(REJECTED_FILE), rejected)
    if cfg.validation:
        held = load_examples(resolve_sources(ctx, cfg.validation, kind, "validation"), kind, f"{ctx.name}.validation")
        quarantine += held.quarantine
        train_rows, val_rows = train.rows, held.rows
    else:
        val_rows = [e for e in train.rows if is_held_out(e.id, cfg.val_fraction)]
        train_rows = [e for e in train.rows if not is_held_out(e.id, cfg.val_fraction)]

    def encoded(examples: list[Example]) -> tuple[list[dict[str, Any]], list[Any]]:
        out, kept = [], []
        for example in examples:
            try:
                out.append({"id": example.id, **encode(example.value)})
            except TooLong as exc:
                quarantine.append(example.quarantine_row(str(exc)))
                continue
            kept.append(example.value)
        return out, kept

    (train_encoded, _), (val_encoded, val_values) = encoded(train_rows), encoded(val_rows)
    if not train_encoded:
        raise StageError(f"{ctx.name}: no usable training examples ({len(quarantine)} quarantined, see quarantine/)")
    train_rows = finish_train(train_encoded)
    write_examples(train_rows, ctx.out.fs, ctx.out.path(TRAIN_FILE))
    if val_encoded:
        write_examples(val_encoded, ctx.out.fs, ctx.out.path(VALIDATION_FILE))
    write_quarantine(ctx.out.fs, ctx.out.path(QUARANTINE_FILE), quarantine)
    counts = {
        "train_examples": len(train_encoded), "train_rows": len(train_rows),
        "validation_examples": len(val_encoded), "quarantined": len(quarantine), "decontaminated": len(rejected),
    }
    return PreparedData(ctx.out.path(TRAIN_FILE), ctx.out.path(VALIDATION_FILE) if val_encoded else None, val_values, counts)


def resolve_sources(ctx: StageContext, sources: list[DataSource], kind: str, field: str) -> list[ChatSource]:
    """File sources as they are; a stage's output (``{stage: feedback, split: …}``) as the file of its manifest."""
    out, problems = [], []
    for i, source in enumerate(sources):
        if not isinstance(source, StageSource):
            out.append(source)
        elif source.kind != kind:
            problems.append((f"{ctx.name}.{field}[{i}].split", f"'{source.split}' holds {source.kind} data; this stage reads {kind} data"))
        else:
            manifest = ctx.upstream[source.stage]
            if source.file not in manifest.files:
                raise StageError(f"stage '{source.stage}' output at {manifest.path} has no {source.file}")
            out.append(ChatSource(name=source.name, path=join_uri(manifest.path, source.file)))
    if problems:
        raise ConfigError("config", problems)
    return out


def example_texts(value: Any) -> list[str]:
    """Every text of a chat (``messages``), preference pair or prompt row."""
    if isinstance(value, list):
        return [m["content"] for m in value]
    messages = [*value.prompt, *getattr(value, "chosen", []), *getattr(value, "rejected", [])]
    return [m["content"] for m in messages] + ([value.answer] if getattr(value, "answer", None) else [])


def decontaminate(cfg: PostTrainConfig, stage: str, examples: list[Example]) -> tuple[list[Example], list[dict[str, Any]]]:
    """(the examples sharing no ``ngram``-word sequence with the evaluation sets, rejected rows)."""
    if cfg.decontamination is None:
        return examples, []
    index = build_index(cfg.decontamination, f"{stage}.decontamination")
    kept, rejected = [], []
    for example in examples:
        if any(index.contaminated(text) for text in example_texts(example.value)):
            rejected.append({"id": example.id, "source": example.source, "file": example.file, "line": example.line,
                             "reason": "decontamination"})
        else:
            kept.append(example)
    return kept, rejected


def write_rows(fs: pafs.FileSystem, path: str, rows: list[dict[str, Any]]) -> None:
    """Rows as one Parquet file; nothing when there are none."""
    if rows:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(pa.Table.from_pylist(rows), path, filesystem=fs)


# ---------------------------------------------------------------------------------- model folders


def model_uri(manifest: Manifest) -> str:
    """The Hugging Face folder a completed training stage wrote."""
    if f"{MODEL_DIR}/config.json" not in manifest.files:
        raise StageError(f"stage '{manifest.stage}' output at {manifest.path} has no {MODEL_DIR}/config.json")
    return join_uri(manifest.path, MODEL_DIR)


def start_model(ctx: StageContext, upstream: str) -> str:
    """Where the stage starts: its ``init_from`` checkpoint, else the ``upstream`` stage's model."""
    cfg: PostTrainConfig = ctx.config
    if cfg.init_from is not None:
        return str(Path(cfg.init_from).expanduser().resolve())
    return model_uri(ctx.upstream[upstream])


def stage_tokenizer(ctx: StageContext, start: str) -> tuple[Any, list[str]]:
    """The tokenizer of the checkpoint at ``start`` with the chat template the config asks for.

    A checkpoint without a template is an error naming the fix, unless the config gives one.
    """
    cfg: PostTrainConfig = ctx.config
    try:
        return load_tokenizer(materialize(start), chat_template=chat_template_text(cfg.chat_template), missing="error")
    except MissingChatTemplate as exc:
        raise ConfigError("config", [(f"{ctx.name}.chat_template", str(exc))]) from None


def with_lora(cfg: PostTrainConfig, build: Callable[[], nn.Module], task_type: str = "CAUSAL_LM") -> Callable[[], nn.Module]:
    """``build``, with LoRA adapters on what it builds when ``cfg.lora`` is set."""
    return functools.partial(_build_with_lora, build, cfg.lora, task_type) if cfg.lora else build


def _build_with_lora(build: Callable[[], nn.Module], settings: LoraSettings, task_type: str) -> nn.Module:
    model = build()
    released = getattr(model, "released", "")  # a training wrapper: adapters go on the model it releases
    if released:
        setattr(model, released, add_lora(getattr(model, released), settings, task_type))
        return model
    return add_lora(model, settings, task_type)


@functools.cache
def materialize(uri: str) -> str:
    """A local folder with the files of ``uri`` (the folder itself when it is local; cached per process)."""
    if not is_remote(uri):
        return uri.removeprefix("file://")
    fs, root = filesystem_for(uri)
    local = tempfile.mkdtemp(prefix="crucible-model-")
    pafs.copy_files(root, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def load_causal_lm(path: str, vocab_size: int | None = None) -> PreTrainedModel:
    """The causal LM at ``path`` (local or store URI) in fp32 (the strategy casts), its embeddings
    grown to ``vocab_size`` when the tokenizer gained tokens."""
    model = AutoModelForCausalLM.from_pretrained(materialize(path), dtype=torch.float32, local_files_only=True)
    if vocab_size is not None and vocab_size != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)
    return model


def frozen(model: nn.Module, device: torch.device) -> nn.Module:
    """A model for inference only (reference, reward model): eval mode, no gradients, on ``device``."""
    return model.to(device).eval().requires_grad_(False)


def eval_device() -> torch.device:
    """Where a held-out evaluation runs: the task's GPU if Ray gave it one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def write_tokenizer(tokenizer: Any, out_fs: pafs.FileSystem, model_path: str) -> None:
    """Put the tokenizer (with its chat template) beside the exported weights."""
    with tempfile.TemporaryDirectory(prefix="crucible-tok-") as tmp:
        save_tokenizer(tokenizer, tmp)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as src, out_fs.open_output_stream(f"{model_path}/{name}") as dst:
                dst.write(src.read())


# ---------------------------------------------------------------------------------- running


def train_and_export(
    ctx: StageContext,
    build_model: Callable[[], nn.Module],
    objective: Objective,
    train: ExampleSource,
    validation: ExampleSource | None,
    tokenizer: Any,
) -> tuple[str, dict[str, float]]:
    """Train with the stage's config on the shared loop and export ``model/`` with ``tokenizer``.

    Checkpoints live in the stage folder (``checkpoints/``), so a rerun after a crash resumes.
    Returns the exported model's URI and the loop's final ``train/`` and ``val/`` metrics.
    """
    fs, model_path = ctx.out.fs, ctx.out.path(MODEL_DIR)
    job = TrainJob(
        config=ctx.config,
        build_model=build_model,
        objective=objective,
        train_data=train,
        val_data=validation,
        logger=ctx.log,
        export_path=model_path,
        export_fs=fs,
        adapter_path=ctx.out.path(ADAPTER_DIR) if getattr(ctx.config, "lora", None) else None,
    )
    outcome = run_training(job, ctx.out.path(CHECKPOINT_DIR), fs, name=ctx.name)
    write_tokenizer(tokenizer, fs, model_path)
    metrics = {k: v for k, v in outcome.metrics.items() if k.startswith(("train/", "val/"))}
    return join_uri(ctx.out.uri, MODEL_DIR), metrics


def on_worker(cfg: TrainConfig, fn: Callable[..., R], *args: Any) -> R:
    """Run ``fn(*args)`` as a Ray task with one training worker's resources (its GPU, if any)."""
    import ray

    resources = dict(cfg.resources_per_worker or {})
    options = {
        "num_cpus": resources.pop("CPU", 1),
        "num_gpus": resources.pop("GPU", 1 if cfg.use_gpu else 0),
        "resources": resources or None,
    }
    return ray.get(ray.remote(**options)(fn).remote(*args))


def publish_model(ctx: StageContext, cfg: PostTrainConfig, default_name: str | None = None) -> Registration:
    """Register the stage's ``model/`` folder in MLflow under ``cfg.alias`` (while MLflow is
    away the registration waits in the run's buffer and happens when the server returns)."""
    name = cfg.registered_model or default_name or ctx.pipeline.name
    tags = {"crucible.stage": ctx.name, "crucible.fingerprint": ctx.out.root.rsplit("/", 1)[-1]}
    if cfg.lora is not None:  # the adapters alone, as a model of their own beside the merged one
        ctx.log.register_model(f"{name}-adapter", ctx.out.uri_of(ADAPTER_DIR), cfg.alias, tags)
    return ctx.log.register_model(name, ctx.out.uri_of(MODEL_DIR), cfg.alias, tags)
