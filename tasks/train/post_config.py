"""The config the post-training stages (``sft``, ``reward``, ``align``) share, and their input digest.

This is the part of a post-training stage the registry, config loading and ``crucible status``
need, so it imports neither torch nor transformers: a pipeline whose stages are all cached
plans and reports without loading them. What runs the stage lives in ``post_stage.py``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import Field

from tasks.data.chat_data import ChatSource
from tasks.data.ingest import list_source_files
from tasks.errors import ConfigError
from tasks.train.settings import TrainConfig


class PostTrainConfig(TrainConfig):
    """Training settings plus the data a post-training stage learns from."""

    data: list[ChatSource] = Field(..., min_length=1, description="training sources")
    validation: list[ChatSource] = Field(
        default_factory=list, description="held-out sources; when empty, `val_fraction` of `data` is held out"
    )
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of `data` held out (by id hash) when `validation` is empty")
    max_length: int = Field(1024, ge=8, description="longest example in tokens; longer ones go to quarantine")
    registered_model: str | None = Field(None, description="MLflow registered model name; default: the pipeline name")
    alias: str = Field(..., description="MLflow alias moved to the new model version")


def inputs_digest(cfg: PostTrainConfig, stage: str, init_from: str | None = None) -> str:
    """The output depends on the data files (and on ``init_from``, a model folder outside the
    store): hash their names, sizes and mtimes. Sources that match nothing are config errors."""
    digest = hashlib.sha256()
    problems = []
    for field, sources in (("data", cfg.data), ("validation", cfg.validation)):
        for i, source in enumerate(sources):
            try:
                _base, files = list_source_files(source)  # type: ignore[arg-type]
            except (OSError, ValueError) as exc:
                problems.append((f"{stage}.{field}[{i}].path", f"cannot read '{source.path}': {exc}"))
                continue
            if not files:
                problems.append((f"{stage}.{field}[{i}].path", f"no files match '{source.path}'"))
            for info in files:
                digest.update(f"{field}{i}\0{info.path}\0{info.size}\0{info.mtime_ns}\n".encode())
    if init_from is not None:
        folder = Path(init_from).expanduser()
        if not (folder / "config.json").is_file():
            problems.append((f"{stage}.init_from", f"'{init_from}' is not a Hugging Face model folder (no config.json)"))
        else:
            for f in sorted(p for p in folder.iterdir() if p.is_file()):
                stat = f.stat()
                digest.update(f"{f.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if problems:
        raise ConfigError("config", problems)
    return digest.hexdigest()
