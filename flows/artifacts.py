"""Prefect artifacts for stages and pipeline runs (markdown summaries, the run table)."""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.config import PipelineConfig
from tasks.engine import StageOutcome
from tasks.tracking import created_run, tracking_uri


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def mlflow_link(config: PipelineConfig, run_id: str | None) -> str:
    if run_id is None:
        return "not tracked"
    run_id = created_run(run_id)
    if run_id is None:
        return "pending: MLflow is unreachable, the run is created when it returns"
    uri = tracking_uri(config.tracking.uri)
    if uri.startswith(("http://", "https://")):
        return f"[{run_id}]({uri.rstrip('/')}/#/runs/{run_id})"
    return f"`{run_id}` in `{uri}` (open with `mlflow ui --backend-store-uri {uri}`)"


def publish_stage(config: PipelineConfig, outcome: StageOutcome) -> None:
    m = outcome.manifest
    counts = "\n".join(f"| {k} | {v} |" for k, v in sorted(m.counts.items()))
    markdown = (
        f"# {m.stage} — {outcome.state}\n\n"
        f"- fingerprint: `{m.fingerprint}`\n- output: `{m.path}`\n"
        f"- rows: {m.rows if m.rows is not None else '–'} · tokens: {m.tokens if m.tokens is not None else '–'}\n"
        f"- MLflow run: {mlflow_link(config, outcome.mlflow_run_id)}"
        + (f" (output produced by run `{m.mlflow_run_id}`)" if outcome.state == "cached" else "")
        + "\n\n"
        + (outcome.report or "")
        + (f"\n\n| count | value |\n|---|---|\n{counts}\n" if counts else "")
    )
    create_markdown_artifact(key=artifact_key(config.name, m.stage), markdown=markdown, description=f"{m.stage} stage")


def publish_pipeline(config: PipelineConfig, rows: list[dict]) -> None:
    create_table_artifact(key=artifact_key(config.name, "pipeline"), table=rows, description=f"pipeline {config.name}")
