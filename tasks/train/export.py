"""Write a trained model in Hugging Face format (config + safetensors) to any store."""

from __future__ import annotations

import tempfile

import pyarrow.fs as pafs
import torch
from transformers import PreTrainedModel


def export_hf(model: PreTrainedModel, state: dict[str, torch.Tensor], dest: str, fs: pafs.FileSystem) -> None:
    """Save ``model``'s config with the full weights ``state`` under ``dest`` on ``fs``.

    ``state`` is passed explicitly because a sharded model (FSDP, ZeRO-3) holds only a shard;
    the strategy gathers the full weights first. Files are written locally, then copied.
    """
    with tempfile.TemporaryDirectory(prefix="crucible-export-") as tmp:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        fs.create_dir(dest, recursive=True)
        pafs.copy_files(tmp, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
