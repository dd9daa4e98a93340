"""Post-training examples: tokenised once on the driver, stored as Parquet, batched on the workers.

Three example kinds, one per data shape of ``tasks/data/chat_data.py``:

- ``ChatExamples`` (``sft``): conversations rendered with the chat template; ``labels`` keep the
  assistant tokens (every assistant turn, its closing ``<|end|>`` included) and are -100
  elsewhere. With packing, several conversations share one row; their position ids restart at 0
  for each conversation and no attention mask is passed, which makes ``transformers`` build a
  block-diagonal causal mask (``find_packed_sequence_indices``): a token never attends across
  conversations, on the eager, SDPA and flash-attention kernels alike.
- ``PairExamples`` (``reward``, ``dpo``): a prompt with its chosen and rejected replies; a batch
  of B pairs is one forward of 2B right-padded rows (chosen first), with ``response_mask`` on
  the reply tokens.
- ``PromptExamples`` (``ppo``, ``grpo``): left-padded prompts ending in the assistant header, plus
  each prompt's reference answer as UTF-8 bytes (tensors travel; strings don't).

Rows longer than ``max_length`` tokens are not cut (a cut reply teaches a reply that never ends):
they go to quarantine with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from models.tokenizer import encode_chat
from tasks.data.chat_data import Message, PreferencePair, PromptRow

IGNORE = -100


class TooLong(ValueError):
    """An example that does not fit ``max_length``."""


# ---------------------------------------------------------------------------------- encoding


def encode_conversation(tokenizer: Any, messages: list[Message], max_length: int) -> dict[str, list[int]]:
    ids, mask = encode_chat(tokenizer, messages)
    if len(ids) > max_length:
        raise TooLong(f"{len(ids)} tokens, more than max_length {max_length}")
    return {"input_ids": ids, "assistant_mask": mask}


def encode_prompt(tokenizer: Any, prompt: list[Message]) -> list[int]:
    ids, _ = encode_chat(tokenizer, prompt, add_generation_prompt=True)
    return ids


def encode_pair(tokenizer: Any, pair: PreferencePair, max_length: int) -> dict[str, Any]:
    """Prompt ids (up to the assistant header), each reply's ids (its text and closing ``<|end|>``), the margin."""
    prompt = encode_prompt(tokenizer, pair.prompt)
    out: dict[str, Any] = {"prompt_ids": prompt, "margin": pair.margin}
    for name, reply in (("chosen_ids", pair.chosen), ("rejected_ids", pair.rejected)):
        ids, mask = encode_chat(tokenizer, pair.prompt + reply)
        if ids[: len(prompt)] != prompt:
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        if len(ids) > max_length:
            raise TooLong(f"prompt + {name.removesuffix('_ids')} is {len(ids)} tokens, more than max_length {max_length}")
        out[name] = [t for t, m in zip(ids[len(prompt) :], mask[len(prompt) :]) if m]
    return out


def encode_prompt_row(tokenizer: Any, row: PromptRow, max_length: int) -> dict[str, Any]:
    ids = encode_prompt(tokenizer, row.prompt)
    if len(ids) > max_length:
        raise TooLong(f"prompt is {len(ids)} tokens, more than max_prompt_length {max_length}")
    return {"prompt_ids": ids, "answer": row.answer}


def pack(rows: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate conversations, in order, into rows of at most ``max_length`` tokens.

    Each packed row keeps ``segments`` (the conversations' lengths) for the position-id resets.
    """
    packed: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "assistant_mask": [], "segments": []}
    for row in rows:
        if current["segments"] and len(current["input_ids"]) + len(row["input_ids"]) > max_length:
            packed.append(current)
            current = {"input_ids": [], "assistant_mask": [], "segments": []}
        current["input_ids"] += row["input_ids"]
        current["assistant_mask"] += row["assistant_mask"]
        current["segments"].append(len(row["input_ids"]))
    if current["segments"]:
        packed.append(current)
    return packed


# ---------------------------------------------------------------------------------- storage


def write_examples(rows: list[dict[str, Any]], fs: pafs.FileSystem, path: str) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.Table.from_pylist(rows), path, filesystem=fs)


class _ParquetRows:
    """Rows of one small Parquet file, read on first use on each worker (the source pickles light)."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path
        self.size = pq.read_metadata(path, filesystem=fs).num_rows
        self._rows: list[dict[str, Any]] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None}

    def __len__(self) -> int:
        return self.size

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = pq.read_table(self.path, filesystem=self.fs).to_pylist()
        return [self._rows[int(i)] for i in indices]


def _pad(sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    padded = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in sequences]
    return torch.tensor(padded, dtype=torch.long)


class ChatExamples(_ParquetRows):
    """SFT rows (packed or not) -> ``input_ids``, ``labels`` and ``attention_mask`` or ``position_ids``."""

    def __init__(self, fs: pafs.FileSystem, path: str, pad_id: int, packed: bool):
        super().__init__(fs, path)
        self.pad_id, self.packed = pad_id, packed

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = self.rows(indices)
        ids = _pad([r["input_ids"] for r in rows], self.pad_id)
        keep = _pad([r["assistant_mask"] for r in rows], 0).bool()
        labels = torch.where(keep, ids, torch.full_like(ids, IGNORE))
        if not self.packed:
            lengths = torch.tensor([len(r["input_ids"]) for r in rows])
            attention = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
            return {"input_ids": ids, "labels": labels, "attention_mask": attention}
        positions = []
        for r in rows:  # restart at every conversation; the padding tail is one more "conversation"
            segments = list(r["segments"]) + [ids.shape[1] - len(r["input_ids"])]
            positions.append([p for length in segments for p in range(length)])
        return {"input_ids": ids, "labels": labels, "position_ids": torch.tensor(positions, dtype=torch.long)}


class PairExamples(_ParquetRows):
    """Preference pairs -> 2B right-padded rows (chosen then rejected), ``response_mask`` and B margins."""

    def __init__(self, fs: pafs.FileSystem, path: str, pad_id: int):
        super().__init__(fs, path)
        self.pad_id = pad_id

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = self.rows(indices)
        sequences, responses = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for r in rows:
                sequences.append(r["prompt_ids"] + r[key])
                responses.append([0] * len(r["prompt_ids"]) + [1] * len(r[key]))
        ids = _pad(sequences, self.pad_id)
        lengths = torch.tensor([len(s) for s in sequences])
        attention = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        margin = torch.tensor([float(r["margin"]) for r in rows])
        return {"input_ids": ids, "attention_mask": attention, "response_mask": _pad(responses, 0), "margin": margin}


def encode_answers(answers: Sequence[str | None]) -> torch.Tensor:
    """Answers as a zero-padded byte matrix (an empty row for no answer)."""
    return _pad([list((a or "").encode("utf-8")) for a in answers], 0).to(torch.uint8)


def decode_answers(matrix: torch.Tensor) -> list[str | None]:
    out = []
    for row in matrix.tolist():
        text = bytes(b for b in row if b).decode("utf-8")
        out.append(text or None)
    return out


class PromptExamples(_ParquetRows):
    """Prompts -> left-padded ``input_ids`` + ``attention_mask`` and ``answer_bytes``."""

    def __init__(self, fs: pafs.FileSystem, path: str, pad_id: int):
        super().__init__(fs, path)
        self.pad_id = pad_id

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = self.rows(indices)
        prompts = [r["prompt_ids"] for r in rows]
        ids = _pad(prompts, self.pad_id, left=True)
        lengths = torch.tensor([len(p) for p in prompts])
        attention = (torch.arange(ids.shape[1])[None, :] >= ids.shape[1] - lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": attention, "answer_bytes": encode_answers([r["answer"] for r in rows])}
