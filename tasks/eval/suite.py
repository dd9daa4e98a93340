"""What every evaluation suite shares: its config fields, its JSONL rows, and what it returns.

A suite is a JSONL file of rows in the format of its kind (each kind's ``Row`` model, and
``tasks/eval/README.md``) plus settings in the pipeline config. Rows are read and validated on
the driver before any model is loaded: a malformed row is a config error naming the file and
line, because a silently skipped test item changes the score.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.digest import file_digest
from tasks.errors import ConfigError
from tasks.eval.sandbox import SandboxLimits
from tasks.stage import DIGESTED

if TYPE_CHECKING:
    from tasks.eval.lm import LanguageModel


class Row(BaseModel):
    """One test item. ``id`` defaults to the line number; unknown fields are allowed and ignored."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None


@dataclass(frozen=True)
class EvalSettings:
    """What a suite run needs besides the model and its rows."""

    seed: int = 0
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)


@dataclass
class SuiteOutput:
    """A suite's result on one model: summary metrics and one record per item (for inspection)."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]]


class SuiteBase(BaseModel, ABC):
    """Fields every suite has; subclasses add ``kind`` and their own settings."""

    model_config = ConfigDict(extra="forbid")
    row_model: ClassVar[type[Row]] = Row

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="unique name; prefixes its metrics")
    path: str = Field(..., description="JSONL file of rows in this kind's format", json_schema_extra=DIGESTED)
    limit: int | None = Field(None, ge=1, description="use only the first N rows")

    def read_rows(self) -> list[Row]:
        """The suite's rows, validated; ``ConfigError`` names the file and line of a bad one."""
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise ConfigError("config", [(f"evaluate.suites[{self.name}].path", f"no such file '{self.path}'")])
        rows, problems = [], []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if self.limit is not None and len(rows) >= self.limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = self.row_model.model_validate(json.loads(line))
                except (json.JSONDecodeError, ValidationError) as exc:
                    why = str(exc).splitlines()
                    problems.append((f"{path}:{number}", " ".join(why[:3])))
                    continue
                rows.append(row if row.id is not None else row.model_copy(update={"id": str(number)}))
        if problems:
            raise ConfigError(f"suite '{self.name}'", problems[:10])
        if not rows:
            raise ConfigError("config", [(f"evaluate.suites[{self.name}].path", f"'{self.path}' has no rows")])
        return rows

    def digest(self) -> str:
        """The file's content digest: a changed test set must change the stage's fingerprint, the
        same set at another path must not. ``read_rows`` has checked that the file exists."""
        return file_digest(Path(self.path).expanduser())

    @abstractmethod
    def evaluate(self, lm: LanguageModel, rows: list[Any], settings: EvalSettings) -> SuiteOutput:
        """Score ``lm`` on ``rows`` (this suite's ``row_model`` instances)."""


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
