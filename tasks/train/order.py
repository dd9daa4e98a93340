"""Which examples each worker trains on at each step: deterministic, sharded, resumable.

The order is a function of (seed, position) only: a seeded permutation of the examples per
epoch, cut into global batches; worker ``r`` reads its slice of each global batch and nothing
else. The data position of a checkpoint is therefore just the number of examples consumed, and a
resumed run (or one with the same global batch on another strategy) sees exactly the same
batches as an uninterrupted one.

Numpy only (no torch), so ``crucible trace`` can work out which steps read a sequence without
loading the training stack.
"""

from __future__ import annotations

import numpy as np


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
    mine = validation_sample(size, world, batch_size, batches)[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def validation_sample(size: int, world: int, batch_size: int, batches: int) -> np.ndarray:
    """Every row a validation pass reads, over all workers (``validation_indices`` deals them out)."""
    per_rank = min(size // world, batch_size * batches)
    return validation_rows(size, per_rank * world)


def positions_of(order: GlobalOrder, rows: np.ndarray, end: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of ``order.take``: every stream position below ``end`` that holds one of ``rows``,
    ascending, and the row at each.

    One permutation per epoch the stream enters, so the cost follows the examples consumed (epochs
    included), not the number of rows asked about.
    """
    rows = np.asarray(rows, dtype=np.int64)
    positions, found = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for epoch in range(-(-end // order.size)):
        slot = np.empty(order.size, dtype=np.int64)
        slot[order.take(epoch * order.size, order.size)] = np.arange(order.size)
        at = epoch * order.size + slot[rows]
        positions.append(at[at < end])
        found.append(rows[at < end])
    at, rows = np.concatenate(positions), np.concatenate(found)
    ascending = np.argsort(at, kind="stable")
    return at[ascending], rows[ascending]


def micro_batch_of(position: np.ndarray, *, world: int, batch_size: int, grad_accum: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of ``micro_batch_position``: (step, micro-batch, rank) that read each stream position."""
    slot = np.asarray(position, dtype=np.int64) // batch_size
    return slot // (world * grad_accum), (slot // world) % grad_accum, slot % world
