"""Ingest's other formats, shard reuse after a crash, and rows that must not be lost."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import validate_config
from tasks.engine import plan, run_pipeline, run_stage


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
