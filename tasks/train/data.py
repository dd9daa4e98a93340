"""What the training loop reads: random-access example sources (which examples each worker
takes at each step is ``tasks/train/order.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from tasks.data.tokenize import TokenShards


class ExampleSource(Protocol):
    """Random-access training examples. Pickled to every worker: open files lazily."""

    def __len__(self) -> int: ...

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch made of these examples, as CPU tensors (``input_ids`` at least)."""
        ...


class PackedSequences:
    """Next-token examples from packed, fixed-length token rows (``tokenize``'s ``TokenShards``).

    Rows are used whole: ``tokenize`` packs documents back to back with EOS between them, the
    usual pretraining layout, so no padding or attention mask is involved.
    """

    def __init__(self, rows: TokenShards):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.rows[np.asarray(indices)].astype(np.int64))}
