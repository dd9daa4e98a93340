"""The stage engine: fingerprints, output folders, skip-when-complete, manifests, MLflow runs.

``plan`` works out every configured stage's fingerprint and whether its output is complete,
without running anything. ``run_stage`` runs one stage (or reports it cached) and
``run_pipeline`` runs a slice of the chain. Prefect flows wrap these; nothing here imports
Prefect, so the same engine serves the CLI, the flows and the tests.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

from pydantic import BaseModel

from tasks.config import PipelineConfig
from tasks.errors import StageError
from tasks.lease import StageLease
from tasks.ray_runtime import ensure_ray
from tasks.registry import STAGE_ORDER, STAGES
from tasks.stage import Manifest, StageContext, fingerprint_view
from tasks.store import MANIFEST, StageDir
from tasks.tracking import RunLogger, StageDataset, created_run, deliver_spool, git_commit, start_run, tracking_uri

try:
    CRUCIBLE_VERSION = version("crucible")
except PackageNotFoundError:  # running from a checkout that is not installed
    CRUCIBLE_VERSION = "0+unknown"


def fingerprint(stage: str, section: BaseModel, code_version: str, upstream: dict[str, str], inputs: str = "") -> str:
    """hash(stage name, stage config, stage code version, upstream fingerprints[, input digest])."""
    payload = json.dumps(
        {
            "stage": stage,
            "config": fingerprint_view(section),
            "code_version": code_version,
            "upstream": dict(sorted(upstream.items())),
            "inputs": inputs,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlannedStage:
    name: str
    fingerprint: str
    upstream: dict[str, str]
    out: StageDir

    def manifest(self) -> Manifest | None:
        """The stage's manifest if its output is complete (a folder without one never counts).

        Its ``path`` is where the folder is reached now: an object store's endpoint, in the
        store URI's query, may have moved since the manifest was written.
        """
        data = self.out.read_json(MANIFEST)
        return Manifest.model_validate({**data, "path": self.out.uri}) if data is not None else None


def plan(config: PipelineConfig) -> dict[str, PlannedStage]:
    """Fingerprint every configured stage, in order. Raises ``ConfigError`` for unusable inputs."""
    planned: dict[str, PlannedStage] = {}
    for name in config.configured_stages():
        stage = STAGES[name]
        section = config.section(name)
        upstream = {up: planned[up].fingerprint for up in stage.feeding(section, planned)}
        inputs = stage.inputs(section, config) if stage.inputs else ""
        fp = fingerprint(name, section, stage.version, upstream, inputs)
        planned[name] = PlannedStage(name, fp, upstream, StageDir.at(config.store_uri(), name, fp))
    return planned


class StageOutcome(BaseModel):
    """What happened to one stage in a run: small, so flows can pass it around."""

    stage: str
    state: Literal["ran", "cached"]
    manifest: Manifest
    duration_s: float
    mlflow_run_id: str | None = None
    report: str = ""


def _stage_tags(planned: PlannedStage, state: str) -> dict[str, str | None]:
    return {
        "crucible.stage": planned.name,
        "crucible.fingerprint": planned.fingerprint,
        "crucible.upstream": json.dumps(planned.upstream, sort_keys=True),
        "crucible.version": CRUCIBLE_VERSION,
        "crucible.git_commit": git_commit(),
        "crucible.state": state,
        "crucible.output": planned.out.uri,
    }


def _experiment(config: PipelineConfig) -> str:
    return config.tracking.experiment or config.name


def _datasets(me: PlannedStage, planned: dict[str, PlannedStage]) -> list[StageDataset]:
    """What the stage reads (its upstream stages' outputs) and writes, as MLflow datasets."""
    read = [StageDataset(up, fp, planned[up].out.uri, "input") for up, fp in me.upstream.items()]
    return [*read, StageDataset(me.name, me.fingerprint, me.out.uri, "output")]


def _stage_log(config: PipelineConfig, me: PlannedStage, run_id: str, uri: str, datasets: list[StageDataset]) -> RunLogger:
    """The logger of a stage's run, which starts with the stage's config and datasets."""
    log = RunLogger(run_id, uri)
    log.log_params(config.section(me.name).model_dump(mode="json"))
    log.log_datasets(datasets)
    return log


def run_stage(
    config: PipelineConfig,
    name: str,
    *,
    force: bool = False,
    upstream: dict[str, Manifest] | None = None,
    parent_run_id: str | None = None,
    planned: dict[str, PlannedStage] | None = None,
) -> StageOutcome:
    """Run one stage, or report it cached when its manifest exists and ``force`` is off.

    ``upstream`` manifests are read from the store when not given (a stage run on its own).
    An incomplete folder from an earlier attempt is kept, so stages can resume inside it;
    ``force`` clears it first. The stage is written under its lease (one writer per folder):
    a run that waited for another one writing the same stage reports it cached once that
    run's manifest is there, unless forced.
    """
    if name not in STAGES:
        raise StageError(f"unknown stage '{name}' (available: {', '.join(STAGES)})")
    planned = planned or plan(config)
    if name not in planned:
        raise StageError(f"stage '{name}' is not configured: add a '{name}:' section to the config")
    me = planned[name]
    started = time.monotonic()
    datasets = _datasets(me, planned)

    existing = None if force else me.manifest()
    if existing is None:
        inputs = _upstream_manifests(name, planned, upstream or {})
        with StageLease(me.out, name, config.lease) as lease:
            existing = None if force else me.manifest()  # written by the run this one waited for
            if existing is None:
                return _execute(config, me, inputs, datasets, parent_run_id, started, force, lease)
    return _report_cached(config, me, existing, datasets, parent_run_id, started)


def _upstream_manifests(name: str, planned: dict[str, PlannedStage], given: dict[str, Manifest]) -> dict[str, Manifest]:
    """The manifests ``name`` reads: those given, the others from the store (which must be
    complete and match the planned fingerprints)."""
    inputs = dict(given)
    for up, fp in planned[name].upstream.items():
        if up not in inputs:
            found = planned[up].manifest()
            if found is None:
                raise StageError(
                    f"stage '{name}' needs the output of '{up}' (fingerprint {fp}), "
                    f"which is not complete: run up to '{up}' first"
                )
            inputs[up] = found
        if inputs[up].fingerprint != fp:
            raise StageError(f"stage '{name}': upstream '{up}' manifest does not match the planned fingerprint")
    return inputs


def _report_cached(
    config: PipelineConfig, me: PlannedStage, existing: Manifest, datasets: list[StageDataset],
    parent_run_id: str | None, started: float,
) -> StageOutcome:
    uri = tracking_uri(config.tracking.uri)
    run_id = start_run(uri, _experiment(config), me.name, parent_run_id, {
        **_stage_tags(me, "cached"), "crucible.produced_by": existing.mlflow_run_id,
    })
    _stage_log(config, me, run_id, uri, datasets).close()
    report = (me.out.read_bytes("report.md") or b"").decode("utf-8")
    return StageOutcome(
        stage=me.name, state="cached", manifest=existing, duration_s=time.monotonic() - started,
        mlflow_run_id=run_id, report=report,
    )


def _execute(
    config: PipelineConfig,
    me: PlannedStage,
    inputs: dict[str, Manifest],
    datasets: list[StageDataset],
    parent_run_id: str | None,
    started: float,
    force: bool,
    lease: StageLease,
) -> StageOutcome:
    """Run the stage body into its folder and write the manifest last; the caller holds the lease."""
    name = me.name
    uri = tracking_uri(config.tracking.uri)
    if force:
        me.out.clear()
    me.out.make()
    run_id = start_run(uri, _experiment(config), name, parent_run_id, _stage_tags(me, "ran"))
    log = _stage_log(config, me, run_id, uri, datasets)
    began = datetime.now(timezone.utc)
    try:
        ensure_ray(config.ray)
        ctx = StageContext(name=name, config=config.section(name), pipeline=config, upstream=inputs, out=me.out, log=log, run_id=run_id)
        result = STAGES[name].run(ctx)
        me.out.write_bytes_atomic("report.md", result.report.encode())
        manifest = Manifest(
            stage=name,
            fingerprint=me.fingerprint,
            upstream=me.upstream,
            path=me.out.uri,
            files=me.out.list_files(),
            rows=result.rows,
            tokens=result.tokens,
            counts=result.counts,
            metrics=result.metrics,
            mlflow_run_id=created_run(run_id) or run_id,  # deferred only while MLflow is still away
            code_version=STAGES[name].version,
            crucible_version=CRUCIBLE_VERSION,
            started_at=began,
            finished_at=datetime.now(timezone.utc),
        )
        lease.ensure_held()
        me.out.write_bytes_atomic(MANIFEST, manifest.model_dump_json(indent=2).encode())
    except BaseException:
        log.close("FAILED")
        raise
    counters = {f"count.{k}": v for k, v in result.counts.items()}
    sizes = {k: v for k, v in (("rows", result.rows), ("tokens", result.tokens)) if v is not None}
    log.log_metrics({**result.metrics, **counters, **sizes, "duration_s": time.monotonic() - started})
    log.log_dict(manifest.model_dump(mode="json"), "manifest.json")
    log.log_text(result.report, "report.md")
    log.close()
    deliver_spool()  # what training workers spilled during an outage, now that the server may be back
    return StageOutcome(
        stage=name, state="ran", manifest=manifest, duration_s=time.monotonic() - started,
        mlflow_run_id=run_id, report=result.report,
    )


def select_stages(
    config: PipelineConfig, from_stage: str | None = None, until_stage: str | None = None
) -> list[str]:
    """The configured stages between ``from_stage`` and ``until_stage`` (inclusive)."""
    configured = config.configured_stages()
    for label, value in (("from", from_stage), ("until", until_stage)):
        if value is None:
            continue
        if value not in STAGE_ORDER:
            raise StageError(f"--{label} {value}: unknown stage (stages: {', '.join(STAGE_ORDER)})")
        if value not in STAGES:
            raise StageError(f"--{label} {value}: stage '{value}' is not implemented in this version of Crucible")
        if value not in configured:
            raise StageError(f"--{label} {value}: stage '{value}' has no section in this config")
    start = configured.index(from_stage) if from_stage else 0
    end = configured.index(until_stage) + 1 if until_stage else len(configured)
    if start >= end:
        raise StageError(f"--from {from_stage} comes after --until {until_stage}")
    return configured[start:end]


StageRunner = Callable[..., StageOutcome]


def run_pipeline(
    config: PipelineConfig,
    from_stage: str | None = None,
    until_stage: str | None = None,
    force: Iterable[str] = (),
    runner: StageRunner = run_stage,
    on_outcome: Callable[[str, str, StageOutcome | None, float], None] | None = None,
    planned: dict[str, PlannedStage] | None = None,
) -> list[StageOutcome]:
    """Run the selected slice of the chain under one MLflow parent run.

    ``from_stage`` reruns that stage and every later selected stage (forced); earlier stages
    are read from the store and must be complete. ``force`` reruns the stages named and every
    configured stage that depends on one of them, directly or through others: a forced stage
    replaces its output at the same fingerprint, so nothing downstream may stay cached on the
    output it replaced.
    ``runner`` runs one stage (the Prefect pipeline passes a per-stage subflow);
    ``on_outcome(stage, state, outcome, seconds)`` hears about every stage, failures included.
    """
    force = set(force)
    unknown = force - set(STAGE_ORDER)
    if unknown:
        raise StageError(f"--force: unknown stage(s) {', '.join(sorted(unknown))}")
    selected = select_stages(config, from_stage, until_stage)
    if from_stage:
        force |= set(selected)
    planned = planned or plan(config)  # callers that already planned pass it: plan() digests input files
    for name, stage in planned.items():  # pipeline order: a stage's upstreams are decided before it
        if any(up in force for up in stage.upstream):
            force.add(name)
    uri = tracking_uri(config.tracking.uri)
    deliver_spool()  # calls an earlier run could not deliver
    parent = start_run(uri, _experiment(config), f"{config.name}-pipeline", None, {
        "crucible.version": CRUCIBLE_VERSION, "crucible.git_commit": git_commit(),
        "crucible.stages": ",".join(selected), "crucible.kind": "pipeline",
    })
    parent_log = RunLogger(parent, uri)
    parent_log.log_dict(config.model_dump(mode="json"), "config.json")
    manifests: dict[str, Manifest] = {}
    outcomes: list[StageOutcome] = []
    for name in selected:
        upstream = {up: manifests[up] for up in planned[name].upstream if up in manifests}
        began = time.monotonic()
        try:
            outcome = runner(config, name, force=name in force, upstream=upstream, parent_run_id=parent, planned=planned)
        except BaseException:
            if on_outcome:
                on_outcome(name, "failed", None, time.monotonic() - began)
            parent_log.close("FAILED")
            raise
        manifests[name] = outcome.manifest
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(name, outcome.state, outcome, outcome.duration_s)
    parent_log.log_metrics({"stages_ran": sum(o.state == "ran" for o in outcomes), "stages_cached": sum(o.state == "cached" for o in outcomes)})
    parent_log.close()
    return outcomes
