"""Fingerprints follow what input files hold, never where they lie or when they were touched.

The tiny pipeline, grown to every stage and every kind of input a stage digests (data globs,
evaluation sets, a tokenizer folder, a baseline checkpoint, a constitution, a chat template), is
planned in two copies of the same tree: nothing runs, so no Ray and no models.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tasks.config import PipelineConfig, load_config, validate_config
from tasks.engine import PlannedStage, plan
from tasks.registry import STAGE_ORDER

REPO = Path(__file__).resolve().parents[1]
CHAT = '{"messages": [{"role": "user", "content": "Hi %d"}, {"role": "assistant", "content": "Hello."}]}\n'
PAIR = '{"prompt": "Sum %d", "chosen": "It is.", "rejected": "No."}\n'
INPUTS = {  # beside tests/data/tiny (ingest's sources and the evaluation suites)
    "chat/sft/a.jsonl": CHAT % 1,
    "chat/sft/b.jsonl": CHAT % 2,
    "chat/prefs.jsonl": PAIR % 1,
    "chat/prompts.jsonl": '{"prompt": "Tell me a joke."}\n',
    "template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "tok/tokenizer.json": "{}",
    "baseline/config.json": "{}",
    "baseline/model.safetensors": "weights",
}


def _tree(root: Path) -> Path:
    """Every input of ``_config`` under ``root``."""
    shutil.copytree(REPO / "tests/data/tiny", root / "tests/data/tiny")
    shutil.copy(REPO / "configs/constitution.yaml", root / "constitution.yaml")
    for name, text in INPUTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _config(root: Path | None = None) -> PipelineConfig:
    """configs/tiny.yaml plus every other stage, its paths relative to the working directory, or
    absolute under ``root``."""
    at = (lambda p: p) if root is None else (lambda p: str(root / p))
    data = load_config(REPO / "configs/tiny.yaml").model_dump(mode="json", exclude_none=True)
    for entry in (*data["ingest"]["sources"], *data["evaluate"]["suites"]):
        entry["path"] = at(entry["path"])
    data["filter"]["decontamination"] = {"files": [{"path": at("tests/data/tiny/eval/heldout_text.jsonl")}]}
    data["tokenizer"] = {"path": at("tok"), "sample_docs": 1000}
    prefs = [{"name": "prefs", "path": at("chat/prefs.jsonl")}]
    data["sft"] = {"data": [{"name": "chat", "path": at("chat/sft/*.jsonl")}], "chat_template": at("template.jinja")}
    data["feedback"] = {"constitution": at("constitution.yaml"), "prompts": [{"name": "asks", "path": at("chat/prompts.jsonl")}]}
    data["reward"] = {"data": prefs}
    data["align"] = {"method": "dpo", "data": prefs}
    data["evaluate"]["baselines"] = [{"name": "base", "path": at("baseline")}]
    return validate_config(data, "tiny, every stage")


def _plan(root: Path, monkeypatch, absolute: bool = False) -> dict[str, PlannedStage]:
    """Plan ``_config`` from inside ``root``, with the state dir (digest cache, store) there too."""
    monkeypatch.chdir(root)
    monkeypatch.setenv("CRUCIBLE_HOME", str(root / ".crucible"))
    return plan(_config(root if absolute else None))


def _fingerprints(root: Path, monkeypatch, absolute: bool = False) -> dict[str, str]:
    return {name: p.fingerprint for name, p in _plan(root, monkeypatch, absolute).items()}


@pytest.fixture
def trees(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return _tree(tmp_path / "a"), _tree(tmp_path / "b")


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_the_same_config_and_data_elsewhere_plan_the_same_fingerprints(trees, monkeypatch, absolute):
    a, b = trees
    here = _fingerprints(a, monkeypatch, absolute)
    assert list(here) == list(STAGE_ORDER)  # every stage has an input or a path to get wrong
    assert _fingerprints(b, monkeypatch, absolute) == here


def test_touching_the_inputs_changes_no_fingerprint(trees, monkeypatch):
    a, _ = trees
    before = _fingerprints(a, monkeypatch)
    for path in a.rglob("*"):
        if path.is_file() and ".crucible" not in path.parts:
            os.utime(path, ns=(10**18, 10**18))
    assert _fingerprints(a, monkeypatch) == before


def test_one_changed_byte_changes_ingest_and_everything_downstream(trees, monkeypatch):
    a, _ = trees
    planned = _plan(a, monkeypatch)
    before = {name: p.fingerprint for name, p in planned.items()}
    web = a / "tests/data/tiny/web.jsonl"
    data = web.read_bytes()
    at = data.index(b"rivers")
    web.write_bytes(data[:at] + b"R" + data[at + 1 :])  # same size: only the content tells
    after = _fingerprints(a, monkeypatch)
    downstream = {"ingest"}
    for name in STAGE_ORDER:  # chain order: a stage's upstreams come before it
        if set(planned[name].upstream) & downstream:
            downstream.add(name)
    assert downstream == set(STAGE_ORDER)  # every stage of this config reads ingest's output, at some remove
    assert {name for name in before if after[name] != before[name]} == downstream


def test_a_renamed_file_inside_a_glob_changes_its_stage(trees, monkeypatch):
    """Names under a source's base folder count: ids without an ``id`` field are ``file:line``."""
    a, _ = trees
    before = _fingerprints(a, monkeypatch)
    (a / "chat/sft/b.jsonl").rename(a / "chat/sft/c.jsonl")
    after = _fingerprints(a, monkeypatch)
    assert after["ingest"] == before["ingest"] and after["sft"] != before["sft"]
