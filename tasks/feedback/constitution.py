"""A constitution: the written principles a model critiques, revises and judges replies against.

YAML, one entry per principle::

    principles:
      - name: harmless
        critique: Identify specific ways in which the assistant's last response is harmful ...
        revision: Please rewrite the assistant's response to remove any harmful ... content.
        comparison: Which of these assistant responses is less harmful? ...

``critique`` and ``revision`` are asked, word for word, as user turns after the reply (the
supervised phase, SL-CAI); ``comparison`` is the question of the multiple-choice prompt the judge
answers (the preference phase, RL-CAI). Each draw picks one principle at random.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.errors import ConfigError, require_unique


class Principle(BaseModel):
    """One principle: what to critique, how to revise, which reply to prefer."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    critique: str = Field(..., min_length=1, description="the critique request, asked after the reply")
    revision: str = Field(..., min_length=1, description="the revision request, asked after the critique")
    comparison: str = Field(..., min_length=1, description="the judge's multiple-choice question")


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid")

    principles: list[Principle] = Field(..., min_length=1)

    @field_validator("principles")
    @classmethod
    def _unique(cls, principles: list[Principle]) -> list[Principle]:
        require_unique([p.name for p in principles], "principle")
        return principles

    def by_name(self, name: str) -> Principle:
        return next(p for p in self.principles if p.name == name)


def load_constitution(path: str | Path, field: str = "constitution") -> Constitution:
    """Read and validate a constitution file; every problem names the file and the field."""
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("config", [(field, f"cannot read '{path}': {exc}")]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("yaml", str(exc))]) from exc
    try:
        return Constitution.model_validate(data)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]) or "(top level)", e["msg"]) for e in exc.errors()]
        raise ConfigError(str(path), problems) from exc
