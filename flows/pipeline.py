"""The ``pipeline`` flow: the stage chain as Prefect subflows, plus a single-stage rerun flow.

Flow parameters are the pydantic config model, so the Prefect UI renders the whole pipeline
config as a form; a bad value is rejected before any stage runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow

from flows.artifacts import publish_pipeline
from flows.stages import STAGE_FLOWS
from tasks.config import PipelineConfig, load_config
from tasks.engine import StageOutcome, plan, run_pipeline, select_stages
from tasks.registry import STAGES

StageName = Literal[tuple(STAGES)]  # type: ignore[valid-type]
# Deployments triggered with no config run the demo pipeline; the UI form starts from it.
DEMO_CONFIG = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def _subflow(config: PipelineConfig, name: str, *, force: bool, upstream, parent_run_id, planned) -> StageOutcome:
    return STAGE_FLOWS[name](config=config, force=force, upstream=upstream, parent_run_id=parent_run_id)


@flow(name="pipeline", flow_run_name="{config.name}", persist_result=False, log_prints=True)
def pipeline(
    config: PipelineConfig = DEMO_CONFIG,
    from_stage: StageName | None = None,
    until_stage: StageName | None = None,
    force: list[StageName] | None = None,
) -> list[StageOutcome]:
    """Run the configured stages in order; complete stages are skipped unless forced.

    `from_stage` reruns that stage and everything after it; `force` reruns the stages listed and
    every configured stage downstream of them; `until_stage` stops after that stage.
    """
    select_stages(config, from_stage, until_stage)  # refuse a bad slice before anything runs
    plan(config)  # and unusable inputs (e.g. a source glob that matches nothing)
    rows: list[dict] = []

    def record(stage: str, state: str, outcome: StageOutcome | None, seconds: float) -> None:
        rows.append(
            {
                "stage": stage,
                "state": state,
                "duration_s": round(seconds, 2),
                "fingerprint": outcome.manifest.fingerprint if outcome else "",
                "output": outcome.manifest.path if outcome else "",
            }
        )
        print(f"{stage:<10} {state:<7} {seconds:7.1f}s  {outcome.manifest.path if outcome else ''}")

    try:
        return run_pipeline(
            config, from_stage, until_stage, force or (), runner=_subflow, on_outcome=record
        )
    finally:
        publish_pipeline(config, rows)


@flow(name="rerun-stage", flow_run_name="{stage}-{config.name}", persist_result=False, log_prints=True)
def rerun_stage(stage: StageName, config: PipelineConfig = DEMO_CONFIG, force: bool = True) -> StageOutcome:
    """Rerun one stage from its upstream outputs in the store (forced by default)."""
    return STAGE_FLOWS[stage](config=config, force=force)
