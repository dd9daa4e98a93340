"""Bad input through the whole curation chain (ingest -> filter -> dedup -> pii).

Binary files, empty documents and 20 MB documents must each end where they belong: quarantined
and counted at ingest, or removed by ``filter`` for the right reason, or carried through every
stage intact; never a crashed or stalled stage.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_filter import GOOD_EN

from tasks.config import validate_config
from tasks.engine import run_pipeline

BIG_CHARS = 20_000_000
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00"
BINARY_ROW = b'{"id": "binary", "text": "'


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
    config = validate_config({
        "name": "bad-input",
        "store": str(root / "store"),
        "ingest": {"sources": [
            {"name": "web", "path": str(root / "web.jsonl"), "domain": "web", "id_field": "id"},
            {"name": "code", "path": str(code / "*.py"), "format": "text", "domain": "code"},
        ]},
        "filter": {"default": {"langid": {"languages": ["en"]}}, "num_workers": 1},
        "dedup": {},
        "pii": {},
    }, "test")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CRUCIBLE_HOME", str(root / "home"))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        return {o.stage: o.manifest for o in run_pipeline(config, until_stage="pii")}


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
    }
    assert ingest.counts["quarantined"] == 8 and ingest.counts["quarantined.web"] == 6
    assert ingest.rows == 4  # good, binary-as-text, huge prose, huge code


@pytest.mark.slow
def test_filter_removes_bad_documents_for_their_reason(outcomes):
    removed = read(outcomes["filter"], "rejected", ["id", "reason"])
    rejected = dict(zip(removed["id"].to_pylist(), removed["reason"].to_pylist()))
    assert rejected == {"web/huge": "gopher_quality:gopher_long_doc", "web/binary-as-text": "lang"}
    counts = outcomes["filter"].counts
    assert counts["removed.gopher_quality:gopher_long_doc"] == 1 and counts["removed.lang"] == 1


@pytest.mark.slow
def test_a_20_mb_document_goes_through_every_stage_intact(outcomes):
    final = read(outcomes["pii"], "documents", ["id", "text"])
    texts = dict(zip(final["id"].to_pylist(), final["text"].to_pylist()))
    assert set(texts) == {"web/good", "code/huge.py"}
    assert texts["code/huge.py"] == big_code()
    assert outcomes["dedup"].rows == outcomes["filter"].rows == 2
