"""Word tokenization for datatrove's quality filters, with the words of each chunk remembered.

datatrove tokenizes English (and most languages) with ``spacy.blank(lang)`` inside a spaCy
*memory zone*, which frees every word the tokenizer learned as soon as the call returns: memory
stays flat, but each document pays again for every word spaCy does not ship with (about 85% of
the quality filters' time on web prose). spaCy's tokenizer never joins across whitespace and
splits each whitespace-separated chunk on its own, so a document's words are the concatenation
of its chunks' words: ``CachedWordTokenizer`` tokenizes each chunk once and keeps its words in a
bounded table (chunks up to 100 characters; cleared when full), and the filters see exactly
the words datatrove would give them (``tests/test_filter.py`` checks it against datatrove's own
tokenizer).

The filters take the tokenizer in place of a language code (datatrove's ``load_word_tokenizer``
accepts a ``WordTokenizer``). Sentence splitting, which does look across chunks, goes to
datatrove's tokenizer unchanged.
"""

from __future__ import annotations

import re
from functools import lru_cache

from datatrove.utils.word_tokenizers import SpaCyTokenizer, WordTokenizer, load_word_tokenizer

CHUNK = re.compile(r"\S+")
MAX_CHUNKS = 100_000  # remembered chunks per process: a few tens of MB at most
MAX_CHUNK_CHARS = 100  # longer chunks (URLs, base64, minified code) are rarely seen twice


class CachedWordTokenizer(WordTokenizer):
    """datatrove's spaCy tokenizer for one language, remembering the words of each chunk."""

    def __init__(self, inner: SpaCyTokenizer, max_chunks: int = MAX_CHUNKS):
        super().__init__(inner.language)
        self.inner = inner
        self.max_chunks = max_chunks
        self._words: dict[str, tuple[str, ...]] = {}

    def word_tokenize(self, text: str) -> list[str]:
        chunks = CHUNK.findall(text)
        known = self._words
        fresh: dict[str, tuple[str, ...]] = {}
        new = [c for c in dict.fromkeys(chunks) if c not in known]
        if new:
            nlp = self.inner.tokenizer
            try:
                with nlp.memory_zone():
                    for chunk in new:
                        fresh[chunk] = tuple(w for w in (t.text.strip() for t in nlp.tokenizer(chunk)) if w)
            except Exception:  # spaCy chokes on a few strings; datatrove's own path handles them
                return self.inner.word_tokenize(text)
        words = [word for chunk in chunks for word in (fresh[chunk] if chunk in fresh else known[chunk])]
        remembered = [(c, w) for c, w in fresh.items() if len(c) <= MAX_CHUNK_CHARS][: self.max_chunks]
        if len(known) + len(remembered) > self.max_chunks:
            known.clear()
        known.update(remembered)
        return words

    def sent_tokenize(self, text: str) -> list[str]:
        return self.inner.sent_tokenize(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return self.inner.span_tokenize(text)


@lru_cache(maxsize=None)
def cached_words(lang: str) -> CachedWordTokenizer | None:
    """A ``CachedWordTokenizer`` (one per process, shared by every filter) where datatrove tokenizes
    ``lang`` with spaCy's rule-based tokenizer, else None: datatrove's own tokenizer (NLTK's, and
    the segmenters spaCy uses for Japanese, Vietnamese, Thai … read across whitespace)."""
    from spacy.tokenizer import Tokenizer

    inner = load_word_tokenizer(lang)
    plain = type(inner) is SpaCyTokenizer and type(inner.tokenizer.tokenizer) is Tokenizer
    return CachedWordTokenizer(inner) if plain else None
