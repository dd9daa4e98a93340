"""Ray on demand: an existing cluster when one is named, else a local Ray started lazily.

Ray is started only when a stage actually has to run, so a pipeline run whose stages are all
complete never pays Ray's start-up.
"""

from __future__ import annotations

import os

from tasks.config import RayConfig


def ensure_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("CRUCIBLE_PROGRESS", "1") == "1"
