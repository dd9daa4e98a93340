"""Apply rule sets to an Arrow batch of documents: score, annotate, and give each a verdict.

Every row gets ``lang``/``lang_score`` (where language ID runs), ``toxicity`` (where toxicity
runs) and ``reason``: null for a kept document, else the first check it failed, in the order
``lang``, ``toxicity``, ``decontamination``, prose quality (``gopher_quality:…``,
``gopher_repetition:…``, ``c4:…``, ``fineweb:…``) or ``code_quality:…``. Cheap checks come
first, so the tokenising quality filters only see documents that survived the rest. A kept
prose document's ``text`` is what the quality filters left (C4 drops lines); every other row's
is unchanged.
"""

from __future__ import annotations

import pyarrow as pa

from tasks.data.filters.code import code_quality_reason
from tasks.data.filters.decontam import EvalIndex
from tasks.data.filters.langid import LanguageIdentifier, lang_reason
from tasks.data.filters.quality import ProseQuality
from tasks.data.filters.rules import RuleSet
from tasks.data.filters.toxicity import toxicity_reason, toxicity_scores

ADDED_FIELDS = [pa.field("lang", pa.string()), pa.field("lang_score", pa.float64()), pa.field("toxicity", pa.float64())]
ADDED_NAMES = {f.name for f in ADDED_FIELDS}
REASON_FIELD = pa.field("reason", pa.string())


def output_schema(upstream: pa.Schema) -> pa.Schema:
    """The upstream columns (minus any earlier annotations of ours) plus ``lang``, ``lang_score``, ``toxicity``."""
    kept = [f for f in upstream if f.name not in ADDED_NAMES | {REASON_FIELD.name}]
    return pa.schema(kept + ADDED_FIELDS, metadata=upstream.metadata)


class DocumentFilter:
    """Holds the loaded models and per-domain rule sets for one worker."""

    def __init__(self, default: RuleSet, by_domain: dict[str, RuleSet], index: EvalIndex | None = None):
        self.default = default
        self.by_domain = by_domain
        self.index = index
        self._langid: LanguageIdentifier | None = None
        self._quality: dict[str | None, ProseQuality] = {}

    def rules(self, domain: str | None) -> RuleSet:
        return self.by_domain.get(domain, self.default) if domain is not None else self.default

    def _identifier(self) -> LanguageIdentifier:
        if self._langid is None:
            self._langid = LanguageIdentifier()
        return self._langid

    def _prose(self, domain: str | None) -> ProseQuality:
        key = domain if domain in self.by_domain else None
        if key not in self._quality:
            self._quality[key] = self.rules(domain).prose_quality()
        return self._quality[key]

    def annotate(self, table: pa.Table) -> pa.Table:
        """``table`` with ``lang``, ``lang_score``, ``toxicity`` and ``reason`` columns (replacing old ones)."""
        texts: list[str] = table.column("text").to_pylist()
        domains: list[str | None] = table.column("domain").to_pylist()
        rules = [self.rules(d) for d in domains]

        langs: list[str | None] = [None] * len(texts)
        scores: list[float | None] = [None] * len(texts)
        for i, (text, rule) in enumerate(zip(texts, rules)):
            if rule.langid is not None:
                langs[i], scores[i] = self._identifier().identify(text, rule.langid.max_chars)

        toxic_rows = [i for i, rule in enumerate(rules) if rule.toxicity is not None]
        toxicity: list[float | None] = [None] * len(texts)
        for i, score in zip(toxic_rows, toxicity_scores([texts[i] for i in toxic_rows])):
            toxicity[i] = float(score)

        verdicts = [
            self._verdict(text, domain, rule, lang, score, toxic)
            for text, domain, rule, lang, score, toxic in zip(texts, domains, rules, langs, scores, toxicity)
        ]
        reasons = [reason for reason, _ in verdicts]
        text_at = table.column_names.index("text")
        out = table.set_column(text_at, table.field(text_at), pa.array([text for _, text in verdicts], type=table.field(text_at).type))
        out = out.drop_columns([name for name in out.column_names if name in ADDED_NAMES | {REASON_FIELD.name}])
        for field, values in zip(ADDED_FIELDS, (langs, scores, toxicity)):
            out = out.append_column(field, pa.array(values, type=field.type))
        return out.append_column(REASON_FIELD, pa.array(reasons, type=pa.string()))

    def _verdict(
        self, text: str, domain: str | None, rule: RuleSet, lang: str | None, score: float | None, toxic: float | None
    ) -> tuple[str | None, str]:
        """(reason or None, the text the row leaves with)."""
        if rule.langid is not None and (why := lang_reason(lang, score, rule.langid)):
            return why, text
        if rule.toxicity is not None and (why := toxicity_reason(toxic, rule.toxicity)):
            return why, text
        if self.index is not None and self.index.contaminated(text):
            return "decontamination", text
        if rule.code_quality is not None:
            return code_quality_reason(text, rule.code_quality), text
        return self._prose(domain).check(text, lang)

