"""One Prefect flow per stage: each can run on its own or as a subflow of ``pipeline``.

Run on its own, a stage flow reads its upstream manifests from the store (they must be
complete); inside the pipeline it is handed them. Either way it returns a ``StageOutcome``:
a manifest, never data.
"""

from __future__ import annotations

from prefect import flow

from flows.artifacts import publish_stage
from tasks.config import PipelineConfig
from tasks.engine import StageOutcome, run_stage
from tasks.registry import STAGES
from tasks.stage import Manifest


def make_stage_flow(name: str):
    @flow(name=f"stage-{name}", flow_run_name=f"{name}-{{config.name}}", persist_result=False, log_prints=True)
    def stage_flow(
        config: PipelineConfig,
        force: bool = False,
        upstream: dict[str, Manifest] | None = None,
        parent_run_id: str | None = None,
    ) -> StageOutcome:
        outcome = run_stage(config, name, force=force, upstream=upstream, parent_run_id=parent_run_id)
        print(f"{name}: {outcome.state} -> {outcome.manifest.path}")
        publish_stage(config, outcome)
        return outcome

    stage_flow.__doc__ = f"Run the `{name}` stage (skipped when its output is complete, unless `force`)."
    return stage_flow


STAGE_FLOWS = {name: make_stage_flow(name) for name in STAGES}
