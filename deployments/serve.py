"""Serve the deployments of ``prefect.yaml`` from this process: no work pool or worker needed.

    python -m deployments.serve            # needs PREFECT_API_URL (a running Prefect server)

Reads ``prefect.yaml`` so the served deployments are exactly the ones ``prefect deploy``
would create (same entrypoints, parameters and schedules).
"""

from __future__ import annotations

from pathlib import Path

import yaml

import flows  # noqa: F401  (embedded defaults before Prefect is imported)

PROJECT_DIR = Path(__file__).resolve().parents[1]


def load_deployments(path: Path = PROJECT_DIR / "prefect.yaml") -> list:
    """``RunnerDeployment`` objects for every deployment in ``prefect.yaml``."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load(path.read_text())
    deployments = []
    for entry in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(PROJECT_DIR / entry["entrypoint"]))
        schedules = [CronSchedule(cron=s["cron"], timezone=s.get("timezone")) for s in entry.get("schedules", [])]
        deployments.append(
            flow.to_deployment(
                name=entry["name"],
                description=entry.get("description"),
                parameters=entry.get("parameters") or {},
                schedules=schedules or None,
                tags=entry.get("tags"),
            )
        )
    return deployments


def main() -> None:
    from prefect import serve

    serve(*load_deployments())


if __name__ == "__main__":
    main()
