"""The pipeline config: one pydantic model, loaded from YAML, checked before anything runs.

General sections (``name``, ``store``, ``tracking``, ``ray``, ``lease``) plus one optional
section per stage. A stage runs only if its section is present; the sections present must form
a chain (every stage's upstream stages are configured too). Unknown keys are errors everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.data.dedup import DedupConfig
from tasks.data.filter import FilterConfig
from tasks.data.ingest import IngestConfig
from tasks.data.pii import PiiConfig
from tasks.data.tokenize import TokenizeConfig
from tasks.data.tokenizer import TokenizerConfig
from tasks.errors import ConfigError
from tasks.eval.evaluate import EvaluateConfig
from tasks.feedback.cai import FeedbackConfig
from tasks.paths import state_dir
from tasks.registry import STAGE_ORDER, STAGES
from tasks.train.align import AlignConfig
from tasks.train.pretrain import PretrainConfig
from tasks.train.reward import RewardConfig
from tasks.train.sft import SFTConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrackingConfig(Strict):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else a SQLite DB under the state dir",
    )
    experiment: str | None = Field(None, description="MLflow experiment; default: the pipeline name")


class RayConfig(Strict):
    address: str | None = Field(
        None, description="Ray cluster address; default: $RAY_ADDRESS, else a local Ray started on demand"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all)")


class LeaseConfig(Strict):
    """One writer per stage folder (``tasks/lease.py``). Only how runs share a folder: no field
    here changes what a stage writes, so none is part of a fingerprint."""

    wait_s: float = Field(
        3600, ge=0, description="how long a run waits while another live run writes the same stage, then fails"
    )
    ttl_s: float = Field(
        300, gt=0, description="a lease whose heartbeat is older is stale (its run is gone) and is taken over"
    )
    heartbeat_s: float = Field(30, gt=0, description="how often the run holding a lease refreshes it")

    @model_validator(mode="after")
    def _beats_well_within_ttl(self) -> LeaseConfig:
        if self.heartbeat_s * 2 > self.ttl_s:
            raise ValueError("heartbeat_s must be at most half of ttl_s, or a live run's lease could look stale")
        return self


class PipelineConfig(Strict):
    """A whole Crucible pipeline."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="pipeline (= MLflow experiment) name")
    store: str | None = Field(
        None, description="where outputs live: a folder or an object-store URI; default: the state dir's store/"
    )
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    lease: LeaseConfig = LeaseConfig()
    ingest: IngestConfig | None = None
    filter: FilterConfig | None = None
    dedup: DedupConfig | None = None
    pii: PiiConfig | None = None
    tokenizer: TokenizerConfig | None = None
    tokenize: TokenizeConfig | None = None
    pretrain: PretrainConfig | None = None
    sft: SFTConfig | None = None
    feedback: FeedbackConfig | None = None
    reward: RewardConfig | None = None
    align: AlignConfig | None = None
    evaluate: EvaluateConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_stages_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key in STAGE_ORDER and key not in STAGES:
                    raise ValueError(
                        f"stage '{key}' is not implemented in this version of Crucible "
                        f"(available: {', '.join(STAGES)})"
                    )
        return data

    @model_validator(mode="after")
    def _sections_form_a_chain(self) -> PipelineConfig:
        for stage in self.configured_stages():
            declared = STAGES[stage]
            needed = declared.required_upstream(self.section(stage))
            later = [up for up in needed if STAGE_ORDER.index(up) > STAGE_ORDER.index(stage)]
            if later:
                raise ValueError(f"stage '{stage}' cannot read the output of {', '.join(later)}: it runs before them")
            missing = [up for up in needed if self.section(up) is None]
            if missing:
                hint = f" (or {stage}.init_from: a local Hugging Face checkpoint)" if declared.needs else ""
                raise ValueError(f"stage '{stage}' needs the section(s) {', '.join(missing)}{hint}")
        return self

    def store_uri(self) -> str:
        return self.store or str(state_dir() / "store")

    def section(self, stage: str) -> BaseModel | None:
        return getattr(self, stage, None)

    def configured_stages(self) -> list[str]:
        """The stages this config runs, in pipeline order."""
        return [s for s in STAGE_ORDER if s in STAGES and self.section(s) is not None]


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_sections_form_a_chain()]",):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def validate_config(data: Any, source: str) -> PipelineConfig:
    """Validate a dict (from YAML, the CLI or the Prefect UI); raise ``ConfigError`` naming fields."""
    if not isinstance(data, dict):
        raise ConfigError(source, [("(top level)", "expected a mapping of sections")])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            why = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                why = "unknown key"
            problems.append((_field_path(err["loc"]), why))
        raise ConfigError(source, problems) from None


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping in ``path``, with its ``base:`` file's sections under it (its own sections win,
    whole: a section is replaced, never merged key by key, so no setting leaks from the base)."""
    if not path.is_file():
        raise ConfigError(str(path), [("(file)", "no such file")])
    if path.resolve() in chain:
        raise ConfigError(str(path), [("base", "the base files form a cycle: " + " -> ".join(map(str, chain)))])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise ConfigError(str(path), [(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [("(top level)", "expected a mapping of sections")])
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(str(path), [("base", "expected the path of another config (relative to this file)")])
    return {**_read_yaml(path.parent / base, (*chain, path.resolve())), **data}


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a YAML config. Errors name the file, the field path and the reason.

    ``base: other.yaml`` starts from another config's sections (e.g. the demo with another
    ``align`` method); stages whose sections are unchanged keep their fingerprints, so their
    outputs are reused.
    """
    return validate_config(_read_yaml(Path(path)), str(path))
