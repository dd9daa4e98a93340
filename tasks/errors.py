"""Errors that users see: each names the file, the field or the stage that is wrong."""

from __future__ import annotations


class CrucibleError(Exception):
    """Base for errors with a user-facing message (the CLI prints them without a traceback)."""


class ConfigError(CrucibleError):
    """The config cannot be used: raised before any stage runs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: invalid config"] + [f"  {path}: {why}" for path, why in problems]
        super().__init__("\n".join(lines))


class StageError(CrucibleError):
    """A stage cannot run (missing upstream output, unknown stage …)."""


def require_unique(names: list[str], what: str) -> None:
    """``ValueError`` (which pydantic reports with the field) naming every repeated name."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} names must be unique; repeated: {', '.join(repeated)}")
