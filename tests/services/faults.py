"""Helpers for the fault tests: wait for a condition, find and kill a service's processes, time it."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 600, every_s: float = 0.5) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def crash(pid: int) -> None:
    """SIGKILL a process and every descendant, as a machine failure would: nothing cleans up."""
    victims = process_tree(pid)
    for process in victims:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)


def busy_ray_workers(pid: int) -> list[str]:
    """Titles of the Ray worker processes under ``pid`` that run a task or an actor right now."""
    idle = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
    titles = []
    for process in process_tree(pid):
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and not title.startswith(idle):
            titles.append(title.strip())
    return titles


def planned_dir(config: dict[str, Any], stage: str) -> Path:
    """Where ``stage`` of ``config`` writes its output (the engine's own plan: fingerprint included).

    For a store shared by runs of several configs, where ``stage_dir`` cannot tell them apart.
    """
    from tasks.config import validate_config
    from tasks.engine import plan

    return Path(plan(validate_config(config, "test"))[stage].out.path())


def stage_dir(store: Path, stage: str) -> Path | None:
    """The one output folder of ``stage`` in ``store`` (None until the stage has started)."""
    found = list((store / stage).glob("*"))
    return found[0] if len(found) == 1 else None


class Clock:
    """Named instants since construction, printed as a recovery report."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic() - self.start

    def report(self, title: str) -> None:
        lines = [f"{title}:"] + [f"  {name:<28} t={seconds:7.1f}s" for name, seconds in self.marks.items()]
        print("\n" + "\n".join(lines))
