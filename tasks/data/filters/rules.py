"""Rule sets: which checks run on a document, chosen by its domain.

A config has one ``default`` rule set plus per-domain overrides, written as partial rule sets
that are merged key by key onto the default (``null`` switches a check off). Domains listed
as code domains first get ``CODE_PRESET``: prose checks off, code checks on. A rule set is
either for prose or for code, never both, so prose heuristics can never delete source files.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.data.filters.code import CodeQualityConfig
from tasks.data.filters.langid import LangIdConfig
from tasks.data.filters.quality import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig, ProseQuality
from tasks.data.filters.toxicity import ToxicityConfig

PROSE_CHECKS = ("langid", "gopher_quality", "gopher_repetition", "c4", "fineweb")
CODE_PRESET: dict[str, Any] = {**{name: None for name in PROSE_CHECKS}, "code_quality": {}}


class RuleSet(BaseModel):
    """The checks applied to one domain; ``null`` switches a check off."""

    model_config = ConfigDict(extra="forbid")

    langid: LangIdConfig | None = Field(default_factory=LangIdConfig)
    toxicity: ToxicityConfig | None = Field(default_factory=ToxicityConfig)
    gopher_quality: GopherQualityConfig | None = Field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig | None = Field(default_factory=GopherRepetitionConfig)
    c4: C4Config | None = Field(default_factory=C4Config)
    fineweb: FineWebConfig | None = Field(default_factory=FineWebConfig)
    code_quality: CodeQualityConfig | None = None

    @model_validator(mode="after")
    def _prose_or_code(self) -> RuleSet:
        prose = [name for name in PROSE_CHECKS if getattr(self, name) is not None]
        if self.code_quality is not None and prose:
            raise ValueError(f"a rule set checks prose or code, not both: with code_quality, set {', '.join(prose)} to null")
        return self

    def prose_quality(self) -> ProseQuality:
        return ProseQuality(self.gopher_quality, self.gopher_repetition, self.c4, self.fineweb)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` onto ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_rules(default: RuleSet, overrides: dict[str, dict[str, Any]], code_domains: list[str]) -> dict[str, RuleSet]:
    """The effective rule set of every domain named in ``overrides`` or ``code_domains``.

    Raises ``ValueError`` naming the domain and the field of an override that does not validate.
    """
    base = default.model_dump()
    resolved: dict[str, RuleSet] = {}
    for domain in dict.fromkeys([*code_domains, *overrides]):
        data = deep_merge(base, CODE_PRESET) if domain in code_domains else base
        data = deep_merge(data, overrides.get(domain, {}))
        try:
            resolved[domain] = RuleSet.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"domains.{domain}{''.join(f'.{p}' for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()
            )
            raise ValueError(problems) from None
    return resolved
