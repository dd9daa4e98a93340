"""MLflow: one parent run per pipeline run, one nested run per stage, fail-soft logging.

Everything goes through ``MlflowClient`` with explicit run ids (no global "active run"), so
the same ``RunLogger`` works in the flow process and inside Ray workers (rank 0 only).
A tracking outage never kills a stage: calls warn once, buffer, and are replayed in order
on the next call that reaches the server, or on ``flush()``; a process that ends while the
server is still away spills its buffer to the spool, delivered by a later stage or run.
Runs are no exception: a run that cannot be created gets a deferred id, under which every
call (from any process, model registrations included) is buffered; the first delivery after
the server returns creates the run, with its original start time and its parent, and maps
the deferred id to the real one.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import subprocess
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tasks.paths import state_db, state_dir

DEFERRED = "deferred-"  # prefix of the ids of runs created once the server returns

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
        self._delivered: Any = None
        self._warned = False

    def __getstate__(self) -> dict:  # travels to Ray workers without its buffer
        return {"run_id": self.run_id, "uri": self.uri, "spool": str(self.spool)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["run_id"], state["uri"], state["spool"])

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _call(self, record: dict[str, Any]) -> Any:
        """Buffer ``record`` and deliver what is pending; what delivering it returned, None if it waits."""
        if self.run_id is None:
            return None
        self._pending.append(record)
        self.flush()
        return None if any(r is record for r in self._pending) else self._delivered

    def flush(self) -> bool:
        """Replay buffered calls in order; True when nothing is left."""
        while self._pending:
            record = self._pending[0]
            try:
                self._delivered = _send(self.uri, self.run_id, record)
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
        """Deliver everything, then mark the run ended (at this time); spill both if the server is away."""
        self._call({"kind": "end", "status": status, "time": int(time.time() * 1000)})
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

    def log_datasets(self, datasets: Sequence[StageDataset]) -> None:
        """Record stage outputs this run read or wrote as MLflow dataset inputs (the UI's Dataset column)."""
        self._call({"kind": "datasets", "datasets": [asdict(d) for d in datasets]})

    def register_model(self, name: str, source: str, alias: str, tags: Mapping[str, str]) -> Registration:
        """Register ``source`` as a version of model ``name`` from this run and point ``alias`` at it.

        While the server is away the registration waits in the buffer (and the spool) like any
        other call, and happens when the server returns.
        """
        record = {"kind": "register", "name": name, "source": source, "alias": alias, "tags": dict(tags)}
        version = self._call(record)
        return Registration(name, alias, version, pending=any(r is record for r in self._pending))


@dataclass(frozen=True)
class StageDataset:
    """A stage output as an MLflow dataset: what ``mlflow.log_input`` records for a file dataset,
    with the stage's output folder as its source and its fingerprint as its digest."""

    name: str  # the stage
    digest: str  # its fingerprint
    source: str  # its output folder: a local path or an object-store URI
    context: Literal["input", "output"]  # an upstream output the run read, or what it wrote


@dataclass(frozen=True)
class Registration:
    """What became of a model registration: a version, or waiting for the server, or neither."""

    name: str
    alias: str
    version: str | None
    pending: bool

    def line(self) -> str:
        """The stage report's sentence on it."""
        if self.version is not None:
            return f"Registered as MLflow model **{self.name}** version {self.version} (alias `{self.alias}`)."
        if self.pending:
            return f"Registration as MLflow model **{self.name}** (alias `{self.alias}`) is pending: it happens when the tracking server returns."
        return f"Not registered as MLflow model **{self.name}** (see the stage's warnings)."


def _send(uri: str, run_id: str, record: dict[str, Any]) -> Any:
    """One buffered call, made now. A server that answers with an error will answer the same
    again: the call is dropped with a warning instead of holding up every later one. Anything
    else (no answer) raises, and the call stays buffered."""
    from mlflow.exceptions import RestException

    try:
        return _call_mlflow(uri, resolve_run(uri, run_id), record)
    except RestException as exc:
        warnings.warn(f"MLflow at {uri} refused {record['kind']} for run {run_id}; dropped ({exc})", RuntimeWarning)
        return None


def _call_mlflow(uri: str, run_id: str, record: dict[str, Any]) -> Any:
    """One buffered call, as the MLflow client method it stands for."""
    from mlflow.entities import Metric, Param, RunTag

    client = _client(uri)
    kind = record["kind"]
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(*m) for m in record["metrics"]])
    elif kind == "params":
        params = [Param(k, v) for k, v in record["params"].items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _real_tags(uri, record["tags"]).items()])
    elif kind == "artifact":
        if not Path(record["path"]).exists():  # a temporary file gone before the server came back
            warnings.warn(f"artifact {record['path']} for run {run_id} no longer exists; not logged", RuntimeWarning)
            return
        client.log_artifact(run_id, record["path"], record["artifact_path"])
    elif kind == "text":
        client.log_text(run_id, record["text"], record["file"])
    elif kind == "dict":
        client.log_dict(run_id, record["data"], record["file"])
    elif kind == "datasets":
        client.log_inputs(run_id, datasets=[_dataset_input(StageDataset(**d)) for d in record["datasets"]])
    elif kind == "end":
        client.set_terminated(run_id, status=record["status"], end_time=record.get("time"))
    elif kind == "register":
        return _register(client, run_id, record)
    else:
        raise ValueError(f"unknown tracking record kind '{kind}'")
    return None


def _dataset_input(dataset: StageDataset) -> Any:
    """The ``DatasetInput`` ``mlflow.log_input`` would make for a file dataset at ``dataset.source``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    scheme = dataset.source.split("://", 1)[0] if "://" in dataset.source else "file"
    entity = Dataset(
        name=dataset.name, digest=dataset.digest, source_type="local" if scheme == "file" else scheme,
        source=json.dumps({"uri": dataset.source}),
    )
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, dataset.context)])


def _register(client: Any, run_id: str, record: dict[str, Any]) -> str:
    from mlflow.exceptions import MlflowException

    name = record["name"]
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, source=record["source"], run_id=run_id, tags=record["tags"])
    client.set_registered_model_alias(name, record["alias"], version.version)
    return str(version.version)


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
                _send(record["uri"], record["run_id"], record)
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


def start_run(uri: str, experiment: str, name: str, parent_run_id: str | None, tags: Mapping[str, Any]) -> str:
    """Create a (nested) run and return its id: a deferred id (with a warning) while tracking is
    down, under which calls are buffered until the run can be created."""
    request = {
        "experiment": experiment, "name": name, "parent": parent_run_id,
        "tags": {k: str(v) for k, v in tags.items() if v is not None}, "start_time": int(time.time() * 1000),
    }
    try:
        return _create(uri, request)
    except Exception as exc:  # noqa: BLE001
        deferred = f"{DEFERRED}{uuid.uuid4().hex}"
        db = _deferred_runs()
        try:
            with db:
                db.execute("INSERT INTO runs (id, uri, request) VALUES (?, ?, ?)", (deferred, uri, json.dumps(request)))
        finally:
            db.close()
        warnings.warn(
            f"MLflow unreachable at {uri} ({type(exc).__name__}): run '{name}' is created when it returns; "
            f"its calls are buffered until then", RuntimeWarning,
        )
        return deferred


def _create(uri: str, request: dict[str, Any]) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    tags = _real_tags(uri, request["tags"])
    if request["parent"]:
        tags[MLFLOW_PARENT_RUN_ID] = resolve_run(uri, request["parent"])
    run = _client(uri).create_run(
        experiment_id(uri, request["experiment"]), run_name=request["name"], tags=tags, start_time=request["start_time"],
    )
    return run.info.run_id


def _deferred_runs() -> sqlite3.Connection:
    """The deferred runs of this state dir: their creation requests, and their real ids once created."""
    return state_db("mlflow-deferred.sqlite", "runs (id TEXT PRIMARY KEY, uri TEXT, request TEXT, real_id TEXT)", timeout_s=60)


def resolve_run(uri: str, run_id: str) -> str:
    """The real id of ``run_id``: itself, or the run a deferred id stands for, created now if need be.

    Raises while the server is still away. One process creates a deferred run: the row is
    re-read under the database's write lock before creating it. The runs its request names
    (its parent, a ``crucible.produced_by`` tag) are created first, before that lock is taken.
    """
    if not run_id.startswith(DEFERRED):
        return run_id
    known = created_run(run_id)
    if known is not None:
        return known
    db = _deferred_runs()
    try:
        row = db.execute("SELECT uri, request FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"deferred MLflow run {run_id} is not known in {state_dir()}")
        request = json.loads(row[1])
        for named in [request["parent"], *request["tags"].values()]:
            if named and named.startswith(DEFERRED):
                resolve_run(row[0], named)
        db.execute("BEGIN IMMEDIATE")
        (real,) = db.execute("SELECT real_id FROM runs WHERE id = ?", (run_id,)).fetchone()
        if real is None:
            real = _create(row[0], request)
            db.execute("UPDATE runs SET real_id = ? WHERE id = ?", (real, run_id))
        db.commit()
        return real
    finally:
        db.close()


def created_run(run_id: str | None) -> str | None:
    """The real id of a run, or None while a deferred run is not created yet (never contacts MLflow)."""
    if run_id is None or not run_id.startswith(DEFERRED):
        return run_id
    db = _deferred_runs()
    try:
        row = db.execute("SELECT real_id FROM runs WHERE id = ?", (run_id,)).fetchone()
    finally:
        db.close()
    return row[0] if row else None


def _real_tags(uri: str, tags: Mapping[str, str]) -> dict[str, str]:
    """Tags whose values name deferred runs (e.g. ``crucible.produced_by``) name the real runs."""
    return {k: resolve_run(uri, v) if v.startswith(DEFERRED) else v for k, v in tags.items()}
