"""What a stage is: a function of (its config section, its upstream manifests) -> files + a result.

A stage module (``tasks/data/ingest.py``, ``tasks/train/pretrain.py`` …) defines a pydantic
config section and a ``run(ctx) -> StageResult`` function, and declares itself with ``Stage``.
The engine (``tasks/engine.py``) does everything else: fingerprints, output folders, skipping,
the manifest, the MLflow run. Stage code never sees Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from tasks.store import StageDir, filesystem_for, join_uri

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from tasks.config import PipelineConfig
    from tasks.tracking import RunLogger


class Manifest(BaseModel):
    """The record of one completed stage. Small: this is what flows pass between stages."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    fingerprint: str
    upstream: dict[str, str] = Field(description="upstream stage -> its fingerprint")
    path: str = Field(description="the stage's output folder (local path or URI)")
    files: list[str] = Field(description="outputs, relative to `path`")
    rows: int | None = None
    tokens: int | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    mlflow_run_id: str | None = None
    code_version: str
    crucible_version: str
    started_at: datetime
    finished_at: datetime

    def _under(self, prefix: str) -> list[str]:
        return [f for f in self.files if f.startswith(prefix.rstrip("/") + "/")]

    def file_paths(self, prefix: str) -> list[str]:
        """Full paths (or URIs) of the outputs under ``prefix/`` (e.g. ``documents``)."""
        return [join_uri(self.path, f) for f in self._under(prefix)]

    def files_in(self, prefix: str) -> tuple[pafs.FileSystem, list[str]]:
        """The stage folder's filesystem and the paths in it of the outputs under ``prefix/``:
        what readers such as Ray Data take (``filesystem=``), since a URI's query (an endpoint)
        is no part of a path they could parse."""
        fs, base = filesystem_for(self.path)
        return fs, [f"{base.rstrip('/')}/{f}" for f in self._under(prefix)]


class StageResult(BaseModel):
    """What a stage's ``run`` returns; the engine turns it into the manifest."""

    rows: int | None = None
    tokens: int | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    report: str = Field("", description="markdown summary for Prefect and MLflow")


@dataclass
class StageContext:
    """Everything a running stage may use."""

    name: str
    config: Any  # this stage's pydantic section
    pipeline: PipelineConfig
    upstream: dict[str, Manifest]
    out: StageDir
    log: RunLogger  # this stage's MLflow run (fail-soft)
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """A stage declaration: its name, inputs, code version and entry point.

    ``version`` is the stage's code version: bump it whenever the stage's output for the same
    inputs would change, so every fingerprint from here down changes with it.
    ``inputs`` returns a digest of anything outside the config the output depends on (e.g. the
    contents of ingested files, ``tasks/digest.py``), and raises ``ConfigError`` if those inputs are
    unusable; the config fields naming them are ``DIGESTED``.
    ``optional_upstream`` stages feed this one when the config has them (``evaluate`` scores
    whichever models the pipeline trains); they count in the fingerprint only then.
    ``needs(section)`` narrows ``upstream`` to what this section reads: a post-training stage
    with ``init_from`` starts from that checkpoint, so it needs no ``pretrain`` (or ``sft``).
    """

    name: str
    upstream: tuple[str, ...]
    version: str
    run: Callable[[StageContext], StageResult]
    inputs: Callable[[Any, "PipelineConfig"], str] | None = None
    optional_upstream: tuple[str, ...] = ()
    needs: Callable[[Any], tuple[str, ...]] | None = None

    def required_upstream(self, section: Any) -> tuple[str, ...]:
        """The upstream stages this section reads and the config must therefore have."""
        return self.needs(section) if self.needs else self.upstream

    def feeding(self, section: Any, configured: Any) -> tuple[str, ...]:
        """Required upstream stages, then the optional ones among ``configured``."""
        return self.required_upstream(section) + tuple(up for up in self.optional_upstream if up in configured)


DIGESTED = {"digested": True}
"""``json_schema_extra`` of a config field whose *content* the stage's input digest covers (a
checkpoint folder, a data file or glob, a suite): the field's value (a path) is left out of the
fingerprint, at any depth of the section, so the same content at another path gives the same
fingerprint."""


def _digested(model: BaseModel) -> dict[str, Any]:
    """``model_dump``'s ``exclude`` for the ``DIGESTED`` fields of ``model`` and of the models in it."""
    exclude: dict[str, Any] = {}
    for name, f in type(model).model_fields.items():
        inner = True if (f.json_schema_extra or {}) == DIGESTED else _digested_in(getattr(model, name))
        if inner:
            exclude[name] = inner
    return exclude


def _digested_in(value: Any) -> dict[Any, Any]:
    """The ``exclude`` entries of the models inside a field's value (a model, a list or a mapping)."""
    if isinstance(value, BaseModel):
        return _digested(value)
    if isinstance(value, (list, tuple)):
        value = dict(enumerate(value))
    if isinstance(value, dict):
        return {key: inner for key, item in value.items() if (inner := _digested_in(item))}
    return {}


def fingerprint_view(section: BaseModel) -> dict[str, Any]:
    """The section as the fingerprint sees it: every field but the ``DIGESTED`` ones, nested too
    (the path of each ingest source, each data file, each suite)."""
    return section.model_dump(mode="json", exclude=_digested(section))
