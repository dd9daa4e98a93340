"""A demo corpus from text every Crucible install already has: nothing is downloaded.

Four JSONL sources, one per domain, in the shape ``ingest`` reads (``id``, ``text``, ``url``
and metadata fields):

- ``web.jsonl``: installed packages' project pages (their metadata's long description under a
  header with name, summary, author and contact e-mail): prose in many authors' voices, with
  real e-mail addresses for the ``pii`` stage to find.
- ``legal.jsonl``: the packages' license files: many MIT/BSD/Apache texts that differ only in
  the copyright line, i.e. natural near-duplicates for ``dedup``.
- ``code.jsonl``: Python standard-library modules (tests left out, mid-sized files only).
- ``docs.jsonl``: Python's bundled documentation topics (``pydoc_data.topics``).

Output is deterministic for a given environment: sources are sorted, ids come from package
names and paths, and samples are chosen by a hash of the path, not by chance.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata as metadata
import json
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

# Per-domain document caps when the caller gives none: about 1,500 documents and 10 MB in a
# typical environment, which the demo pipeline gets through in minutes on two cores.
DEFAULT_MAX_DOCS = {"web": 500, "legal": 800, "code": 600, "docs": 200}
WEB_MAX_CHARS = 20_000  # long changelogs are cut at a paragraph break
LEGAL_MAX_CHARS = 50_000
CODE_CHARS = (500, 30_000)  # stdlib modules outside this size range are left out
LICENSE_FILES_PER_PACKAGE = 4
_LICENSE_NAME = re.compile(r"(?i)^(?:licen[cs]e|copying|notice)")
_LICENSE_WORD = re.compile(r"(?i)licen[cs]e|copying|notice")
_DIST_INFO = re.compile(r"^[^/]+\.dist-info/")  # ids outlive version bumps
_CODE_SKIP = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distributions() -> list[tuple[metadata.Distribution, Any]]:
    """Installed distributions with their parsed metadata (``dist.metadata`` re-parses on every
    access), one per canonical name (the first on the path), sorted by name."""
    chosen: dict[str, tuple[metadata.Distribution, Any]] = {}
    for dist in metadata.distributions():
        meta = dist.metadata
        if meta["Name"] and _canonical(meta["Name"]) not in chosen:
            chosen[_canonical(meta["Name"])] = (dist, meta)
    return [chosen[name] for name in sorted(chosen)]


def _cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters at the last paragraph break before it."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    return head[: head.rfind("\n\n")] if "\n\n" in head else head


def _project_url(meta: Any) -> str | None:
    if meta.get("Home-page") and meta["Home-page"] != "UNKNOWN":
        return meta["Home-page"]
    for entry in meta.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if url.strip() and label.strip().lower() in {"homepage", "home", "source", "repository", "documentation"}:
            return url.strip()
    return None


def web_documents() -> Iterator[dict[str, Any]]:
    for _dist, meta in _distributions():
        body = (meta.get("Description") or "").strip()
        if not body or body == "UNKNOWN":
            continue
        name = meta["Name"]
        header = [f"{name} {meta.get('Version', '')}".strip() + (f": {meta['Summary']}" if meta.get("Summary") else "")]
        for role in ("Author", "Maintainer"):
            who = ", ".join(v for v in (meta.get(role), meta.get(f"{role}-email")) if v and v != "UNKNOWN")
            if who:
                header.append(f"{role}: {who}")
        yield {
            "id": _canonical(name),
            "text": _cut("\n".join(header) + "\n\n" + body, WEB_MAX_CHARS),
            "url": _project_url(meta),
            "package": name,
            "version": meta.get("Version"),
            "content_type": meta.get("Description-Content-Type"),
        }


def _license_paths(dist: metadata.Distribution) -> list[str]:
    """License-like files the distribution installed, from its RECORD (read as text: parsing
    every entry through ``dist.files`` takes seconds for the large wheels)."""
    record = dist.read_text("RECORD")
    if record is None:
        paths = [str(f) for f in dist.files or ()]
    else:
        candidates = [line for line in record.splitlines() if _LICENSE_WORD.search(line)]
        paths = [row[0] for row in csv.reader(candidates) if row]
    return sorted(p for p in paths if _LICENSE_NAME.match(PurePosixPath(p).name))


def legal_documents() -> Iterator[dict[str, Any]]:
    for dist, meta in _distributions():
        name = _canonical(meta["Name"])
        short = (meta.get("License-Expression") or meta.get("License") or "").strip().split("\n")[0][:100]
        ids: set[str] = set()
        for path in _license_paths(dist)[:LICENSE_FILES_PER_PACKAGE]:
            try:
                text = dist.locate_file(path).read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                continue
            doc_id = f"{name}/{_DIST_INFO.sub('', path)}"
            doc_id = doc_id if doc_id not in ids else f"{name}/{path}"
            if text:
                ids.add(doc_id)
                yield {"id": doc_id, "text": _cut(text, LEGAL_MAX_CHARS), "path": path, "package": meta["Name"], "license": short or None}


def code_documents() -> Iterator[dict[str, Any]]:
    """Standard-library modules in an order set by a hash of their path: a spread of packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in root.rglob("*.py") if not _CODE_SKIP & set(p.relative_to(root).parts)]
    low, high = CODE_CHARS
    for path in sorted(paths, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest()):
        text = path.read_text(encoding="utf-8", errors="replace")
        if low <= len(text) <= high:
            rel = path.relative_to(root).as_posix()
            yield {"id": rel, "text": text, "path": rel, "language": "python"}


def docs_documents() -> Iterator[dict[str, Any]]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        if topics[key].strip():
            yield {"id": key, "text": topics[key].strip(), "topic": key}


DOMAINS = {"web": web_documents, "legal": legal_documents, "code": code_documents, "docs": docs_documents}


def write_demo_corpus(out_dir: Path, max_docs_per_domain: int | None = None) -> dict[str, Path]:
    """Write ``{domain}.jsonl`` for each domain into ``out_dir``; return domain -> file.

    ``max_docs_per_domain`` caps every domain at that many documents; ``None`` uses
    ``DEFAULT_MAX_DOCS``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for domain, documents in DOMAINS.items():
        limit = DEFAULT_MAX_DOCS[domain] if max_docs_per_domain is None else max_docs_per_domain
        path = out_dir / f"{domain}.jsonl"
        tmp = path.with_name(path.name + ".partial")
        with tmp.open("w", encoding="utf-8", errors="replace") as out:  # a stray surrogate never fails the write
            for n, document in enumerate(documents()):
                if n >= limit:
                    break
                out.write(json.dumps(document, ensure_ascii=False) + "\n")
        tmp.replace(path)
        written[domain] = path
    return written
