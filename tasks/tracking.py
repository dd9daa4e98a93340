"""MLflow: one parent run per pipeline run, one nested run per stage, fail-soft logging.

Everything goes through ``MlflowClient`` with explicit run ids (no global "active run"), so
the same ``RunLogger`` works in the flow process and inside Ray workers (rank 0 only).
A tracking outage never kills a stage: calls warn once, buffer, and are replayed in order
on the next call that reaches the server, or on ``flush()``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from tasks.paths import state_dir

# Fail fast while the server is away: the buffer, not HTTP retries, carries us over an outage.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def tracking_uri(configured: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a SQLite DB under the state dir."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = state_dir()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Get or create the experiment; embedded stores keep artifacts beside the DB."""
    client = _client(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


@functools.cache
def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [x, y]}`` -> ``{"a.b": "1", "c.0": …}``: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                flat.update(flatten(item, f"{name}.{i}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


class RunLogger:
    """Logs to one MLflow run; never raises because tracking is down.

    ``RunLogger(None, …)`` is a logger that records nothing (e.g. on non-zero ranks).
    """

    def __init__(self, run_id: str | None, uri: str | None = None):
        self.run_id = run_id
        self.uri = uri or tracking_uri()
        self._pending: list[tuple[str, Callable[[], Any]]] = []
        self._warned = False

    def __getstate__(self) -> dict:  # travels to Ray workers without its buffer
        return {"run_id": self.run_id, "uri": self.uri}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["run_id"], state["uri"])

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _call(self, what: str, fn: Callable[[], Any]) -> None:
        if self.run_id is None:
            return
        self._pending.append((what, fn))
        self.flush()

    def flush(self) -> bool:
        """Replay buffered calls in order; True when nothing is left."""
        while self._pending:
            what, fn = self._pending[0]
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - any tracking failure is survivable
                if not self._warned:
                    warnings.warn(
                        f"MLflow unreachable at {self.uri} ({type(exc).__name__}: {exc}); "
                        f"buffering {what} and later calls until it returns",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    self._warned = True
                return False
            self._pending.pop(0)
        if self._warned:
            warnings.warn(f"MLflow at {self.uri} is back; buffered calls were delivered", RuntimeWarning)
            self._warned = False
        return True

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), stamp, step or 0) for k, v in metrics.items()]
        run_id = self.run_id
        self._call("metrics", lambda: _client(self.uri).log_batch(run_id, metrics=batch))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, v) for k, v in flatten(params).items()]
        run_id = self.run_id

        def send() -> None:
            for i in range(0, len(flat), 100):
                _client(self.uri).log_batch(run_id, params=flat[i : i + 100])

        self._call("params", send)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        run_id = self.run_id
        self._call("tags", lambda: _client(self.uri).log_batch(run_id, tags=batch))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        run_id = self.run_id
        self._call("artifact", lambda: _client(self.uri).log_artifact(run_id, str(local_path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        run_id = self.run_id
        self._call("text", lambda: _client(self.uri).log_text(run_id, text, artifact_file))

    def log_dict(self, data: dict, artifact_file: str) -> None:
        run_id = self.run_id
        self._call("dict", lambda: _client(self.uri).log_dict(run_id, data, artifact_file))


def start_run(uri: str, experiment: str, name: str, parent_run_id: str | None, tags: Mapping[str, Any]) -> str | None:
    """Create a (nested) run and return its id; None (with a warning) when tracking is down."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    all_tags = {k: str(v) for k, v in tags.items() if v is not None}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    try:
        client = _client(uri)
        run = client.create_run(experiment_id(uri, experiment), run_name=name, tags=all_tags)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"MLflow unreachable at {uri}: run '{name}' is not tracked ({exc})", RuntimeWarning)
        return None
    return run.info.run_id


def end_run(uri: str, run_id: str | None, status: str = "FINISHED") -> None:
    if run_id is None:
        return
    try:
        _client(uri).set_terminated(run_id, status=status)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"MLflow unreachable at {uri}: run {run_id} not closed ({exc})", RuntimeWarning)
