"""Shared fixtures: one local Ray per test session, a temporary state dir per test."""

from __future__ import annotations

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("CRUCIBLE_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from deployments.services import S3_CREDENTIALS  # noqa: E402

# The dummy credentials of the tests' S3 server (test_s3_store.py), set before any Ray worker
# starts so that workers sign their requests too; no test may use a real account's.
os.environ.update(S3_CREDENTIALS)

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024**2, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray


def use_home(home, monkeypatch):
    """CRUCIBLE_HOME (MLflow SQLite, default store) at ``home``; no tracking server or Ray cluster from the env."""
    monkeypatch.setenv("CRUCIBLE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return home


@pytest.fixture
def tmp_home(tmp_path, monkeypatch):
    """``use_home`` in a temp dir, for one test."""
    return use_home(tmp_path / "home", monkeypatch)


@pytest.fixture(scope="session")
def home_at():
    """``home_at(folder, monkeypatch)``: see ``use_home``; for fixtures that outlive one test."""
    return use_home


CHEAP_FILTER = {"langid": {"languages": ["en"]}, "toxicity": None, "gopher_quality": None,
                "gopher_repetition": None, "c4": None, "fineweb": None}
"""filter's cheap checks only (language ID): the store contract is the same for every filter."""


def tiny_sections(*stages: str) -> dict:
    """``configs/tiny.yaml`` as a dict, cut to ``name``, ``ray`` and ``stages``, filter with
    ``CHEAP_FILTER``: what tests that need the chain but not every filter edit and validate."""
    from tasks.config import load_config

    data = load_config("configs/tiny.yaml").model_dump(mode="json", exclude_none=True)
    data = {k: v for k, v in data.items() if k in {"name", "ray", *stages}}
    if "filter" in data:
        data["filter"]["default"] = dict(CHEAP_FILTER)
    return data


@pytest.fixture(scope="session")
def tiny_cut():
    """``tiny_cut(*stages)``: see ``tiny_sections``."""
    return tiny_sections


@pytest.fixture(scope="session")
def demo_chat_cut(tmp_path_factory):
    """``demo_chat_cut(n)``: a folder with the demo chat and preference sets cut to ``n`` training
    rows (an even spread of every kind of example) and 16 held-out rows per set."""
    from tasks.data.demo_chat import write_demo_chat

    full = write_demo_chat(tmp_path_factory.mktemp("demo-full"))

    def cut(train_rows: int):
        small = tmp_path_factory.mktemp(f"demo-{train_rows}")
        for name, path in full.items():
            lines = path.read_text().splitlines()
            if name.endswith("_train"):
                lines = lines[:: max(1, len(lines) // train_rows)][:train_rows]
            (small / path.name).write_text("\n".join(lines[: train_rows if name.endswith("_train") else 16]) + "\n")
        return small

    return cut


def chat_tokenizer(folder, vocab_size: int):
    """A byte-level BPE trained on every message, prompt and reply in a folder of chat sets."""
    import json

    from models.tokenizer import train_tokenizer

    texts = []
    for path in folder.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts += [m["content"] for m in row.get("messages", [])] + [row.get(k, "") for k in ("prompt", "chosen", "rejected")]
    return train_tokenizer([t for t in texts if isinstance(t, str) and t], vocab_size)


@pytest.fixture(scope="session")
def train_chat_tokenizer():
    """``train_chat_tokenizer(folder, vocab_size)``: see ``chat_tokenizer``."""
    return chat_tokenizer


def run_stage_alone(module, root, name: str, cfg, upstream: dict, tag: str = "fp", run_id=None, uri=None):
    """A post-training stage's ``run`` in ``root/name/tag``, outside the engine (no fingerprints;
    MLflow only with ``run_id``); returns (result, output folder, a manifest of that folder)."""
    from datetime import datetime, timezone

    from tasks.config import PipelineConfig
    from tasks.stage import Manifest, StageContext
    from tasks.store import StageDir
    from tasks.tracking import RunLogger

    out = StageDir.at(str(root), name, tag)
    out.make()
    ctx = StageContext(name=name, config=cfg, pipeline=PipelineConfig(name="post"), upstream=upstream, out=out,
                       log=RunLogger(run_id, uri), run_id=run_id)
    result = module.run(ctx)
    now = datetime.now(timezone.utc)
    manifest = Manifest(stage=name, fingerprint=tag, upstream={}, path=out.uri, files=out.list_files(),
                        code_version="1", crucible_version="test", started_at=now, finished_at=now)
    return result, out, manifest


@pytest.fixture(scope="session")
def stage_alone():
    """``stage_alone(module, root, name, cfg, upstream, ...)``: see ``run_stage_alone``."""
    return run_stage_alone
