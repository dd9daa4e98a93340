"""What a training checkpoint holds, and how a worker writes and restores its part.

Layout of one checkpoint folder (Ray Train merges every rank's files into it)::

    model/                 strategy state: weights, optimizer, LR schedule (sharded by rank)
    progress.json          step, data position (examples consumed), tokens seen, wall time (rank 0)
    rng/rank_00001.pt      each rank's Python, NumPy and torch RNG states
    objective/rank_00001.pt  each rank's objective state (PPO's KL coefficient and rollout batch)
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from tasks.train.objectives import Objective
from tasks.train.strategies import Strategy

PROGRESS_FILE = "progress.json"


@dataclass
class Progress:
    """Where a run is. ``examples`` is the data position in the global example order."""

    step: int = 0
    examples: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0  # wall time of every attempt up to this checkpoint (for the cost estimate)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str, strategy: Strategy, progress: Progress, rank: int, objective: Objective | None = None) -> None:
    """Write this rank's part of a checkpoint into a local folder (collective)."""
    strategy.save(os.path.join(directory, "model"))
    for part, state in (("rng", _rng_state()), ("objective", objective.state_dict() if objective else {})):
        if state:
            os.makedirs(os.path.join(directory, part), exist_ok=True)
            torch.save(state, os.path.join(directory, part, f"rank_{rank:05d}.pt"))
    if rank == 0:
        with open(os.path.join(directory, PROGRESS_FILE), "w") as out:
            json.dump(asdict(progress), out)


def load_checkpoint(directory: str, strategy: Strategy, rank: int, objective: Objective | None = None) -> Progress:
    """Restore strategy state, this rank's RNG and objective state; return the progress (collective)."""
    strategy.load(os.path.join(directory, "model"))
    rng = os.path.join(directory, "rng", f"rank_{rank:05d}.pt")
    if os.path.exists(rng):  # absent when resuming on more workers than the run had
        _set_rng_state(torch.load(rng, weights_only=False))
    state = os.path.join(directory, "objective", f"rank_{rank:05d}.pt")
    if objective is not None and os.path.exists(state):
        objective.load_state_dict(torch.load(state, weights_only=False, map_location=strategy.device))
    with open(os.path.join(directory, PROGRESS_FILE)) as src:
        return Progress(**json.load(src))
