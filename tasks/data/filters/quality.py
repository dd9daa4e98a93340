"""Prose quality: datatrove's Gopher quality, Gopher repetition, C4 and FineWeb filters.

The filters are datatrove's own classes, called one document at a time through their
``filter(doc)`` method (no datatrove executor). Their word and sentence splitting goes through
datatrove's tokenizer table, which for English, German, Spanish, Italian and most other
languages is ``spacy.blank(lang)``: rule-based, shipped inside spaCy, nothing to download.
The stage hands the filters that tokenizer wrapped so each whitespace-separated chunk is
tokenized once per worker (``words.py``): the same words, about twice as fast.
The config fields carry datatrove's parameter names and defaults, so its documentation applies.

C4's filter is also a line cleaner: it drops the lines it objects to (no terminal
punctuation, too few words, "javascript", policy boilerplate, citation marks) and keeps the
document if enough sentences remain. As in a datatrove pipeline, the filters after it judge
the lines it kept, and a kept document leaves the stage as C4 left it; a removed one goes to
``rejected/`` as it came in.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FALLBACK_LANGUAGE = "en"

# Gopher's English list, and the most frequent function words for the other default languages.
DEFAULT_STOP_WORDS: dict[str, list[str]] = {
    "en": ["the", "be", "to", "of", "and", "that", "have", "with"],
    "de": ["der", "die", "und", "in", "den", "von", "zu", "das", "mit", "ist"],
    "es": ["de", "la", "que", "el", "en", "y", "los", "se"],
    "it": ["di", "e", "il", "la", "che", "in", "un", "per"],
    "fr": ["de", "la", "le", "et", "les", "des", "en", "un"],
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def make(self, lang: str, words: Any = None) -> Any:
        """The datatrove filter these settings describe, for text in ``lang``, splitting words with
        ``words`` (a datatrove ``WordTokenizer``) or, by default, datatrove's tokenizer for ``lang``."""
        raise NotImplementedError


class GopherQualityConfig(_Section):
    """Gopher (Rae et al. 2021) document heuristics; ``None`` switches one check off."""

    min_doc_words: int | None = Field(50, ge=0)
    max_doc_words: int | None = Field(100_000, ge=1)
    min_avg_word_length: int | None = Field(3, ge=0)
    max_avg_word_length: int | None = Field(10, ge=1)
    max_symbol_word_ratio: float | None = Field(0.1, ge=0, description="'#' or ellipses per word")
    max_bullet_lines_ratio: float | None = Field(0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: float | None = Field(0.3, ge=0, le=1)
    max_non_alpha_words_ratio: float | None = Field(
        0.8, ge=0, le=1, description="minimum share of words with a letter (datatrove's name)"
    )
    min_stop_words: int | None = Field(2, ge=0, description="minimum distinct stop words present")
    stop_words: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_STOP_WORDS.items()},
        description="stop words per language; languages not listed skip the stop-word check",
    )

    def make(self, lang: str, words: Any = None) -> Any:
        from datatrove.pipeline.filters import GopherQualityFilter

        kwargs = self.model_dump(exclude={"stop_words"})
        if lang in self.stop_words:
            kwargs["stop_words"] = self.stop_words[lang]
        else:
            kwargs["min_stop_words"] = None
        return GopherQualityFilter(language=words or lang, **kwargs)


class GopherRepetitionConfig(_Section):
    """Gopher repetition heuristics: duplicated lines, paragraphs and n-grams."""

    dup_line_frac: float | None = Field(0.3, ge=0, le=1)
    dup_para_frac: float | None = Field(0.3, ge=0, le=1)
    dup_line_char_frac: float | None = Field(0.2, ge=0, le=1)
    dup_para_char_frac: float | None = Field(0.2, ge=0, le=1)
    top_n_grams: list[tuple[int, float]] = Field([(2, 0.2), (3, 0.18), (4, 0.16)], description="(n, max char share of the top n-gram)")
    dup_n_grams: list[tuple[int, float]] = Field(
        [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)],
        description="(n, max char share of duplicated n-grams)",
    )

    def make(self, lang: str, words: Any = None) -> Any:
        from datatrove.pipeline.filters import GopherRepetitionFilter

        kwargs = self.model_dump()
        kwargs["top_n_grams"] = tuple(tuple(x) for x in self.top_n_grams)
        kwargs["dup_n_grams"] = tuple(tuple(x) for x in self.dup_n_grams)
        return GopherRepetitionFilter(language=words or lang, **kwargs)


class C4Config(_Section):
    """C4 (Raffel et al. 2020) rules: line removal, then a document-level keep/drop decision."""

    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = Field(5, ge=-1, description="-1 disables")
    min_words_per_line: int = Field(3, ge=-1, description="-1 disables")
    max_word_length: int = Field(1000, ge=-1, description="-1 disables")
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True

    def make(self, lang: str, words: Any = None) -> Any:
        from datatrove.pipeline.filters import C4QualityFilter

        return C4QualityFilter(language=words or lang, **self.model_dump())


class FineWebConfig(_Section):
    """FineWeb's extra line-level heuristics."""

    line_punct_thr: float = Field(0.12, ge=0, le=1, description="min share of lines ending in punctuation")
    line_punct_exclude_zero: bool = False
    short_line_thr: float = Field(0.67, ge=0, le=1, description="max share of short lines")
    short_line_length: int = Field(30, ge=1)
    char_duplicates_ratio: float = Field(0.01, ge=0, le=1, description="max share of characters in duplicated lines")
    new_line_ratio: float = Field(0.3, ge=0, description="max newlines per word")

    def make(self, lang: str, words: Any = None) -> Any:
        from datatrove.pipeline.filters import FineWebQualityFilter

        return FineWebQualityFilter(language=words or lang, **self.model_dump())


@lru_cache(maxsize=None)
def tokenizer_language(lang: str | None) -> str:
    """``lang`` when datatrove has a word tokenizer for it, else English's."""
    from datatrove.utils.word_tokenizers import load_tokenizer_assignments

    return lang if lang and lang in load_tokenizer_assignments() else FALLBACK_LANGUAGE


@lru_cache(maxsize=1)
def _word_character() -> re.Pattern[str]:
    """A character outside datatrove's punctuation set: what makes a token a word to Gopher."""
    from datatrove.utils.text import PUNCTUATION_SET

    return re.compile("[^" + "".join(re.escape(ch) for ch in sorted(PUNCTUATION_SET)) + "]")


def exceeds_word_count(text: str, limit: int) -> bool:
    """True when ``text`` certainly has more than ``limit`` words for Gopher's ``max_doc_words``.

    Gopher counts the tokens holding a character outside datatrove's punctuation set, and no
    tokenizer joins across whitespace, so every whitespace-separated chunk holding such a
    character is at least one such word: past ``limit`` chunks, Gopher's verdict is
    ``gopher_long_doc`` whatever the tokenizer says. Counting chunks takes a second on a 20 MB
    document, where spaCy tokenizing it takes minutes and holds every token in memory.
    """
    if len(text) <= 2 * limit:  # each counted chunk takes a character and a separator
        return False
    return sum(map(bool, map(_word_character().search, text.split()))) > limit


class ProseQuality:
    """The configured datatrove filters, instantiated per document language on first use."""

    def __init__(
        self,
        gopher_quality: GopherQualityConfig | None = None,
        gopher_repetition: GopherRepetitionConfig | None = None,
        c4: C4Config | None = None,
        fineweb: FineWebConfig | None = None,
    ):
        self.sections = {"gopher_quality": gopher_quality, "gopher_repetition": gopher_repetition, "c4": c4, "fineweb": fineweb}
        self._filters: dict[str, list[tuple[str, Any]]] = {}

    @property
    def enabled(self) -> bool:
        return any(s is not None for s in self.sections.values())

    def _build(self, lang: str) -> list[tuple[str, Any]]:
        from tasks.data.filters.words import cached_words

        words = cached_words(lang)
        return [(family, section.make(lang, words)) for family, section in self.sections.items() if section is not None]

    def check(self, text: str, lang: str | None) -> tuple[str | None, str]:
        """(``family:datatrove reason`` of the first filter that drops ``text`` or None, the text
        the filters leave): a kept document's text without the lines C4 dropped, else ``text``."""
        from datatrove.data import Document
        from datatrove.pipeline.filters.base_filter import get_filter_result

        gopher = self.sections["gopher_quality"]
        if gopher is not None and gopher.max_doc_words and exceeds_word_count(text, gopher.max_doc_words):
            return "gopher_quality:gopher_long_doc", text
        language = tokenizer_language(lang)
        if language not in self._filters:
            self._filters[language] = self._build(language)
        doc = Document(text=text, id="")
        for family, check in self._filters[language]:
            try:
                keep, why = get_filter_result(check.filter(doc))
            except ZeroDivisionError:  # datatrove divides by the word count: a text with no words
                keep, why = False, "no_words"
            if not keep:
                return f"{family}:{why or 'dropped'}", text
        return None, doc.text
