"""Throughput accounting: a stopwatch for training time only, and the cost estimate.

Evaluation and checkpointing pause the stopwatch, so tokens/s and MFU describe training steps;
the cost estimate uses wall time, because idle devices are paid for too.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Stopwatch:
    """Training seconds, pausable; ``lap()`` returns the running time since the previous lap.

    ``sync`` waits for queued device work (``torch.cuda.synchronize`` on GPU) so the watch reads
    finished work, not launched kernels; it runs only when the watch stops, not at every step.
    """

    def __init__(self, sync: Callable[[], None]):
        self._sync = sync
        self._start: float | None = None
        self._lap = 0.0
        self.total = 0.0

    def resume(self) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def pause(self) -> None:
        if self._start is not None:
            self._sync()
            self._lap += time.perf_counter() - self._start
            self._start = None

    def lap(self) -> float:
        """Seconds run since the last lap (pauses the watch)."""
        self.pause()
        seconds, self._lap = self._lap, 0.0
        self.total += seconds
        return seconds


def cost_usd(elapsed_s: float, devices: int, price_per_device_hour: float) -> float:
    return elapsed_s / 3600.0 * devices * price_per_device_hour



PROGRESS_KEYS = ("loss", "accuracy", "reward", "kl", "tokens_per_s")


def progress_line(step: int, steps: int, metrics: dict[str, float]) -> str:
    """One console line per logged step, so a long run shows where it is without an MLflow UI:
    ``step 120/300 | train/loss 3.412 | val/loss 3.501 | train/tokens_per_s 5120``."""
    shown = [k for k in metrics if k.rsplit("/", 1)[-1] in PROGRESS_KEYS]
    return " | ".join([f"step {step}/{steps}", *(f"{k} {metrics[k]:.4g}" for k in shown)])
