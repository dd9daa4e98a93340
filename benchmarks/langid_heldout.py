"""Language ID accuracy on held-out passages: English, German, Spanish and Italian man pages.

The ``filter`` stage's language ID (py3langid's bundled model, ``tasks/data/filters/langid.py``)
was never tuned on these texts: the passages are paragraphs of the operating system's manual
pages (``/usr/share/man`` and its ``de``/``es``/``it`` translations), reduced to text as in
``heldout_corpus.py``. A passage is one distinct paragraph of two to six sentences that reads
as prose (mostly letters, few option flags, no addresses). Translations leave some paragraphs
in English; a translated paragraph that shares a third of its word 3-grams with the English
page of the same name is left out, since its true language is not the folder's.

Prints, per language, the passages scored, the share identified correctly, the share that the
default rule would keep (right language and score >= ``--min-score``), and the mistakes.

    .venv/bin/python benchmarks/langid_heldout.py [--per-language 300] [--min-score 0.5]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from heldout_corpus import ENGLISH_MAN_SECTIONS, MAN_ROOT, _read, _spread, roff_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.data.filters.langid import LanguageIdentifier  # noqa: E402

LANGUAGES = ("en", "de", "es", "it")
SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
PER_PAGE = 3  # passages from one page at most: a spread over many authors and translators


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return set(zip(words, words[1:], words[2:]))


def is_prose(paragraph: str) -> bool:
    """Two to six sentences, 150+ characters, mostly letters, hardly any ``-flags``, no addresses
    (translators' credits are lists of names and e-mails, not prose)."""
    words = paragraph.split()
    if len(paragraph) < 150 or "@" in paragraph or "://" in paragraph or not 2 <= len(SENTENCE_END.findall(paragraph)) <= 6:
        return False
    letters = sum(c.isalpha() for c in paragraph)
    flags = sum(w.startswith("-") for w in words)
    return letters >= 0.75 * sum(not c.isspace() for c in paragraph) and flags <= 0.05 * len(words)


def _pages(lang: str) -> list[Path]:
    if lang == "en":
        return _spread([p for s in ENGLISH_MAN_SECTIONS for p in (MAN_ROOT / s).glob("*.gz")])
    return _spread(list((MAN_ROOT / lang).glob("man*/*.gz")))


def passages(lang: str, limit: int) -> Iterator[str]:
    """Up to ``limit`` prose paragraphs of ``lang`` man pages, untranslated paragraphs left out."""
    count, seen = 0, set()
    for page in _pages(lang):
        try:
            text = roff_text(_read(page))
        except (OSError, EOFError):
            continue
        english = MAN_ROOT / page.parts[-2] / page.name
        english_grams = _trigrams(roff_text(_read(english))) if lang != "en" and english.exists() else set()
        taken = 0
        for paragraph in re.split(r"\n\s*\n", text):
            paragraph = " ".join(paragraph.split())
            if paragraph in seen or not is_prose(paragraph):
                continue
            seen.add(paragraph)
            grams = _trigrams(paragraph)
            if english_grams and len(grams & english_grams) >= len(grams) / 3:
                continue
            yield paragraph
            count, taken = count + 1, taken + 1
            if count >= limit:
                return
            if taken >= PER_PAGE:
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-language", type=int, default=300)
    parser.add_argument("--min-score", type=float, default=0.5, help="the filter's threshold (LangIdConfig.min_score)")
    parser.add_argument("--show", type=int, default=3, help="mistakes printed per language")
    args = parser.parse_args()

    identifier = LanguageIdentifier()
    total = correct_total = kept_total = 0
    print(f"{'lang':<5} {'passages':>8} {'accuracy':>9} {'kept@' + str(args.min_score):>9}  confused with")
    mistakes: dict[str, list[tuple[str, float, str]]] = {}
    for lang in LANGUAGES:
        verdicts = [(identifier.identify(p), p) for p in passages(lang, args.per_language)]
        if not verdicts:
            print(f"{lang:<5} {0:>8}  (no man pages in this language on this machine)")
            continue
        correct = sum(found == lang for (found, _), _ in verdicts)
        kept = sum(found == lang and score >= args.min_score for (found, score), _ in verdicts)
        confused = Counter(found for (found, _), _ in verdicts if found != lang)
        mistakes[lang] = [(found, score, p) for (found, score), p in verdicts if found != lang][: args.show]
        print(f"{lang:<5} {len(verdicts):>8} {correct / len(verdicts):>9.3f} {kept / len(verdicts):>9.3f}  "
              f"{', '.join(f'{k} {v}' for k, v in confused.most_common(4)) or '-'}")
        total, correct_total, kept_total = total + len(verdicts), correct_total + correct, kept_total + kept
    if total:
        print(f"{'all':<5} {total:>8} {correct_total / total:>9.3f} {kept_total / total:>9.3f}")
    for lang, items in mistakes.items():
        for found, score, text in items:
            print(f"\n[{lang} read as {found} {score:.2f}] {text[:300]}")


if __name__ == "__main__":
    main()
