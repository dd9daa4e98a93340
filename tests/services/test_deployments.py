"""``prefect deploy`` against the server, runs triggered through the API on the worker, MLflow."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError


def test_prefect_yaml_is_deployed_to_the_process_pool(svc):
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        [worker] = client.read_workers_for_work_pool("crucible")
    assert set(deployments) == {"full-pipeline", "nightly-data-refresh", "rerun-stage"}
    assert {d.work_pool_name for d in deployments.values()} == {"crucible"}
    [nightly] = deployments["nightly-data-refresh"].schedules
    assert nightly.schedule.cron == "0 2 * * *"
    assert deployments["nightly-data-refresh"].parameters == {"until_stage": "pii"}
    assert deployments["full-pipeline"].pull_steps == [  # $CRUCIBLE_PROJECT_DIR, resolved at deploy time
        {"prefect.deployments.steps.set_working_directory": {"directory": svc.env["CRUCIBLE_PROJECT_DIR"]}}
    ]
    assert worker.name == "crucible-local" and worker.status == "ONLINE"


def test_api_run_with_a_new_threshold_runs_on_the_worker_and_lands_in_mlflow(svc):
    config = svc.tiny_config()
    threshold = config["filter"]["default"]["langid"]["min_score"]
    assert threshold != 0.5  # tiny.yaml's own value
    run = svc.run_pipeline(config, until_stage="filter")
    assert run.state.is_completed(), run.state.message
    assert run.work_pool_name == "crucible" and run.infrastructure_pid  # the worker ran it

    stages = svc.stage_runs()
    assert {name: len(runs) for name, runs in stages.items()} == {"ingest": 1, "filter": 1}
    by_stage = {name: runs[0] for name, runs in stages.items()}
    assert {r.info.status for r in by_stage.values()} == {"FINISHED"}
    assert by_stage["filter"].data.params["default.langid.min_score"] == str(threshold)
    assert by_stage["filter"].data.tags["crucible.output"].startswith(config["store"])
    assert 0 < by_stage["filter"].data.metrics["rows"] < by_stage["ingest"].data.metrics["rows"]


def test_a_bad_parameter_is_refused_with_its_field_path_before_anything_runs(svc, tmp_path):
    config = svc.tiny_config(tmp_path / "store")
    config["filter"]["default"]["langid"]["min_score"] = 1.5
    with get_client(sync_client=True) as client:
        before = len(client.read_flow_runs())
    with pytest.raises(PrefectHTTPStatusError) as refused:
        svc.run_pipeline(config, timeout=0, until_stage="filter")
    message = refused.value.response.json()["detail"]
    assert "config.filter.default.langid.min_score" in message
    assert "greater than the maximum of 1.0" in message
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == before  # no flow run was created
    assert not (tmp_path / "store").exists()
