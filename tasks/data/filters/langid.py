"""Language identification with py3langid: a naive Bayes byte n-gram model shipped in its wheel.

The model covers 97 languages and loads from the package itself, so nothing is downloaded at
run time. Scores are the model's normalised probabilities (length-calibrated), so one
threshold works for short and long documents alike. Only the start of a document is scored:
a few sentences decide the language and the cost stays bounded on very long documents.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class LangIdConfig(BaseModel):
    """Keep documents whose detected language is one of ``languages`` with a high enough score."""

    model_config = ConfigDict(extra="forbid")

    languages: list[str] = Field(["en"], min_length=1, description="ISO 639-1 codes to keep, e.g. [en, de]")
    min_score: float = Field(0.5, ge=0.0, le=1.0, description="drop documents whose language probability is below this")
    max_chars: int = Field(2000, ge=100, description="characters scored from the start of each document")

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, languages: list[str]) -> list[str]:
        known = set(LanguageIdentifier.supported())
        unknown = sorted(set(languages) - known)
        if unknown:
            raise ValueError(f"py3langid does not know {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return languages


class LanguageIdentifier:
    """Loads py3langid's bundled model once; ``identify`` returns (language, probability)."""

    _labels: list[str] | None = None

    def __init__(self) -> None:
        from py3langid.langid import MODEL_FILE
        from py3langid.langid import LanguageIdentifier as _Model

        self._model = _Model.from_model_file(MODEL_FILE, norm_probs=True)

    @classmethod
    def supported(cls) -> list[str]:
        """Language codes the bundled model knows (loaded once per process)."""
        if cls._labels is None:
            cls._labels = cls().labels
        return cls._labels

    @property
    def labels(self) -> list[str]:
        return list(self._model.labels)

    def identify(self, text: str, max_chars: int = 2000) -> tuple[str, float]:
        lang, score = self._model.classify(text[:max_chars])
        return lang, float(score)


def lang_reason(lang: str, score: float, cfg: LangIdConfig) -> str | None:
    """``lang`` when the document is not in a kept language with enough confidence."""
    if lang not in cfg.languages or score < cfg.min_score:
        return "lang"
    return None
