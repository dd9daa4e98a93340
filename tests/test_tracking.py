"""Fail-soft MLflow logging: an outage warns and buffers; calls are replayed when it returns, from the spool if their process ended."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator

import pytest
from mlflow import MlflowClient

from deployments.services import _free_port as free_port
from tasks.tracking import DEFERRED, RunLogger, created_run, deliver_spool, experiment_id, flatten, start_run


def wait_until_up(url: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class Tracking:
    """One MLflow server for the module, reached through a loopback port that can be switched
    off: an outage is that port refusing connections (and dropping open ones), so each test's
    outage ends without another server start, which costs tens of seconds on 2 cores."""

    def __init__(self, db: str, server_port: int):
        self.db, self.server_port, self.port = db, server_port, free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def up(self) -> Iterator[None]:
        """The server answers at ``url`` while the block runs (the outage ends)."""
        listener = socket.create_server(("127.0.0.1", self.port))
        connections: list[socket.socket] = []

        def accept() -> None:
            while True:
                try:
                    client, _ = listener.accept()
                except OSError:
                    return
                server = socket.create_connection(("127.0.0.1", self.server_port))
                connections.extend((client, server))
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        try:
            yield
        finally:
            listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            for connection in connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> Iterator[Tracking]:
    root = tmp_path_factory.mktemp("mlflow")
    db, port = f"sqlite:///{root / 'mlflow.db'}", free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", db, "--default-artifact-root", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}")
        yield Tracking(db, port)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def test_flatten_nested_params():
    flat = flatten({"a": {"b": 1}, "sources": [{"name": "x"}, {"name": "y"}], "tags": ["p", "q"]})
    assert flat == {"a.b": "1", "sources.0.name": "x", "sources.1.name": "y", "tags": "['p', 'q']"}


def test_outage_buffers_then_flushes_in_order(tracking):
    db, url = tracking.db, tracking.url
    local = MlflowClient(db)
    run_id = local.create_run(experiment_id(db, "outage")).info.run_id

    log = RunLogger(run_id, url)
    with pytest.warns(RuntimeWarning, match="MLflow unreachable"):
        log.log_metrics({"loss": 2.0}, step=1)
    log.log_metrics({"loss": 1.0}, step=2)
    log.set_tags({"phase": "outage"})
    assert log.pending == 3  # nothing lost, nothing raised

    with tracking.up():
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


def test_a_worker_ending_during_an_outage_spills_and_a_later_call_delivers(tmp_path, ray_session, tracking):
    db, url = tracking.db, tracking.url
    local = MlflowClient(db)
    run_id = local.create_run(experiment_id(db, "spool")).info.run_id
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

    with tracking.up():
        assert deliver_spool(spool) == 4  # three metric batches, then the end of the run
    assert [(m.step, m.value) for m in local.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert local.get_run(run_id).info.status == "FINISHED"
    assert list(spool.iterdir()) == []


def test_a_run_started_during_an_outage_is_created_with_its_calls_when_the_server_returns(tmp_home, tracking):
    """Run creation, a nested run, a tag naming another run and a model registration all wait
    through the outage (spilled to the spool by the ending process) and land in order after it."""
    url, db = tracking.url, tracking.db
    source = "s3://store/pretrain/0123/model"  # a tracking server takes local paths only inside a run's artifacts
    with pytest.warns(RuntimeWarning, match="created when it returns"):
        parent = start_run(url, "deferred", "pipeline", None, {"crucible.kind": "pipeline"})
        child = start_run(url, "deferred", "pretrain", parent, {"crucible.stage": "pretrain"})
    assert parent.startswith(DEFERRED) and child.startswith(DEFERRED) and created_run(child) is None
    began = time.time() * 1000

    log = RunLogger(child, url)
    with pytest.warns(RuntimeWarning):
        log.log_params({"lr": 0.1})
        log.log_metrics({"loss": 2.0}, step=1)
        log.set_tags({"crucible.produced_by": parent})
        registration = log.register_model("tiny-lm", source, "pretrain", {"crucible.stage": "pretrain"})
        assert registration.version is None and registration.pending and "pending" in registration.line()
        log.close()  # spills: this "process" ends before the server is back
        RunLogger(parent, url).close()
    assert deliver_spool() == 0  # still away: nothing lost

    with tracking.up():
        assert deliver_spool() == 6  # params, metrics, tags, registration, two run ends
    real_parent, real_child = created_run(parent), created_run(child)
    assert real_parent and real_child and not real_child.startswith(DEFERRED)
    local = MlflowClient(db)
    run = local.get_run(real_child)
    assert run.data.tags["mlflow.parentRunId"] == real_parent and run.data.tags["crucible.produced_by"] == real_parent
    assert run.data.params == {"lr": "0.1"} and run.data.metrics == {"loss": 2.0}
    assert run.info.status == "FINISHED" and run.info.start_time <= began  # its own start, not the delivery's
    assert run.info.run_name == "pretrain" and run.data.tags["crucible.stage"] == "pretrain"
    version = local.get_model_version_by_alias("tiny-lm", "pretrain")
    assert version.run_id == real_child and version.source == source


def test_a_stage_run_through_an_outage_is_tracked_and_its_model_registered_afterwards(tmp_home, ray_session, monkeypatch, tracking):
    """The engine's side: a pipeline whose tracking server is down from the start runs, says the
    registration is pending, and everything reaches MLflow on the next delivery."""
    import tasks.registry as registry
    from tasks.config import load_config, validate_config
    from tasks.engine import run_pipeline
    from tasks.stage import Stage, StageResult

    url, db = tracking.url, tracking.db
    data = load_config("configs/tiny.yaml").model_dump(mode="json", exclude_none=True)
    config = validate_config({**{k: data[k] for k in ("name", "ray", "ingest")}, "tracking": {"uri": url}}, "tiny ingest")

    def publish(ctx):
        ctx.log.log_metrics({"loss": 1.5}, step=3)
        registration = ctx.log.register_model("tiny", "s3://store/ingest/model", "ingest", {})
        return StageResult(rows=1, metrics={"quality": 0.5}, report=registration.line())

    real = registry.STAGES["ingest"]
    monkeypatch.setitem(registry.STAGES, "ingest", Stage("ingest", (), real.version, publish, real.inputs))
    with pytest.warns(RuntimeWarning, match="created when it returns"):
        [outcome] = run_pipeline(config)
    assert outcome.state == "ran" and "pending" in outcome.report
    assert outcome.manifest.mlflow_run_id.startswith(DEFERRED)

    with tracking.up():
        assert deliver_spool() > 0
    stage_run = MlflowClient(db).get_run(created_run(outcome.manifest.mlflow_run_id))
    assert stage_run.data.tags["crucible.stage"] == "ingest" and stage_run.data.tags["crucible.state"] == "ran"
    assert stage_run.data.metrics["loss"] == 1.5 and stage_run.data.metrics["quality"] == 0.5
    assert stage_run.data.params["row_group_rows"] == str(config.ingest.row_group_rows)
    assert MlflowClient(db).get_model_version_by_alias("tiny", "ingest").run_id == stage_run.info.run_id
    [output] = stage_run.inputs.dataset_inputs  # the stage's output as an MLflow dataset, delivered after the outage too
    assert (output.dataset.name, output.dataset.digest) == ("ingest", outcome.manifest.fingerprint)
    assert json.loads(output.dataset.source) == {"uri": outcome.manifest.path} and output.dataset.source_type == "local"
    assert [(t.key, t.value) for t in output.tags] == [("mlflow.data.context", "output")]
    parent = MlflowClient(db).get_run(stage_run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["crucible.kind"] == "pipeline" and parent.info.status == "FINISHED"
