"""Ingest's other formats (web pages and WARC crawls too), shard reuse after a crash, and rows
that must not be lost."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from tasks.config import validate_config
from tasks.engine import plan, run_pipeline, run_stage


ARTICLE = [
    "The harbour committee met on Tuesday evening to review the plans for the new breakwater.",
    "Engineers explained that the old wall was built in the eighteen nineties and has been repaired many times since then.",
    "Several fishermen told the committee that winter storms now reach the inner basin and damage their boats every year.",
    "After a long discussion the members agreed to ask for a revised budget before the end of the month.",
]
BOILERPLATE = ["Contact us", "Copyright 2024", "Subscribe to our newsletter", "Great article", "Opening hours"]


def web_page(paragraphs: list[str], head: str = "") -> str:
    """An article amid what a news site wraps it in: navigation, a table, comments, a footer."""
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return (
        f"<!DOCTYPE html><html><head><title>Harbour news</title>{head}</head><body>"
        '<nav><ul><li><a href="/">Home</a></li><li><a href="/contact">Contact us</a></li></ul></nav>'
        f"<main><article><h1>New breakwater for the harbour</h1>{body}"
        "<table><tr><td>Opening hours</td><td>9 to 5</td></tr><tr><td>Fees</td><td>none</td></tr></table></article>"
        '<div id="comments" class="comments"><p>Great article, thanks for sharing it with everyone here!</p></div></main>'
        "<footer><p>Copyright 2024 Harbour Gazette. All rights reserved.</p><p>Subscribe to our newsletter.</p></footer>"
        "</body></html>"
    )


def canonical(url: str) -> str:
    return f'<link rel="canonical" href="{url}">'


OG_URL = '<meta property="og:url" content="https://example.org/og/harbour">'
# A page whose text a script would render: there is nothing to extract.
APP_SHELL = '<html><head><title>Harbour news</title></head><body><div id="app"></div><script>render()</script></body></html>'


def assert_main_text(text: str) -> None:
    assert text.startswith("New breakwater for the harbour\n") and all(p in text for p in ARTICLE)
    assert not any(b in text for b in BOILERPLATE), text


def config_for(tmp_path, *sources):
    return validate_config({"name": "ingest-test", "store": str(tmp_path / "store"), "ingest": {"sources": list(sources)}}, "test")


def test_parquet_and_text_sources(tmp_path, tmp_home, ray_session):
    (tmp_path / "pq").mkdir()
    pq.write_table(
        pa.table({"body": ["first", None, "", "fourth"], "key": ["k1", "k2", "k3", "k4"], "lang": ["en"] * 4}),
        tmp_path / "pq" / "part.parquet",
    )
    (tmp_path / "txt" / "sub").mkdir(parents=True)
    (tmp_path / "txt" / "a.txt").write_text("a plain text document\n")
    (tmp_path / "txt" / "sub" / "b.txt").write_text("another one, nested\n")
    (tmp_path / "txt" / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    (tmp_path / "txt" / "empty.txt").write_text("   \n")
    config = config_for(
        tmp_path,
        {"name": "tab", "path": str(tmp_path / "pq" / "*.parquet"), "format": "parquet", "text_field": "body", "id_field": "key", "domain": "web"},
        {"name": "notes", "path": str(tmp_path / "txt" / "**" / "*.txt"), "format": "text", "domain": "books"},
    )
    [outcome] = run_pipeline(config)
    docs = {d["id"]: d for d in pq.read_table(outcome.manifest.file_paths("documents")).to_pylist()}
    assert set(docs) == {"tab/k1", "tab/k4", "notes/a.txt", "notes/sub/b.txt"}
    assert docs["tab/k1"]["meta"] == '{"lang": "en"}' and docs["notes/sub/b.txt"]["domain"] == "books"
    bad = {(r["file"], r["line"]): r["error"] for r in pq.read_table(outcome.manifest.file_paths("quarantine")).to_pylist()}
    assert bad == {
        ("part.parquet", 2): "missing text field 'body'",
        ("part.parquet", 3): "empty text field 'body'",
        ("blob.txt", 1): "invalid UTF-8 at byte 0",
        ("empty.txt", 1): "empty text field 'text'",
    }
    assert outcome.manifest.counts["quarantined"] == 4


def test_large_document_and_missing_column(tmp_path, tmp_home, ray_session):
    big = "word " * 4_000_000  # a 20 MB document is a document, not an error
    (tmp_path / "big.jsonl").write_text('{"text": "%s"}\n' % big)
    pq.write_table(pa.table({"other": ["x"]}), tmp_path / "nocol.parquet")
    config = config_for(
        tmp_path,
        {"name": "big", "path": str(tmp_path / "big.jsonl"), "domain": "web"},
        {"name": "nocol", "path": str(tmp_path / "nocol.parquet"), "format": "parquet", "domain": "web"},
    )
    [outcome] = run_pipeline(config)
    assert outcome.manifest.counts["rows.big"] == 1
    [bad] = pq.read_table(outcome.manifest.file_paths("quarantine")).to_pylist()
    assert bad["file"] == "nocol.parquet" and "no column 'text'" in bad["error"]


def test_rerun_after_crash_reuses_finished_shards(tmp_path, tmp_home, ray_session):
    for i in range(3):
        (tmp_path / f"f{i}.jsonl").write_text("".join(f'{{"text": "doc {i}-{j}"}}\n' for j in range(5)))
    config = config_for(tmp_path, {"name": "s", "path": str(tmp_path / "f*.jsonl"), "domain": "web"})
    first = run_stage(config, "ingest")
    planned = plan(config)["ingest"]
    # Simulate a crash after two shards: drop the manifest and one shard.
    planned.out.fs.delete_file(planned.out.path("manifest.json"))
    planned.out.fs.delete_file(planned.out.path("documents/s-00002.parquet"))
    again = run_stage(config, "ingest")
    assert again.state == "ran" and again.manifest.counts["reused_shards"] == 2
    assert again.manifest.rows == first.manifest.rows == 15


def test_web_pages_keep_their_main_text_and_own_url(tmp_path, tmp_home, ray_session):
    pages = tmp_path / "pages"
    (pages / "news").mkdir(parents=True)
    (pages / "news" / "harbour.html").write_text(web_page(ARTICLE, canonical("https://example.org/news/harbour") + OG_URL))
    (pages / "og.html").write_text(web_page(ARTICLE, OG_URL))
    (pages / "relative.html").write_text(web_page(ARTICLE, canonical("/news/harbour")))  # nothing to resolve it against
    (pages / "latin1.htm").write_bytes(web_page(["Café " + p for p in ARTICLE], '<meta charset="iso-8859-1">').encode("latin-1"))
    rows = [
        {"id": "a", "html": web_page(ARTICLE, canonical("https://example.org/a")), "url": "https://field.example/a", "lang": "en"},
        {"id": "b", "html": web_page(ARTICLE, canonical("https://example.org/b"))},
        {"id": "c", "html": APP_SHELL},
        {"id": "d", "html": "plain words, not a page"},
    ]
    (tmp_path / "dump.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = config_for(
        tmp_path,
        {"name": "pages", "path": str(pages / "**" / "*.htm*"), "format": "html", "domain": "web"},
        {"name": "dump", "path": str(tmp_path / "dump.jsonl"), "text_field": "html", "html": True, "id_field": "id", "domain": "web"},
    )
    [outcome] = run_pipeline(config)
    docs = {d["id"]: d for d in pq.read_table(outcome.manifest.file_paths("documents")).to_pylist()}
    assert {i: d["url"] for i, d in docs.items()} == {
        "pages/news/harbour.html": "https://example.org/news/harbour",  # canonical before og:url
        "pages/og.html": "https://example.org/og/harbour",
        "pages/relative.html": None,
        "pages/latin1.htm": None,
        "dump/a": "https://field.example/a",  # where the row says it came from wins
        "dump/b": "https://example.org/b",
    }
    for doc in docs.values():
        assert_main_text(doc["text"].replace("Café ", ""))
    assert "Café The harbour committee" in docs["pages/latin1.htm"]["text"]  # decoded by its meta charset
    assert docs["dump/a"]["meta"] == '{"lang": "en"}' and docs["dump/b"]["meta"] is None
    bad = {(r["file"], r["line"]): (r["error"], r["raw"][:30]) for r in pq.read_table(outcome.manifest.file_paths("quarantine")).to_pylist()}
    assert bad == {
        ("dump.jsonl", 3): ("no main text: the page is empty or all boilerplate", '{"id": "c", "html": "<html><he'),
        ("dump.jsonl", 4): ("not an HTML page: no document tree could be parsed", '{"id": "d", "html": "plain wor'),
    }
    assert outcome.manifest.counts["rows.pages"] == 4 and outcome.manifest.counts["quarantined.dump"] == 2


def http_response(writer: WARCWriter, url: str, status: str, content_type: str, body: bytes, *extra: tuple[str, str]):
    headers = StatusAndHeaders(status, [("Content-Type", content_type), *extra], protocol="HTTP/1.1")
    return writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)


def write_crawl(path, gzipped: bool) -> list[str]:
    """A small crawl as a crawler writes it; returns the WARC-Record-IDs of the two HTML pages."""
    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=gzipped)
        page = web_page(ARTICLE, canonical("https://example.org/elsewhere")).encode()
        records = [
            writer.create_warcinfo_record(path.name, {"software": "test"}),
            writer.create_warc_record("https://example.org/news", "request", payload=io.BytesIO(b"GET /news HTTP/1.1\r\n\r\n")),
            http_response(writer, "https://example.org/news", "200 OK", "text/html; charset=utf-8", page),
            http_response(writer, "https://example.org/zipped", "200 OK", "application/xhtml+xml", gzip.compress(page), ("Content-Encoding", "gzip")),
            http_response(writer, "https://example.org/logo.png", "200 OK", "image/png", b"\x89PNG\r\n\x1a\n\x00\x00"),
            http_response(writer, "https://example.org/old", "301 Moved Permanently", "text/html", b"<html><body>Moved</body></html>"),
            http_response(writer, "https://example.org/gone", "404 Not Found", "text/html", page),
            http_response(writer, "https://example.org/app", "200 OK", "text/html", APP_SHELL.encode()),
        ]
        for record in records:
            writer.write_record(record)
    return [r.rec_headers.get_header("WARC-Record-ID").strip("<>") for r in records[2:4]]


def test_warc_keeps_html_responses_and_counts_the_rest(tmp_path, tmp_home, ray_session):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    ids = [i for name in ("a.warc.gz", "b.warc", "c.warc", "d.warc") for i in write_crawl(crawl / name, gzipped=name.endswith(".gz"))]
    with open(crawl / "c.warc", "ab") as damaged:
        damaged.write(b"this is where the disk ran out\n" * 3)  # good records, then garbage
    headless = crawl / "d.warc"  # the last record's headers lose their target URI
    headless.write_bytes(headless.read_bytes().replace(b"WARC-Target-URI: https://example.org/app", b"WARC-Target-UR*: https://example.org/app"))
    config = config_for(tmp_path, {"name": "crawl", "path": str(crawl / "*.warc*"), "format": "warc", "domain": "web"})
    [outcome] = run_pipeline(config)
    docs = pq.read_table(outcome.manifest.file_paths("documents")).to_pylist()
    assert sorted(d["id"] for d in docs) == sorted(f"crawl/{i}" for i in ids)
    assert {d["url"] for d in docs} == {"https://example.org/news", "https://example.org/zipped"}  # WARC-Target-URI
    for doc in docs:
        assert_main_text(doc["text"])
    bad = {(r["file"], r["line"]): r["error"] for r in pq.read_table(outcome.manifest.file_paths("quarantine")).to_pylist()}
    assert bad.pop(("c.warc", 9)) == "unreadable WARC record: Invalid WARC record, first line: this is where the disk ran out\n"
    assert bad == {
        **{(name, 8): "no main text: the page is empty or all boilerplate" for name in ("a.warc.gz", "b.warc", "c.warc")},
        ("d.warc", 8): "unreadable WARC record: damaged headers",
    }
    counts = outcome.manifest.counts
    assert counts["skipped"] == counts["skipped.crawl"] == 12  # per file: the image, the redirect, the 404
    assert counts["rows.crawl"] == 8 and counts["quarantined"] == 5
