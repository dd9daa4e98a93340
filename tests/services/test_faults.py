"""Faults operators meet, injected into runs of the full-pipeline deployment on the services.

Each test prints how long recovery took (see ``Clock``); timings are reported, never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client

from .faults import Clock, busy_ray_workers, crash, planned_dir, stage_dir, wait_for

pytestmark = pytest.mark.timeout(1800)  # several stages on 2 cores, the first with the shared data stages


@pytest.fixture(scope="module")
def filtered(svc) -> Path:
    """The shared store with ``filter`` complete (usually cached from the deployment tests)."""
    run = svc.run_pipeline(svc.tiny_config(), until_stage="filter")
    assert run.state.is_completed(), run.state.message
    return svc.home / "store"


def _final_state(flow_run_id, timeout_s: float = 900):
    def finished():
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
        return state if state and state.is_final() else None

    return wait_for("the flow run to finish", finished, timeout_s, every_s=2)


def test_ray_node_killed_during_filter_gives_the_undisturbed_output(svc, filtered, tmp_path):
    store = tmp_path / "store"
    clock = Clock()
    run = svc.run_pipeline(svc.tiny_config(store), timeout=0, until_stage="filter")
    node2 = svc.pid("ray-node2")
    wait_for("filter to start", lambda: stage_dir(store, "filter"), every_s=0.2)
    busy = wait_for("filter work on the second Ray node", lambda: busy_ray_workers(node2), every_s=0.1)
    crash(node2)
    clock.mark("ray node 2 killed")
    print(f"killed node 2 while it ran: {busy}")
    state = _final_state(run.id)
    clock.mark(f"first run {state.type.value.lower()}")
    svc.script("start", "ray-node2")
    clock.mark("ray node 2 back")
    if not state.is_completed():  # failed cleanly: a rerun completes it
        rerun = svc.run_pipeline(svc.tiny_config(store), until_stage="filter")
        state = rerun.state
        clock.mark("rerun completed")
    clock.report("Ray node killed during filter")

    assert state.is_completed(), state.message
    disturbed, undisturbed = stage_dir(store, "filter"), stage_dir(filtered, "filter")
    assert disturbed.name == undisturbed.name  # same fingerprint
    for part in ("documents", "rejected"):
        mine = pq.read_table(disturbed / part).sort_by("id")
        theirs = pq.read_table(undisturbed / part).sort_by("id")
        assert mine.num_rows > 0 and mine.equals(theirs), part
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (disturbed, undisturbed)]
    assert manifests[0]["rows"] == manifests[1]["rows"] and manifests[0]["counts"] == manifests[1]["counts"]


def _stage_run(svc, out: Path):
    """The newest MLflow run that ran (not cached) the stage whose output folder is ``out``."""
    client = svc.mlflow()
    experiment = client.get_experiment_by_name("tiny")
    if experiment is None:  # the flow run has not reached MLflow yet
        return None
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`crucible.output` = '{out}' and tags.`crucible.state` = 'ran'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0] if runs else None


def _steps(svc, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in svc.mlflow().get_metric_history(run_id, key))


def _spooled_steps(spool: Path, run_id: str, key: str) -> list[int]:
    """Steps of ``key`` waiting in the spool for ``run_id``: logged while MLflow was away."""
    steps = []
    for path in spool.glob("*.jsonl"):
        for record in map(json.loads, path.read_text().splitlines()):
            if record["run_id"] == run_id and record["kind"] == "metrics":
                steps += [step for name, _, _, step in record["metrics"] if name == key]
    return sorted(steps)


def _committed_steps(out: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has recorded in its run snapshot: what a new run restores.

    A checkpoint folder can exist before the controller records it (and one it never recorded is
    not restored), so the snapshot, not the folders, says when a crash leaves something to resume.
    """
    snapshot = out / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError):  # not yet, or being rewritten
        return []
    return sorted(int(r["checkpoint_dir_name"].removeprefix("step_")) for r in results)


def test_mlflow_stopped_during_training_loses_no_metric(svc, filtered):
    steps, log_every = 300, 5  # ~0.1 s a step on 2 cores: the outage starts some 25 s before the end
    config = svc.tiny_config(pretrain={"steps": steps, "log_every": log_every, "checkpoint_every": 200, "eval_every": 300})
    out, spool = planned_dir(config, "pretrain"), svc.home / "mlflow-spool"
    clock = Clock()
    run = svc.run_pipeline(config, timeout=0, until_stage="pretrain")
    training = wait_for(  # the data stages run first when no other test has made them
        "pretrain to log a training loss", lambda: (r := _stage_run(svc, out)) and "train/loss" in r.data.metrics and r, 1200
    )
    run_id = training.info.run_id
    clock.mark("pretrain logged a loss")
    svc.script("stop", "mlflow")
    clock.mark("mlflow stopped")
    state = _final_state(run.id)
    clock.mark(f"flow run {state.type.value.lower()}")
    spooled = _spooled_steps(spool, run_id, "train/loss")
    svc.script("start", "mlflow")
    clock.mark("mlflow back")
    rerun = svc.run_pipeline(config, until_stage="ingest")  # a pipeline start delivers the spool (one stage: quick)
    clock.mark(f"rerun {rerun.state.type.value.lower()}, spool sent")
    clock.report("MLflow stopped during pretrain")
    logged = _steps(svc, run_id, "train/loss")
    print(f"train/loss steps: {len(logged)} in MLflow, {len(spooled)} of them from the spool ({spooled[:1]}..{spooled[-1:]})")

    assert state.is_completed(), state.message  # tracking never fails training
    assert spooled, "training ended before MLflow went away: nothing was logged during the outage"
    assert rerun.state.is_completed(), rerun.state.message
    assert logged == list(range(log_every, steps + 1, log_every))  # every step, once
    finished = svc.mlflow().get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.metrics["steps"] == steps  # the stage's summary, logged by the driver after training
    assert not list(spool.glob("*.jsonl"))


def test_worker_killed_mid_pretrain_then_retried_resumes_from_checkpoint(svc, filtered):
    steps, every = 60, 10  # killed a few steps after the first checkpoint, some 5 s before the end
    config = svc.tiny_config(pretrain={"steps": steps, "log_every": every, "checkpoint_every": every, "eval_every": steps})
    out = planned_dir(config, "pretrain")
    clock = Clock()
    run = svc.run_pipeline(config, timeout=0, until_stage="pretrain")

    wait_for("pretrain to commit a checkpoint", lambda: _committed_steps(out), 1200)
    crash(svc.pid("prefect-worker"))  # the worker and the flow run it started (the Ray driver)
    clock.mark("worker + flow run killed")
    svc.script("start", "prefect-worker")
    clock.mark("worker back")
    committed = _committed_steps(out)  # read once Ray has ended the dead driver's job, its controller with it
    assert committed[-1] < steps and not (out / "manifest.json").exists(), "killed too late: pretrain had finished"
    # The run's heartbeats stopped with its process: the services' automation marks it Crashed.
    left = _final_state(run.id, timeout_s=300)
    clock.mark(f"run marked {left.type.value.lower()} by Prefect")
    assert left.is_crashed(), left
    prefect = Path(sys.executable).parent / "prefect"
    subprocess.run([str(prefect), "flow-run", "retry", str(run.id)], env=svc.env, check=True)
    state = _final_state(run.id)
    clock.mark(f"retry {state.type.value.lower()}")
    clock.report("Prefect worker killed during pretrain, flow run retried")
    print(f"state left by the kill: {left.type.value} ({left.message}); checkpoints committed: {committed}")

    assert state.is_completed(), state.message
    stages = svc.stage_runs()  # the retry's MLflow tree
    assert {name: runs[0].data.tags["crucible.state"] for name, runs in stages.items()} == {
        "ingest": "cached", "filter": "cached", "dedup": "cached", "pii": "cached",
        "tokenizer": "cached", "tokenize": "cached", "pretrain": "ran",
    }
    retried = stages["pretrain"][0].info.run_id
    [(step, value)] = [(m.step, m.value) for m in svc.mlflow().get_metric_history(retried, "train/resumed_from_step")]
    print(f"resumed from step {step}")
    assert step == value == committed[-1]  # the latest checkpoint Ray Train had recorded
    assert _steps(svc, retried, "train/loss") == list(range(step + every, steps + 1, every))  # on from there, not from 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mlflow_run_id"] == retried and manifest["tokens"] > 0
