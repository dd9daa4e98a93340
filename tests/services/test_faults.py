"""Faults operators meet, injected into runs of the full-pipeline deployment on the services.

Each test prints how long recovery took (see ``Clock``); timings are reported, never asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client

from .faults import Clock, busy_ray_workers, crash, stage_dir, wait_for

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
