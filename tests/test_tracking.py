"""Fail-soft MLflow logging: an outage warns and buffers; calls are replayed when it returns, from the spool if their process ended."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator

import pytest
from mlflow import MlflowClient

from tasks.tracking import RunLogger, deliver_spool, experiment_id, flatten


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@contextlib.contextmanager
def mlflow_server(port: int, db: str) -> Iterator[None]:
    """An MLflow tracking server on ``port`` over ``db`` while the block runs (the outage ends)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", db, "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}")
        yield
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def test_flatten_nested_params():
    flat = flatten({"a": {"b": 1}, "sources": [{"name": "x"}, {"name": "y"}], "tags": ["p", "q"]})
    assert flat == {"a.b": "1", "sources.0.name": "x", "sources.1.name": "y", "tags": "['p', 'q']"}


def test_outage_buffers_then_flushes_in_order(tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = MlflowClient(db)
    run_id = local.create_run(experiment_id(db, "outage")).info.run_id
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    log = RunLogger(run_id, url)
    with pytest.warns(RuntimeWarning, match="MLflow unreachable"):
        log.log_metrics({"loss": 2.0}, step=1)
    log.log_metrics({"loss": 1.0}, step=2)
    log.set_tags({"phase": "outage"})
    assert log.pending == 3  # nothing lost, nothing raised

    with mlflow_server(port, db):
        with pytest.warns(RuntimeWarning, match="is back"):
            assert log.flush() is True
        log.log_metrics({"loss": 0.5}, step=3)
        assert log.pending == 0
    history = local.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0), (3, 0.5)]
    assert local.get_run(run_id).data.tags["phase"] == "outage"


def test_logger_works_from_a_ray_worker(tmp_path, ray_session):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = MlflowClient(db)
    run_id = local.create_run(experiment_id(db, "workers")).info.run_id

    @ray_session.remote
    def train(log: RunLogger, rank: int) -> int:
        log = log if rank == 0 else RunLogger(None)
        for step in range(3):
            log.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        return log.pending

    assert ray_session.get([train.remote(RunLogger(run_id, db), r) for r in range(2)]) == [0, 0]
    assert [m.step for m in local.get_metric_history(run_id, "loss")] == [0, 1, 2]


def test_a_worker_ending_during_an_outage_spills_and_a_later_call_delivers(tmp_path, ray_session):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = MlflowClient(db)
    run_id = local.create_run(experiment_id(db, "spool")).info.run_id
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"

    @ray_session.remote
    def train(log: RunLogger) -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(3):
                log.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            log.spill()  # what the training loop does as the worker ends
        return log.pending

    assert ray_session.get(train.remote(RunLogger(run_id, url, spool=spool))) == 0
    with pytest.warns(RuntimeWarning, match="kept in"):
        RunLogger(run_id, url, spool=spool).close()  # the driver ends the run: that call waits too
    assert len(list(spool.glob("*.jsonl"))) == 2
    assert deliver_spool(spool) == 0 and len(list(spool.glob("*.jsonl"))) == 2  # still away: nothing lost

    with mlflow_server(port, db):
        assert deliver_spool(spool) == 4  # three metric batches, then the end of the run
    assert [(m.step, m.value) for m in local.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert local.get_run(run_id).info.status == "FINISHED"
    assert list(spool.iterdir()) == []
