"""Which examples each worker trains on at each step: deterministic, sharded, resumable.

The order is a function of (seed, position) only: a seeded permutation of the examples per
epoch, cut into global batches; worker ``r`` reads its slice of each global batch and nothing
else. The data position of a checkpoint is therefore just the number of examples consumed, and a
resumed run (or one with the same global batch on another strategy) sees exactly the same
batches as an uninterrupted one.
"""

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


class GlobalOrder:
    """The infinite stream of example indices: epoch after epoch, each a fresh seeded permutation."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size < 1:
            raise ValueError("no training examples")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = (
                np.random.default_rng([self.seed, epoch]).permutation(self.size)
                if self.shuffle
                else np.arange(self.size)
            )
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        """Indices at stream positions ``start … start+count-1`` (may span epochs)."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, self.size)
            chunk = self._permutation(epoch)[offset : offset + count - done]
            out[done : done + len(chunk)] = chunk
            done += len(chunk)
        return out


def micro_batch_position(step: int, micro: int, rank: int, *, world: int, batch_size: int, grad_accum: int) -> int:
    """Stream position of worker ``rank``'s micro-batch ``micro`` in optimizer step ``step``."""
    return ((step * grad_accum + micro) * world + rank) * batch_size


def validation_rows(size: int, count: int) -> np.ndarray:
    """``count`` distinct row indices of ``size`` rows, evenly spaced from row 0."""
    return (np.arange(count, dtype=np.int64) * size) // max(count, 1)


def validation_indices(size: int, rank: int, world: int, batch_size: int, batches: int) -> list[np.ndarray]:
    """Worker ``rank``'s validation micro-batches: the same examples at every pass, spread evenly
    over the whole set (files are often sorted by source or kind, so a prefix would measure one
    kind only), split across workers.

    Every worker gets as many examples (and micro-batches) as the others: sharded models run
    each forward pass on all workers together.
    """
    per_rank = min(size // world, batch_size * batches)
    chosen = validation_rows(size, per_rank * world)
    mine = chosen[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]



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
