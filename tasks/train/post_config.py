"""The config the post-training stages (``sft``, ``reward``, ``align``) share, and their input digest.

This is the part of a post-training stage the registry, config loading and ``crucible status``
need, so it imports neither torch nor transformers: a pipeline whose stages are all cached
plans and reports without loading them. What runs the stage lives in ``post_stage.py``.

Every post-training stage can start from any local Hugging Face causal-LM folder
(``init_from``) instead of its upstream stage's model, and can train LoRA adapters (``lora``)
instead of every weight.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.data.chat_data import DataSource, StageSource
from tasks.data.filters.decontam import DecontaminationConfig, eval_files_digest
from tasks.data.ingest import list_source_files, source_digest
from tasks.digest import file_digest, folder_digest, listing_digest
from tasks.errors import ConfigError
from tasks.stage import DIGESTED
from tasks.train.settings import TrainConfig


class LoraSettings(BaseModel):
    """Low-rank adapters (``peft``): the base weights stay frozen, only ``r``-rank updates train."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, description="rank of each update")
    alpha: float = Field(16.0, gt=0, description="scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="`all-linear` (every linear layer but the output head) or module names such as [q_proj, v_proj]"
    )


class PostTrainConfig(TrainConfig):
    """Training settings plus the data a post-training stage learns from."""

    data: list[DataSource] = Field(
        ..., min_length=1, description="training sources: files, or another stage's output (`{stage: feedback, split: preferences}`)"
    )
    validation: list[DataSource] = Field(
        default_factory=list, description="held-out sources; when empty, `val_fraction` of `data` is held out"
    )
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of `data` held out (by id hash) when `validation` is empty")
    max_length: int = Field(1024, ge=8, description="longest example in tokens; longer ones go to quarantine")
    registered_model: str | None = Field(None, description="MLflow registered model name; default: the pipeline name")
    alias: str = Field(..., description="MLflow alias moved to the new model version")
    init_from: str | None = Field(
        None,
        description="local Hugging Face causal-LM folder to start from instead of the upstream stage's model "
        "(fingerprinted by content, not by path)",
        json_schema_extra=DIGESTED,
    )
    chat_template: str = Field(
        "keep",
        description="`keep` the checkpoint's chat template, `crucible` (Crucible's, adds its role tokens), "
        "or a Jinja template: the text itself or the path of a file holding it (fingerprinted by content)",
        json_schema_extra=DIGESTED,
    )
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of every weight")
    decontamination: DecontaminationConfig | None = Field(
        None, description="evaluation sets to keep out of `data`: examples sharing an n-gram with them go to rejected/ (as in `filter`)",
    )


def sources_digest(sources: list[DataSource], where: str, problems: list[tuple[str, str]]) -> str:
    """A digest of the files the sources match, by name and content as ingest digests its sources
    (example ids are made of the names); a source that matches nothing is added to ``problems``.
    A stage's output counts by its fingerprint (an upstream of the section), so it is skipped here."""
    parts = {}
    for i, source in enumerate(sources):
        if isinstance(source, StageSource):
            continue
        try:
            base, files = list_source_files(source)  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:
            problems.append((f"{where}[{i}].path", f"cannot read '{source.path}': {exc}"))
            continue
        if not files:
            problems.append((f"{where}[{i}].path", f"no files match '{source.path}'"))
        parts[str(i)] = source_digest(source.path, base, files)
    return listing_digest(parts)


def inputs_digest(cfg: PostTrainConfig, stage: str) -> str:
    """The output depends on the data files, on ``init_from`` (a model folder outside the store)
    and on the chat template (a keyword, Jinja text or a file): hash their contents, never their
    paths. Sources that match nothing are config errors."""
    digest = hashlib.sha256()
    problems: list[tuple[str, str]] = []
    for field, sources in (("data", cfg.data), ("validation", cfg.validation)):
        digest.update(f"{field}\0{sources_digest(sources, f'{stage}.{field}', problems)}\n".encode())
    if cfg.init_from is not None:
        folder = Path(cfg.init_from).expanduser()
        if not (folder / "config.json").is_file():
            problems.append((f"{stage}.init_from", f"'{cfg.init_from}' is not a Hugging Face model folder (no config.json)"))
        else:
            digest.update(f"init_from\0{folder_digest(folder)}\n".encode())
    if cfg.decontamination is not None:
        try:
            digest.update(f"decontamination\0{eval_files_digest(cfg.decontamination, f'{stage}.decontamination')}\n".encode())
        except ConfigError as exc:
            problems.extend(exc.problems)
    template = chat_template_file(cfg.chat_template)
    digest.update(f"chat_template\0{file_digest(template) if template else cfg.chat_template}\n".encode())
    if problems:
        raise ConfigError("config", problems)
    return digest.hexdigest()


def data_stages(cfg: PostTrainConfig) -> tuple[str, ...]:
    """The pipeline stages whose outputs the section's data sources read (upstreams of the section)."""
    return tuple(sorted({s.stage for s in (*cfg.data, *cfg.validation) if isinstance(s, StageSource)}))


def chat_template_file(value: str) -> Path | None:
    """The file a ``chat_template`` setting names, if it names one (else a keyword or Jinja text)."""
    if value in ("keep", "crucible") or "{" in value or "\n" in value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError("config", [("chat_template", f"'{value}' is neither keep, crucible, a Jinja template nor a file")])
    return path


def chat_template_text(value: str) -> str:
    """``chat_template`` as the loader takes it: a keyword, or the Jinja text (read from its file)."""
    path = chat_template_file(value)
    return path.read_text(encoding="utf-8") if path is not None else value
