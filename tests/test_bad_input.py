"""Bad input through the whole curation chain (ingest -> filter -> dedup -> pii).

Binary files, empty documents, broken web pages and 20 MB documents must each end where they
belong: quarantined and counted at ingest, or removed by ``filter`` for the right reason, or
carried through every stage intact; never a crashed or stalled stage.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_filter import GOOD_EN
from test_ingest import ARTICLE, assert_main_text, web_page

from tasks.config import validate_config
from tasks.engine import run_pipeline

BIG_CHARS = 20_000_000
# A big web page is 4 MB: main-text extraction grows faster than linearly with a page's size
# (some 2 s for 2 MB, minutes for 20 MB on 2 cores), and 4 MB already makes gopher_long_doc fire.
BIG_PAGE_CHARS = 4_000_000
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00"
BINARY_ROW = b'{"id": "binary", "text": "'
MARKET = [  # a web page's prose, unlike the rows' so that dedup keeps both, long enough for filter
    "The covered market in the old town opens at seven every morning, except on public holidays and during the two weeks of the summer festival.",
    "Farmers from the surrounding villages sell vegetables, cheese, honey and fresh bread from long wooden tables near the entrance.",
    "Most of the families have kept the same places for generations, and regular customers know them all by name.",
    "In the afternoon the stalls are cleared away and the hall is used for concerts, dances and meetings of the town council.",
    "On the first Sunday of every month there is also a book fair, which draws visitors from the whole region.",
]


def big_prose() -> str:
    """20 MB of English prose: a web page no one should train on whole."""
    return " ".join([GOOD_EN] * (BIG_CHARS // len(GOOD_EN) + 1))


def big_code() -> str:
    """20 MB of ordinary source lines: a large but legitimate code file."""
    line = "    total = combine(total, values[index])  # keep a running total of the values\n"
    return "def accumulate(values):\n    total = None\n" + line * (BIG_CHARS // len(line) + 1) + "    return total\n"


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("bad-input")
    rows = [
        json.dumps({"id": "good", "text": GOOD_EN}).encode(),
        json.dumps({"id": "empty", "text": ""}).encode(),
        json.dumps({"id": "blank", "text": " \n\t "}).encode(),
        json.dumps({"id": "null", "text": None}).encode(),
        BINARY_ROW + PNG + b'"}',
        json.dumps({"id": "binary-as-text", "text": PNG.decode("latin-1") * 50}).encode(),
        json.dumps({"id": "huge", "text": big_prose()}).encode(),
    ]
    (root / "web.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    code = root / "code"
    code.mkdir()
    (code / "logo.py").write_bytes(PNG)  # a binary file with a source extension
    (code / "empty.py").write_text("")
    (code / "huge.py").write_text(big_code())
    pages = root / "pages"
    pages.mkdir()
    for name, page in broken_pages().items():
        (pages / name).write_bytes(page)
    config = validate_config({
        "name": "bad-input",
        "store": str(root / "store"),
        "ingest": {"sources": [
            {"name": "web", "path": str(root / "web.jsonl"), "domain": "web", "id_field": "id"},
            {"name": "code", "path": str(code / "*.py"), "format": "text", "domain": "code"},
            {"name": "pages", "path": str(pages / "*.html"), "format": "html", "domain": "web"},
        ]},
        "filter": {"default": {"langid": {"languages": ["en"]}}, "num_workers": 1},
        "dedup": {},
        "pii": {},
    }, "test")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CRUCIBLE_HOME", str(root / "home"))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        return {o.stage: o.manifest for o in run_pipeline(config, until_stage="pii")}


def broken_pages() -> dict[str, bytes]:
    """Web pages as crawls deliver them: unclosed tags, cut short, not HTML at all, or 4 MB."""
    article = web_page(ARTICLE).encode()
    return {
        "unclosed.html": b"<html><body><div><p>" + "<p>".join(MARKET).encode(),  # no closing tag at all
        "truncated.html": article[: article.index(ARTICLE[2].encode()) + 40],  # cut mid-paragraph
        "garbage.html": PNG * 40,
        "noise.html": bytes(range(128, 256)) * 8,  # no NUL, no markup: undecodable noise
        "empty.html": b"",
        "huge.html": web_page(ARTICLE * (BIG_PAGE_CHARS // len(" ".join(ARTICLE)) + 1)).encode(),
    }


def read(manifest, folder: str, columns: list[str] | None = None) -> pa.Table:
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in manifest.file_paths(folder)])


@pytest.mark.slow
def test_unusable_rows_are_quarantined_and_counted(outcomes):
    ingest = outcomes["ingest"]
    bad = {(r["file"], r["line"]): r["error"] for r in read(ingest, "quarantine").to_pylist()}
    assert bad == {
        ("web.jsonl", 2): "empty text field 'text'",
        ("web.jsonl", 3): "empty text field 'text'",
        ("web.jsonl", 4): "missing text field 'text'",
        ("web.jsonl", 5): f"invalid UTF-8 at byte {len(BINARY_ROW)}",
        ("web.jsonl", 6): "malformed JSON: Expecting value (column 1)",  # the PNG's own newline bytes
        ("web.jsonl", 7): "malformed JSON: Expecting value (column 1)",  # cut its row into three lines
        ("logo.py", 1): "invalid UTF-8 at byte 0",
        ("empty.py", 1): "empty text field 'text'",
        ("garbage.html", 1): "binary content (NUL bytes), not an HTML page",
        ("noise.html", 1): "not an HTML page: no document tree could be parsed",
        ("empty.html", 1): "empty page",
    }
    assert ingest.counts["quarantined"] == 11 and ingest.counts["quarantined.web"] == 6 and ingest.counts["quarantined.pages"] == 3
    assert ingest.rows == 7  # good, binary-as-text, huge prose, huge code; the unclosed, truncated and huge pages


@pytest.mark.slow
def test_broken_pages_keep_the_text_they_have(outcomes):
    docs = read(outcomes["ingest"], "documents", ["id", "text"])
    texts = {i: t for i, t in zip(docs["id"].to_pylist(), docs["text"].to_pylist()) if i.startswith("pages/")}
    assert texts["pages/unclosed.html"] == "\n".join(MARKET)
    assert texts["pages/truncated.html"] == "\n".join(["New breakwater for the harbour", *ARTICLE[:2], ARTICLE[2][:40]])
    assert len(texts["pages/huge.html"]) > BIG_PAGE_CHARS * 0.95  # the whole article, over and over, and no boilerplate
    assert_main_text(texts["pages/huge.html"])


@pytest.mark.slow
def test_filter_removes_bad_documents_for_their_reason(outcomes):
    removed = read(outcomes["filter"], "rejected", ["id", "reason"])
    rejected = dict(zip(removed["id"].to_pylist(), removed["reason"].to_pylist()))
    assert rejected == {
        "web/huge": "gopher_quality:gopher_long_doc",
        "web/binary-as-text": "lang",
        "pages/huge.html": "gopher_quality:gopher_long_doc",
        "pages/truncated.html": "gopher_quality:gopher_short_doc",  # what was left of it is too short to train on
    }
    counts = outcomes["filter"].counts
    assert counts["removed.gopher_quality:gopher_long_doc"] == 2 and counts["removed.lang"] == 1


@pytest.mark.slow
def test_a_20_mb_document_goes_through_every_stage_intact(outcomes):
    final = read(outcomes["pii"], "documents", ["id", "text"])
    texts = dict(zip(final["id"].to_pylist(), final["text"].to_pylist()))
    assert set(texts) == {"web/good", "code/huge.py", "pages/unclosed.html"}
    assert texts["code/huge.py"] == big_code() and texts["pages/unclosed.html"] == "\n".join(MARKET)
    assert outcomes["dedup"].rows == outcomes["filter"].rows == 3
