"""The stage contract: fingerprints, manifests last, skip when complete, force/from, MLflow tree."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

import tasks.registry as registry
from tasks.config import load_config, validate_config
from tasks.engine import StageOutcome, fingerprint, plan, run_pipeline, run_stage
from tasks.errors import StageError
from tasks.stage import Stage
from tasks.tracking import tracking_uri


@pytest.fixture
def tiny(tmp_home, tiny_cut):
    """The tiny config cut to ingest -> filter, with filter's cheap checks only: the contract
    is the same for every stage, and the whole chain runs once in test_flows."""
    return validate_config(tiny_cut("ingest", "filter"), "tiny (ingest + filter)")


def test_fingerprint_is_stable_across_processes(tmp_home):
    here = {name: p.fingerprint for name, p in plan(load_config("configs/tiny.yaml")).items()}
    code = (
        "import json; from tasks.config import load_config; from tasks.engine import plan; "
        "print(json.dumps({n: p.fingerprint for n, p in plan(load_config('configs/tiny.yaml')).items()}))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(other.stdout.strip().splitlines()[-1]) == here


def test_fingerprint_follows_config_and_upstream_only(tiny):
    section = tiny.ingest
    base = fingerprint("x", section, "1", {"up": "a"})
    assert fingerprint("x", section, "1", {"up": "a"}) == base
    assert fingerprint("x", section, "2", {"up": "a"}) != base  # code version
    assert fingerprint("x", section, "1", {"up": "b"}) != base  # upstream changed
    changed = section.model_copy(update={"row_group_rows": 7})
    assert fingerprint("x", changed, "1", {"up": "a"}) != base  # own config


def test_changing_a_stage_changes_it_and_everything_downstream(tiny):
    stages = tiny.configured_stages()
    before = {n: p.fingerprint for n, p in plan(tiny).items()}
    # Downstream edits never touch upstream fingerprints.
    last = stages[-1]
    section = tiny.section(last)
    field = next(iter(type(section).model_fields))
    edited_last = tiny.model_copy(update={last: section.model_copy(update={field: getattr(section, field)})})
    assert {n: p.fingerprint for n, p in plan(edited_last).items()} == before
    # An edit to ingest changes every stage's fingerprint.
    edited_first = tiny.model_copy(update={"ingest": tiny.ingest.model_copy(update={"row_group_rows": 3})})
    after = {n: p.fingerprint for n, p in plan(edited_first).items()}
    assert all(after[n] != before[n] for n in stages)


def test_ingest_output_and_quarantine(tiny, ray_session):
    [outcome] = run_pipeline(tiny, until_stage="ingest")
    m = outcome.manifest
    assert outcome.state == "ran"
    assert m.rows == 40 + 10 + 2
    assert m.counts["quarantined"] == 7 and m.counts["quarantined.broken"] == 7
    assert all(not f.startswith("/") for f in m.files) and "report.md" in m.files
    docs = pq.read_table([p for p in m.file_paths("documents")]).to_pylist()
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids))
    assert {"broken/b1", "broken/b7", "web/w0", "code/c9"} <= set(ids)
    first = next(d for d in docs if d["id"] == "broken/b1")
    assert first["text"].startswith("A fine document") and first["domain"] == "web"
    web0 = next(d for d in docs if d["id"] == "web/w0")
    assert web0["url"] == "https://example.org/rivers/0"
    bad = pq.read_table(m.file_paths("quarantine")).to_pylist()
    reasons = {row["line"]: row["error"] for row in bad}
    assert reasons[2].startswith("malformed JSON")
    assert reasons[3] == "missing text field 'text'"
    assert reasons[4] == "empty text field 'text'"
    assert reasons[5].startswith("invalid UTF-8")
    assert reasons[6] == "repeated id 'broken/b1'"
    assert reasons[7] == "expected a JSON object, got list"
    assert reasons[8] == "text field 'text' is int, not a string"
    assert all(row["file"] == "broken.jsonl" for row in bad)


def test_second_run_skips_and_mlflow_tree(tiny, ray_session):
    first = run_pipeline(tiny)
    second = run_pipeline(tiny)
    assert [o.state for o in first] == ["ran"] * len(first)
    assert [o.state for o in second] == ["cached"] * len(second)
    assert [o.manifest for o in second] == [o.manifest for o in first]

    client = MlflowClient(tracking_uri(None))
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("crucible.kind") == "pipeline"]
    assert len(parents) == 2
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    ran = {r.data.tags["crucible.stage"]: r for r in children}
    assert set(ran) == set(tiny.configured_stages())
    ingest_run = ran["ingest"]
    assert ingest_run.data.tags["crucible.fingerprint"] == first[0].manifest.fingerprint
    assert ingest_run.data.tags["crucible.state"] == "ran"
    assert ingest_run.data.params["sources.0.path"] == "tests/data/tiny/web.jsonl"
    assert ingest_run.data.metrics["rows"] == 52
    artifacts = {a.path for a in client.list_artifacts(ingest_run.info.run_id)}
    assert {"manifest.json", "report.md"} <= artifacts
    cached = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
    assert {r.data.tags["crucible.state"] for r in cached} == {"cached"}
    by_stage = {r.data.tags["crucible.stage"]: r for r in cached}
    assert by_stage["ingest"].data.tags["crucible.produced_by"] == ingest_run.info.run_id


def test_crash_before_manifest_leaves_stage_missing(tiny, ray_session, monkeypatch):
    real = registry.STAGES["ingest"]

    def crash(ctx):
        ctx.out.write_bytes_atomic("documents/partial.parquet", b"half")
        raise RuntimeError("worker lost")

    monkeypatch.setitem(registry.STAGES, "ingest", Stage("ingest", (), real.version, crash, real.inputs))
    with pytest.raises(RuntimeError, match="worker lost"):
        run_stage(tiny, "ingest")
    planned = plan(tiny)["ingest"]
    assert planned.manifest() is None and planned.out.exists("documents/partial.parquet")
    client = MlflowClient(tracking_uri(None))
    [failed] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert failed.info.status == "FAILED"

    monkeypatch.setitem(registry.STAGES, "ingest", real)
    outcome = run_stage(tiny, "ingest", force=True)
    assert outcome.state == "ran" and "documents/partial.parquet" not in outcome.manifest.files


def test_force_and_from_rerun_exactly_what_they_should(tiny, ray_session):
    stages = tiny.configured_stages()
    first = run_pipeline(tiny)
    forced_last = run_pipeline(tiny, force=[stages[-1]])  # what is upstream of a forced stage stays cached
    assert [(o.stage, o.state) for o in forced_last] == [(s, "cached") for s in stages[:-1]] + [(stages[-1], "ran")]
    forced = run_pipeline(tiny, force=["ingest"])  # ... and what is downstream of it reruns
    assert [(o.stage, o.state) for o in forced] == [(s, "ran") for s in stages]
    assert [o.manifest.fingerprint for o in forced] == [o.manifest.fingerprint for o in first]
    assert forced[-1].manifest.started_at > forced[0].manifest.finished_at  # rebuilt on the new ingest output
    from_last = run_pipeline(tiny, from_stage=stages[-1])
    assert [(o.stage, o.state) for o in from_last] == [(stages[-1], "ran")]
    until_first = run_pipeline(tiny, until_stage="ingest")
    assert [(o.stage, o.state) for o in until_first] == [("ingest", "cached")]


def test_stage_alone_needs_complete_upstream(tiny):
    stages = tiny.configured_stages()
    if len(stages) < 2:
        pytest.skip("needs a second stage")
    with pytest.raises(StageError, match="run up to 'ingest' first"):
        run_stage(tiny, stages[1])


def test_bad_slices_are_refused(tiny, monkeypatch):
    with pytest.raises(StageError, match="unknown stage"):
        run_pipeline(tiny, until_stage="nope")
    with pytest.raises(StageError, match="has no section in this config"):
        run_pipeline(tiny, until_stage="evaluate")
    monkeypatch.delitem(registry.STAGES, "evaluate", raising=False)
    with pytest.raises(StageError, match="not implemented"):
        run_pipeline(tiny, until_stage="evaluate")


def test_force_reruns_everything_downstream_transitively(tmp_home):
    """--force S reruns S and each configured stage that depends on it through any path, and only those."""
    config = load_config("configs/tiny.yaml")
    planned = plan(config)
    calls: dict[str, bool] = {}

    def runner(config, name, *, force, upstream, parent_run_id, planned):
        calls[name] = force
        return StageOutcome.model_construct(stage=name, state="ran" if force else "cached", manifest=None, duration_s=0.0)

    def forced(force, **kw) -> list[str]:
        calls.clear()
        run_pipeline(config, force=force, runner=runner, planned=planned, **kw)
        return [name for name, f in calls.items() if f]

    def downstream_of(stage: str) -> set[str]:
        found = {stage}
        for name, p in planned.items():
            if set(p.upstream) & found:
                found.add(name)
        return found

    assert forced(["tokenize"], until_stage="pretrain") == ["tokenize", "pretrain"]
    assert forced(["tokenizer"]) == [s for s in planned if s in downstream_of("tokenizer")]
    assert {"tokenize", "pretrain", "evaluate"} <= set(forced(["tokenizer"]))
    assert forced(["evaluate"]) == ["evaluate"]
    assert forced(["pretrain"]) == [s for s in planned if s in downstream_of("pretrain")]
    assert "tokenize" not in forced(["pretrain"]) and "evaluate" in forced(["pretrain"])
    assert forced([]) == []
