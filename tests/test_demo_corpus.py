"""The demo corpus: four domains from the local install, unique ids, deterministic, PII and near-duplicates in it."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from tasks.data.demo_corpus import DEFAULT_MAX_DOCS, write_demo_corpus

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    paths = write_demo_corpus(tmp_path_factory.mktemp("demo"))
    return paths, {domain: [json.loads(line) for line in path.read_text().splitlines()] for domain, path in paths.items()}


def test_every_domain_is_written_with_ingestable_rows(corpus):
    paths, docs = corpus
    assert set(paths) == {"web", "legal", "code", "docs"}
    for domain, rows in docs.items():
        assert paths[domain].name == f"{domain}.jsonl"
        assert 10 <= len(rows) <= DEFAULT_MAX_DOCS[domain], domain
        assert all(isinstance(r["id"], str) and isinstance(r["text"], str) and r["text"].strip() for r in rows)
    assert all(r["id"].endswith(".py") and r["language"] == "python" for r in docs["code"])
    assert any(r["id"] == "assert" and "assert_stmt" in r["text"] for r in docs["docs"])
    assert sum(r["url"] is not None for r in docs["web"]) > len(docs["web"]) / 2


def test_ids_are_unique_within_each_domain(corpus):
    _, docs = corpus
    for domain, rows in docs.items():
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)), domain


def test_output_is_identical_across_calls(corpus, tmp_path):
    paths, _ = corpus
    again = write_demo_corpus(tmp_path)
    assert {d: p.read_bytes() for d, p in again.items()} == {d: p.read_bytes() for d, p in paths.items()}


def test_cap_applies_to_every_domain(tmp_path):
    paths = write_demo_corpus(tmp_path, max_docs_per_domain=3)
    assert {d: len(p.read_text().splitlines()) for d, p in paths.items()} == {"web": 3, "legal": 3, "code": 3, "docs": 3}


def test_web_pages_carry_real_email_addresses(corpus):
    _, docs = corpus
    with_email = [r for r in docs["web"] if EMAIL.search(r["text"])]
    assert len(with_email) >= len(docs["web"]) / 2


def _shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_licenses_hold_near_duplicates(corpus):
    _, docs = corpus
    small = [(r["id"], r["text"], _shingles(r["text"])) for r in docs["legal"] if len(r["text"]) < 4000]
    near = [
        (a, b)
        for (a, ta, sa), (b, tb, sb) in itertools.combinations(small, 2)
        if ta != tb and sa and sb and len(sa & sb) / len(sa | sb) >= 0.8
    ]
    assert len(near) >= 10  # e.g. MIT texts that differ only in the copyright line
