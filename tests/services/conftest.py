"""The services (Prefect server + worker, MLflow server, 2-node Ray) for the tests of this folder.

Started once for the folder by ``deployments/services.py``, the script behind ``make services``,
in a temporary ``CRUCIBLE_HOME`` on free ports, and stopped when the folder's tests are done.
The test process talks to them over HTTP only (Prefect and MLflow clients); Ray work runs in
the flow runs the worker starts, so the rest of the suite keeps its own local Ray.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.services import PROJECT_DIR, Layout, read_env_file, running_pid, services

LANGID_MIN_SCORE = 0.9  # tiny.yaml keeps the default, 0.5: runs through the API change it

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Services:
    """Handles on the running services for the tests."""

    home: Path
    env: dict[str, str]  # the variables `services up` wrote to services/env
    layout: Layout

    @property
    def mlflow_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    def script(self, *args: str) -> None:
        """Run ``python -m deployments.services ARGS`` as ``make services`` does."""
        subprocess.run([sys.executable, "-m", "deployments.services", *args], env=self.env, cwd=PROJECT_DIR, check=True)

    def pid(self, name: str) -> int | None:
        return running_pid(self.layout, name)

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_uri)

    def stage_runs(self, experiment: str = "tiny") -> dict[str, list]:
        """MLflow runs of each stage under the experiment's newest pipeline parent run, by stage."""
        client = self.mlflow()
        experiment_id = client.get_experiment_by_name(experiment).experiment_id
        [parent] = client.search_runs(
            [experiment_id], f"attributes.run_name = '{experiment}-pipeline'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        runs: dict[str, list] = {}
        for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"):
            runs.setdefault(run.data.tags["crucible.stage"], []).append(run)
        return runs

    def run_pipeline(self, config: dict[str, Any], timeout: float = 900, **parameters: Any):
        """Create a run of the full-pipeline deployment through the API; wait ``timeout`` s for its end."""
        from prefect.deployments import run_deployment

        return run_deployment(
            "pipeline/full-pipeline", parameters={"config": config, **parameters}, timeout=timeout, poll_interval=2
        )

    def tiny_config(self, store: Path | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
        """``configs/tiny.yaml`` as the API receives it, with a changed filter threshold.

        The tests share one store (``home/store``) unless given another, so the data stages
        one test made are cached for the next; ``sections`` override section fields.
        """
        config = yaml.safe_load((PROJECT_DIR / "configs" / "tiny.yaml").read_text())
        config["store"] = str(store or self.home / "store")
        config["filter"]["default"]["langid"]["min_score"] = LANGID_MIN_SCORE
        for name, values in sections.items():
            config[name] = {**config[name], **values}
        return config


@pytest.fixture(scope="package")
def svc() -> Iterator[Services]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Short: Ray's socket paths under it must stay within 107 bytes.
    home = Path(tempfile.mkdtemp(prefix="crs-"))
    env = {
        **os.environ,
        "CRUCIBLE_HOME": str(home),
        "CRUCIBLE_PREFECT_PORT": str(_free_port()),
        "CRUCIBLE_MLFLOW_PORT": str(_free_port()),
        "CRUCIBLE_RAY_PORT": str(_free_port()),
        "CRUCIBLE_CRASH_AFTER_S": "60",  # a killed run is marked Crashed after 60 s, not 120 (two 30 s beats)
        "CRUCIBLE_S3_PORT": str(_free_port()),
    }
    layout = Layout(home / "services", *(int(env[f"CRUCIBLE_{name}_PORT"]) for name in ("PREFECT", "MLFLOW", "RAY", "S3")))
    try:
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "deployments.services", "up"], env=env, cwd=PROJECT_DIR, check=True)
        print(f"\nservices up in {time.monotonic() - started:.1f}s")
        env |= read_env_file(home / "services" / "env")
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            yield Services(home, env, layout)
    finally:  # also after a failed start: nothing may outlive the tests
        subprocess.run([sys.executable, "-m", "deployments.services", "down"], env=env, cwd=PROJECT_DIR, check=True)
        left = [s.name for s in services(layout) if running_pid(layout, s.name)]
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(layout.ray_temp_dir, ignore_errors=True)
        assert not left, f"still running after services down: {left}"
