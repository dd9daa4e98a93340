"""A held-out corpus for the curation benchmarks: the operating system's documentation.

The benchmarks' own corpora come from the Python environment (package descriptions, license
files, stdlib docstrings and code), which is also what the demo corpus and the thresholds were
looked at with. This corpus shares none of it: Debian's per-package ``copyright`` files
(license boilerplate, so natural near-duplicates), ``changelog.Debian`` files (maintainer names
and e-mails), package READMEs, and man pages (roff reduced to text; English, and the German,
French, Spanish … translations for the language filter). Nothing is downloaded; what is there
depends on the machine's installed packages, so figures are reported with the corpus size.

    .venv/bin/python benchmarks/heldout_corpus.py OUT_DIR [--max-docs 1500]

writes ``OUT_DIR/{source}.jsonl`` (``id``, ``text``, ``path``), the shape ``ingest`` reads and
every benchmark's ``--corpus OUT_DIR`` takes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DOC_ROOT = Path("/usr/share/doc")
MAN_ROOT = Path("/usr/share/man")
MAX_CHARS = 30_000  # long changelogs and manuals are cut at a paragraph break
MIN_CHARS = 200
ENGLISH_MAN_SECTIONS = ("man1", "man5", "man7", "man8")
# Macros whose arguments are text (section headings, font changes, list tags); the others are layout.
_TEXT_MACROS = {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "IP", "TP", "Nm", "Nd", "Sh", "Ss", "Ar", "Fl"}
_PARAGRAPH_MACROS = {"PP", "P", "LP", "SH", "SS", "TP", "IP", "sp", "Pp"}
_ACCENTS = {":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", ",": "\u0327"}
_NAMED = {"ss": "ß", "Fo": "«", "Fc": "»", "aq": "'", "dq": '"', "em": "—", "en": "–", "hy": "-", "bu": "•", "lq": '"', "rq": '"', "co": "©", "mu": "×"}
_ESCAPE = re.compile(r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[+-]?\d+|\*(?:\(..|\[[^\]]*\]|.)|\((..)|\[([^\]]*)\]|(.))")


def _glyph(name: str) -> str:
    """A groff glyph name as text: ``:u`` -> ü, ``'e`` -> é, ``ss`` -> ß, ``em`` -> —."""
    if len(name) == 2 and name[0] in _ACCENTS:
        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    return _NAMED.get(name, "")


def _unescape(match: re.Match[str]) -> str:
    named = match.group(1) or match.group(2)
    if named is not None:
        return _glyph(named)
    char = match.group(3)
    return {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", ".": ".", "'": "'", "`": "`"}.get(char or "", "")


def roff_text(source: str) -> str:
    """Readable text of a man page's roff source: text macros kept, layout and escapes dropped."""
    out: list[str] = []
    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"')) or line.strip() in {".", "'"}:
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].lstrip().partition(" ")
            if macro in _PARAGRAPH_MACROS:
                out.append("")
            if macro not in _TEXT_MACROS:
                continue
            line = rest.replace('"', "")
        out.append(_ESCAPE.sub(_unescape, line).strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def _cut(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return text
    head = text[:MAX_CHARS]
    return head[: head.rfind("\n\n")] if "\n\n" in head else head


def _documents(paths: list[Path], convert: Callable[[str], str] = str) -> Iterator[dict[str, Any]]:
    """One document per distinct real file (symlinked package folders share files), in path order."""
    seen: set[Path] = set()
    for path in sorted(paths):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        try:
            text = _cut(convert(_read(path)).strip())
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        if len(text) >= MIN_CHARS:
            yield {"id": str(path), "text": text, "path": str(path)}


def _spread(paths: list[Path]) -> list[Path]:
    """Paths in an order set by a hash of the path: a sample across packages, not the first letters."""
    return sorted(paths, key=lambda p: hashlib.sha1(str(p).encode()).hexdigest())


SOURCES: dict[str, Callable[[], Iterator[dict[str, Any]]]] = {
    "copyright": lambda: _documents(list(DOC_ROOT.glob("*/copyright"))),
    "changelog": lambda: _documents(list(DOC_ROOT.glob("*/changelog.Debian.gz"))),
    "readme": lambda: _documents([p for p in DOC_ROOT.glob("*/README*") if p.suffix in {"", ".gz", ".md", ".txt", ".Debian"}]),
    "man": lambda: _documents(_spread([p for s in ENGLISH_MAN_SECTIONS for p in (MAN_ROOT / s).glob("*.gz")]), roff_text),
    "man_translated": lambda: _documents(
        _spread([p for p in MAN_ROOT.glob("*/man*/*.gz") if p.parts[-3] not in {"man", *ENGLISH_MAN_SECTIONS}]), roff_text
    ),
}


def write_heldout_corpus(out_dir: Path, max_docs: int) -> dict[str, int]:
    """Write ``{source}.jsonl`` (at most ``max_docs`` documents each); return documents per source."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, documents in SOURCES.items():
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8", errors="replace") as out:
            n = 0
            for n, document in enumerate(documents(), 1):
                out.write(json.dumps(document, ensure_ascii=False) + "\n")
                if n >= max_docs:
                    break
        counts[name] = n
    return counts


# ---------------------------------------------------------------------------------- reading


def read_sources(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """``folder``'s ``*.jsonl`` files (this script's output, or the demo corpus), by file stem."""
    sources = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        with path.open(encoding="utf-8") as lines:
            sources[path.stem] = [json.loads(line) for line in lines if line.strip()]
    return sources


def sample_sources(sources: dict[str, list[dict[str, Any]]], limit: int | None) -> dict[str, list[dict[str, Any]]]:
    """At most ``limit`` documents in all, every source cut in proportion to its size."""
    total = sum(len(docs) for docs in sources.values())
    if limit is None or total <= limit:
        return sources
    return {name: docs[: len(docs) * limit // total] for name, docs in sources.items()}


def read_texts(folder: Path, limit: int | None) -> list[str]:
    """The texts of ``folder``'s sources, a proportional sample of ``limit``, sources interleaved."""
    sampled = list(sample_sources(read_sources(folder), limit).values())
    longest = max((len(docs) for docs in sampled), default=0)
    return [docs[i]["text"] for i in range(longest) for docs in sampled if i < len(docs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-docs", type=int, default=1500, help="documents per source at most")
    args = parser.parse_args()
    counts = write_heldout_corpus(args.out_dir, args.max_docs)
    print(json.dumps(counts), f"-> {args.out_dir}")


if __name__ == "__main__":
    main()
