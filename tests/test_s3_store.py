"""Stage outputs on S3: the tiny chain against the object store ``make services`` runs.

moto's S3 server starts on a free loopback port as ``deployments/services.py`` starts it (with its
bucket), and its request log shows how every object was written. The chain reaches it through
the store URI's query (``?endpoint_override=…&scheme=http``), with the dummy credentials that
conftest puts in the env; the services' env file reaches it through ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs
import pytest
import yaml
from mlflow import MlflowClient
from ray.train import TrainingFailedError

from deployments.services import S3_BUCKET, Layout, launch, object_store_env, read_env_file, services, stop, wait_ready, write_env
from deployments.services import _free_port as free_port
from flows.cli import status_report
from tasks.config import PipelineConfig, load_config
from tasks.engine import StageOutcome, plan, run_pipeline
from tasks.store import MANIFEST, StageDir, filesystem_for
from tasks.tracking import tracking_uri
from tasks.train.loop import FAULT_ENV

CHAIN = ("ingest", "filter", "dedup", "pii", "tokenizer", "tokenize", "pretrain")
PRETRAIN = {"steps": 4, "checkpoint_every": 2, "eval_every": 4, "log_every": 2, "max_failures": 0}
FAULT_STEP = 3  # after the step-2 checkpoint; max_failures 0: the stage fails, as when its process dies


@dataclass(frozen=True)
class ObjectStore:
    """The S3 server of one test module: its settings and what it was asked."""

    layout: Layout

    @property
    def env(self) -> dict[str, str]:
        return self.layout.s3_env()

    def uri(self, prefix: str) -> str:
        """A store in the bucket, the server named in the URI rather than in the env."""
        return f"s3://{S3_BUCKET}/{prefix}?endpoint_override={urlsplit(self.env['AWS_ENDPOINT_URL']).netloc}&scheme=http"

    def requests(self, key: str) -> list[str]:
        """``METHOD /bucket/key?query`` of every request the server logged for object ``key``."""
        log = (self.layout.root / "s3.log").read_text()
        pattern = rf'"([A-Z]+ /{S3_BUCKET}/{re.escape(key)}(?:\?[^ ]*)?) HTTP'
        return re.findall(pattern, log)


@pytest.fixture(scope="module")
def object_store(tmp_path_factory) -> Iterator[ObjectStore]:
    """moto's S3 server on loopback with the services' bucket, stopped after the module."""
    layout = Layout(root=tmp_path_factory.mktemp("services"), prefect_port=0, mlflow_port=0, ray_port=0, s3_port=free_port())
    s3 = next(s for s in services(layout) if s.name == "s3")
    launch(layout, s3)
    try:
        wait_ready(layout, s3)  # also creates the bucket
        yield ObjectStore(layout)
    finally:
        stop(layout, "s3")


@dataclass(frozen=True)
class Chain:
    """The tiny chain's first, undisturbed run on the S3 store."""

    path: Path  # the config file (``crucible status`` reads one)
    config: PipelineConfig
    outcomes: list[StageOutcome]
    model: dict[str, str]  # pretrain's model/ files -> their digests


def model_digests(config: PipelineConfig) -> dict[str, str]:
    """The BLAKE2 digest of every file in the pretrain stage's ``model/`` folder."""
    out = plan(config)["pretrain"].out
    return {f: hashlib.blake2b(out.read_bytes(f)).hexdigest() for f in out.list_files() if f.startswith("model/")}


@pytest.fixture(scope="module")
def chain(object_store, tmp_path_factory, home_at, tiny_cut, ray_session) -> Iterator[Chain]:
    """ingest → pretrain on ``s3://…/tiny`` once for the module (the data stages take most of it)."""
    with pytest.MonkeyPatch.context() as env:
        folder = tmp_path_factory.mktemp("chain")
        home_at(folder / "home", env)
        env.delenv("AWS_ENDPOINT_URL", raising=False)  # the store URI names the server
        data = tiny_cut(*CHAIN) | {"store": object_store.uri("tiny")}
        data["pretrain"] |= PRETRAIN
        path = folder / "tiny-s3.yaml"
        path.write_text(yaml.safe_dump(data))
        config = load_config(path)
        started = time.monotonic()
        outcomes = run_pipeline(config)
        print(f"\ntiny chain on S3: {time.monotonic() - started:.1f}s")
        yield Chain(path, config, outcomes, model_digests(config))


def test_services_env_points_s3_clients_at_the_object_store(object_store):
    """``make services`` writes the server's endpoint and dummy credentials to its env file, and
    the server it started has the bucket."""
    env = write_env(object_store.layout)
    assert read_env_file(object_store.layout.root / "env") == env
    assert {k: env[k] for k in object_store.env} == object_store_env(f"http://127.0.0.1:{object_store.layout.s3_port}")
    fs, _ = filesystem_for(object_store.uri("store"))
    assert fs.get_file_info(S3_BUCKET).type == pafs.FileType.Directory


def test_a_manifest_is_one_put_with_the_env_settings_alone(object_store, monkeypatch):
    """No half-written manifest: it goes out as one PUT, which readers see whole or not at all
    (pyarrow would otherwise send a multipart upload, part by part). Here the server comes
    from ``AWS_ENDPOINT_URL``, as in a shell that sourced the services' env file."""
    for name, value in object_store.env.items():
        monkeypatch.setenv(name, value)
    out = StageDir.at(f"s3://{S3_BUCKET}/env-only", "ingest", "fp")
    data = b'{"stage": "ingest"}' * 1000
    out.write_bytes_atomic(MANIFEST, data)
    assert out.read_bytes(MANIFEST) == data
    assert out.uri == f"s3://{S3_BUCKET}/env-only/ingest/fp"
    assert [r for r in object_store.requests(f"env-only/ingest/fp/{MANIFEST}") if not r.startswith(("GET", "HEAD"))] == [
        f"PUT /{S3_BUCKET}/env-only/ingest/fp/{MANIFEST}"
    ]


@pytest.mark.slow
def test_the_tiny_chain_runs_on_s3_and_then_is_cached(chain, object_store):
    """Every stage's output and manifest (one PUT each) in the bucket; a second run reads them
    back and runs nothing; ``crucible status`` finds them there."""
    assert [(o.stage, o.state) for o in chain.outcomes] == [(s, "ran") for s in CHAIN]
    for o in chain.outcomes:
        key = f"tiny/{o.stage}/{o.manifest.fingerprint}/{MANIFEST}"
        assert o.manifest.path == object_store.uri(f"tiny/{o.stage}/{o.manifest.fingerprint}")
        assert [r for r in object_store.requests(key) if r.startswith(("PUT", "POST"))] == [f"PUT /{S3_BUCKET}/{key}"]
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= set(chain.model)

    started = time.monotonic()
    again = run_pipeline(chain.config)
    print(f"cached rerun: {time.monotonic() - started:.1f}s")
    assert [o.state for o in again] == ["cached"] * len(CHAIN)
    assert [o.manifest for o in again] == [o.manifest for o in chain.outcomes]

    report = status_report(str(chain.path))  # `crucible status --json`
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [(s, "done") for s in CHAIN]
    assert all(s["path"].startswith(f"s3://{S3_BUCKET}/tiny/{s['stage']}/") for s in report["stages"])


@pytest.mark.slow
def test_a_pretrain_killed_mid_stage_resumes_from_its_s3_checkpoint(chain, monkeypatch):
    """A worker dies after the step-2 checkpoint: the stage fails without a manifest; the rerun
    restores the checkpoint from the bucket and exports the model an undisturbed run exports."""
    pretrain = plan(chain.config)["pretrain"]
    monkeypatch.setenv(FAULT_ENV, str(FAULT_STEP))
    with pytest.raises(TrainingFailedError):
        run_pipeline(chain.config, force=["pretrain"])  # cleared, then crashed
    assert pretrain.manifest() is None
    assert pretrain.out.exists("checkpoints/train/step_00000002/")
    assert not pretrain.out.exists("model/config.json")

    monkeypatch.delenv(FAULT_ENV)
    outcomes = run_pipeline(chain.config)
    assert [o.state for o in outcomes] == ["cached"] * (len(CHAIN) - 1) + ["ran"]
    resumed = MlflowClient(tracking_uri()).get_metric_history(outcomes[-1].mlflow_run_id, "train/resumed_from_step")
    assert [(m.step, m.value) for m in resumed] == [(2, 2.0)]
    assert model_digests(chain.config) == chain.model
