"""Write a trained model in Hugging Face format (config + safetensors) to any store.

A model trained with LoRA adapters is written twice: the adapters alone (``adapter_config.json``
+ weights, for ``peft.PeftModel.from_pretrained`` on the base checkpoint) and the merged model,
a plain folder that ``transformers`` and vLLM load without ``peft``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import pyarrow.fs as pafs
import torch
from torch import nn
from transformers import PreTrainedModel

from tasks.train.lora import find_lora, merge_adapters


def _copy_out(local: str, dest: str, fs: pafs.FileSystem) -> None:
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(local, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def export_hf(
    model: PreTrainedModel,
    state: dict[str, torch.Tensor],
    dest: str,
    fs: pafs.FileSystem,
    rebuild: Callable[[], nn.Module] | None = None,
    adapter_dest: str | None = None,
) -> None:
    """Save ``model``'s config with the full weights ``state`` under ``dest`` on ``fs``.

    ``state`` is passed explicitly because a sharded model (FSDP, ZeRO-3) holds only a shard;
    the strategy gathers the full weights first. Files are written locally, then copied.
    With adapters, ``rebuild()`` makes a fresh copy of the training module on this process to
    load ``state`` into (the training copy may be a shard); the adapters go to ``adapter_dest``.
    """
    with tempfile.TemporaryDirectory(prefix="crucible-export-") as tmp:
        if find_lora(model) is not None:
            if rebuild is None or adapter_dest is None:
                raise ValueError("exporting a LoRA model needs rebuild and adapter_dest")
            model = rebuild()
            model.load_state_dict(state)
            find_lora(model).save_pretrained(f"{tmp}/adapter")
            _copy_out(f"{tmp}/adapter", adapter_dest, fs)
            merge_adapters(model).save_pretrained(f"{tmp}/model", safe_serialization=True)
        else:
            model.save_pretrained(f"{tmp}/model", state_dict=state, safe_serialization=True)
        _copy_out(f"{tmp}/model", dest, fs)
