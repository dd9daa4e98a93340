"""MLflow: one parent run per pipeline run, one nested run per stage, fail-soft logging.

Everything goes through ``MlflowClient`` with explicit run ids (no global "active run"), so
the same ``RunLogger`` works in the flow process and inside Ray workers (rank 0 only).
A tracking outage never kills a stage: calls warn once, buffer, and are replayed in order
on the next call that reaches the server, or on ``flush()``; a process that ends while the
server is still away spills its buffer to the spool, delivered by a later stage or run.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    Calls are kept as plain records, so a logger whose process is about to end while the
    server is away can ``spill()`` them to the spool (``$CRUCIBLE_HOME/mlflow-spool``), from
    which ``deliver_spool`` sends them once the server is back (every stage end and every
    pipeline start tries).
    """

    def __init__(self, run_id: str | None, uri: str | None = None, spool: str | Path | None = None):
        self.run_id = run_id
        self.uri = uri or tracking_uri()
        self.spool = Path(spool) if spool else spool_dir()
        self._pending: list[dict[str, Any]] = []
        self._warned = False

    def __getstate__(self) -> dict:  # travels to Ray workers without its buffer
        return {"run_id": self.run_id, "uri": self.uri, "spool": str(self.spool)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["run_id"], state["uri"], state["spool"])

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _call(self, record: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        self._pending.append(record)
        self.flush()

    def flush(self) -> bool:
        """Replay buffered calls in order; True when nothing is left."""
        while self._pending:
            record = self._pending[0]
            try:
                _send(_client(self.uri), self.run_id, record)
            except Exception as exc:  # noqa: BLE001 - any tracking failure is survivable
                if not self._warned:
                    warnings.warn(
                        f"MLflow unreachable at {self.uri} ({type(exc).__name__}: {exc}); "
                        f"buffering {record['kind']} and later calls until it returns",
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

    def spill(self) -> Path | None:
        """Write what could not be delivered to the spool (this process is ending); None if nothing was left."""
        if self.run_id is None or self.flush():
            return None
        self.spool.mkdir(parents=True, exist_ok=True)
        path = self.spool / f"{time.time_ns()}-{os.getpid()}-{self.run_id}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"run_id": self.run_id, "uri": self.uri, **r}) + "\n" for r in self._pending))
        tmp.replace(path)
        warnings.warn(f"MLflow still unreachable at {self.uri}: {len(self._pending)} calls kept in {path}", RuntimeWarning)
        self._pending.clear()
        return path

    def close(self, status: str = "FINISHED") -> None:
        """Deliver everything, then mark the run ended; spill both if the server is away."""
        self._call({"kind": "end", "status": status})
        self.spill()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        stamp = int(time.time() * 1000)
        self._call({"kind": "metrics", "metrics": [[k, float(v), stamp, step or 0] for k, v in metrics.items()]})

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call({"kind": "params", "params": flatten(params)})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._call({"kind": "artifact", "path": str(local_path), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call({"kind": "text", "text": text, "file": artifact_file})

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._call({"kind": "dict", "data": data, "file": artifact_file})


def _send(client: Any, run_id: str, record: dict[str, Any]) -> None:
    """One buffered call, as the MLflow client method it stands for."""
    from mlflow.entities import Metric, Param, RunTag

    kind = record["kind"]
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(*m) for m in record["metrics"]])
    elif kind == "params":
        params = [Param(k, v) for k, v in record["params"].items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif kind == "artifact":
        if not Path(record["path"]).exists():  # a temporary file gone before the server came back
            warnings.warn(f"artifact {record['path']} for run {run_id} no longer exists; not logged", RuntimeWarning)
            return
        client.log_artifact(run_id, record["path"], record["artifact_path"])
    elif kind == "text":
        client.log_text(run_id, record["text"], record["file"])
    elif kind == "dict":
        client.log_dict(run_id, record["data"], record["file"])
    elif kind == "end":
        client.set_terminated(run_id, status=record["status"])
    else:
        raise ValueError(f"unknown tracking record kind '{kind}'")


def spool_dir() -> Path:
    return state_dir() / "mlflow-spool"


def deliver_spool(spool: Path | None = None) -> int:
    """Send spilled calls, oldest file first; returns how many were delivered.

    A file is claimed by renaming it, so two processes never deliver it twice; what is still
    undeliverable is written back under a new name, in order.
    """
    spool = spool or spool_dir()
    delivered = 0
    for path in sorted(spool.glob("*.jsonl")) if spool.is_dir() else []:
        claimed = path.with_name(f"{path.stem}.claimed-{os.getpid()}")
        try:
            path.rename(claimed)
        except FileNotFoundError:
            continue  # another process took it
        records = [json.loads(line) for line in claimed.read_text().splitlines() if line.strip()]
        done = 0
        for record in records:
            try:
                _send(_client(record["uri"]), record["run_id"], record)
            except Exception:  # noqa: BLE001 - still away: keep the rest for next time
                break
            done += 1
        if done < len(records):
            left = spool / f"{path.stem}.left.jsonl"
            left.write_text("".join(json.dumps(r) + "\n" for r in records[done:]))
        claimed.unlink()
        delivered += done
        if done < len(records):
            break
    return delivered


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
