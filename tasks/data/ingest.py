"""``ingest``: read the configured sources into Crucible's document schema.

One Ray Data task per input file streams it row by row into one Parquet shard
(``documents/{source}-{n}.parquet``). Rows that cannot be used (malformed JSON, invalid UTF-8,
missing/empty/non-string text, a repeated id, a web page with no main text) go to ``quarantine/``
with the file, the line (or WARC record) and the error: they are counted and reported, never
fatal, and never take a valid row with them. WARC records that are not 2xx HTML responses are
skipped and counted. Shards are written atomically, so a rerun after a crash reuses every
finished shard. Last, the driver writes ``ids/`` (``tasks/data/id_index.py``): each document's id,
the input file it came from and its shard, which ``crucible trace`` looks documents up in.

Web pages (``format: html``, ``format: warc``, or ``html: true`` on a jsonl/parquet text field) keep
trafilatura's main-content extraction, in the Ray task that reads the file, like every format.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import json
import os
import re
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.data.id_index import constant, shard_tables, write_id_index
from tasks.errors import ConfigError, require_unique
from tasks.digest import listed_digest, listing_digest
from tasks.stage import DIGESTED, Stage, StageContext, StageResult
from tasks.store import StageDir, filesystem_for, is_remote

DOCUMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("domain", pa.string()),
        ("url", pa.string()),
        ("meta", pa.string()),  # JSON of the input row's other fields
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [("source", pa.string()), ("file", pa.string()), ("line", pa.int64()), ("error", pa.string()), ("raw", pa.string())]
)
ID_INDEX_SCHEMA = pa.schema(
    [("id", pa.string()), ("file", pa.dictionary(pa.int32(), pa.string())), ("shard", pa.dictionary(pa.int32(), pa.string()))]
)
RAW_PREVIEW = 500
BINARY_SNIFF = 8192  # leading bytes of a web page searched for NULs, which no text page holds
HTML_TYPES = ("text/html", "application/xhtml+xml")
# A reader yields this for a record that is not a document by design (a WARC image response):
# counted as skipped, not quarantined, since nothing in it was ever meant to be text.
SKIPPED = object()
TALLIES = ("rows", "quarantined", "skipped")  # what each file's task counts, in this order


class Source(BaseModel):
    """One input: files matching ``path`` (a glob, local or on an object store)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="short unique name; prefixes every id")
    path: str = Field(
        ..., description="file, glob (`data/**/*.jsonl`) or URI (`s3://bucket/web/*.parquet`)", json_schema_extra=DIGESTED
    )
    format: Literal["jsonl", "parquet", "text", "html", "warc"] = Field(
        "jsonl", description="html: one web page per file; warc: the HTML responses of a web crawl"
    )
    text_field: str = Field("text", description="field/column holding the text (jsonl, parquet)")
    html: bool = Field(False, description="the text field holds a web page's HTML: keep its main text (jsonl, parquet)")
    id_field: str | None = Field(None, description="field with a unique id; default: file and line")
    url_field: str | None = Field("url", description="field with the document's URL, if any")
    domain: str = Field(..., description="domain label used for filtering and mixing, e.g. web, code")

    @model_validator(mode="after")
    def _html_is_for_fields(self) -> Source:
        if self.html and self.format not in ("jsonl", "parquet"):
            raise ValueError(f"html: true is for jsonl and parquet text fields; for HTML files use format: html, not {self.format}")
        return self


class IngestConfig(BaseModel):
    """Sources to read. Documents keep ids of the form ``{source}/{id or file:line}``."""

    model_config = ConfigDict(extra="forbid")

    sources: list[Source] = Field(..., min_length=1)
    row_group_rows: int = Field(10_000, ge=1, description="rows buffered per Parquet row group")

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[Source]) -> list[Source]:
        require_unique([s.name for s in sources], "source")
        return sources


# ---------------------------------------------------------------------------------- listing


def _glob_base(pattern: str) -> str:
    """The part of a glob before its first wildcard, cut at a path separator."""
    cut = re.search(r"[*?\[]", pattern)
    return pattern if cut is None else pattern[: cut.start()].rsplit("/", 1)[0]


def list_source_files(source: Source) -> tuple[str, list[pafs.FileInfo]]:
    """Files of a source as (base dir, infos), sorted so ids and shard numbers are stable."""
    pattern = source.path
    if is_remote(pattern):
        fs, path = filesystem_for(pattern)
        base = _glob_base(path)
        if base == path:
            infos = [fs.get_file_info(path)]
        else:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            infos = [i for i in infos if fnmatch.fnmatch(i.path, path)]
    else:
        path = os.path.abspath(os.path.expanduser(pattern.removeprefix("file://")))
        fs = pafs.LocalFileSystem()
        base = _glob_base(path)
        infos = fs.get_file_info(sorted(glob.glob(path, recursive=True)))
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    return (base if base != path else os.path.dirname(path)), files


def source_files(cfg: IngestConfig) -> list[tuple[int, str, list[pafs.FileInfo]]]:
    """Every source's files; a source that matches nothing is a config error naming it."""
    listed, problems = [], []
    for i, source in enumerate(cfg.sources):
        try:
            base, files = list_source_files(source)
        except (OSError, ValueError) as exc:
            problems.append((f"ingest.sources[{i}].path", f"cannot read '{source.path}': {exc}"))
            continue
        if not files:
            problems.append((f"ingest.sources[{i}].path", f"no files match '{source.path}'"))
        listed.append((i, base, files))
    if problems:
        raise ConfigError("config", problems)
    return listed


def relative_name(path: str, base: str) -> str:
    """A listed file's name under its source's base folder: what ids and quarantine rows call it."""
    return os.path.relpath(path, base) if base else path


def source_digest(pattern: str, base: str, files: list[pafs.FileInfo]) -> str:
    """The files a source's ``pattern`` matched, by their names under its base folder (ids are made
    of them) and their contents (``tasks/digest.py``): moving the whole tree or touching a file
    changes nothing, renaming a file inside it does."""
    remote = is_remote(pattern)
    return listing_digest({relative_name(info.path, base): listed_digest(info, remote) for info in files})


def inputs_digest(cfg: IngestConfig, _pipeline: Any) -> str:
    """Ingest's output depends on each source's files, by name and content (the ``path`` setting
    itself is left out of the fingerprint: the same files elsewhere give the same output)."""
    return listing_digest({str(i): source_digest(cfg.sources[i].path, base, files) for i, base, files in source_files(cfg)})


# ---------------------------------------------------------------------------------- reading


class BadRow(Exception):
    """A row that goes to quarantine, with (a preview of) what was read."""

    def __init__(self, error: str, raw: str = ""):
        super().__init__(error)
        self.raw = raw


def _document(source: Source, fallback_id: str, record: dict[str, Any]) -> dict[str, Any]:
    text = record.get(source.text_field)
    if text is None:
        raise BadRow(f"missing text field '{source.text_field}'")
    if not isinstance(text, str):
        raise BadRow(f"text field '{source.text_field}' is {type(text).__name__}, not a string")
    if not text.strip():
        raise BadRow(f"empty text field '{source.text_field}'")
    if source.id_field:
        raw_id = record.get(source.id_field)
        if raw_id is None or raw_id == "":
            raise BadRow(f"missing id field '{source.id_field}'")
        doc_id = f"{source.name}/{raw_id}"
    else:
        doc_id = f"{source.name}/{fallback_id}"
    url = record.get(source.url_field) if source.url_field else None
    url = url if isinstance(url, str) else None
    if source.html:
        text, page_url = _extract_page(text.encode("utf-8", errors="replace"))
        url = url or page_url
    used = {source.text_field, source.id_field, source.url_field}
    rest = {k: v for k, v in record.items() if k not in used}
    return _row(source, doc_id, text, url, rest)


def _row(source: Source, doc_id: str, text: str, url: str | None, rest: dict[str, Any] | None) -> dict[str, Any]:
    """One row of ``DOCUMENT_SCHEMA``; ``rest`` (the input's other fields) is kept as JSON."""
    return {
        "id": doc_id,
        "text": text,
        "source": source.name,
        "domain": source.domain,
        "url": url,
        "meta": json.dumps(rest, default=str, ensure_ascii=False) if rest else None,
    }


def _extract_page(page: bytes) -> tuple[str, str | None]:
    """A web page's main text and its own URL (canonical link, else og:url); BadRow saying why not.

    trafilatura keeps the main content and drops navigation, headers, footers and other
    boilerplate. Readers' comments are left out (other authors, mostly short and noisy), and so
    are tables: on the web most are layout or data grids whose cells read as broken sentences.
    """
    from trafilatura import bare_extraction, load_html  # a 0.6 s import only HTML sources pay

    preview = page[: RAW_PREVIEW * 4].decode("utf-8", errors="replace")
    if not page.strip():
        raise BadRow("empty page", preview)
    if b"\x00" in page[:BINARY_SNIFF]:
        raise BadRow("binary content (NUL bytes), not an HTML page", preview)
    tree = load_html(page)
    if tree is None:
        raise BadRow("not an HTML page: no document tree could be parsed", preview)
    url = _page_url(tree)
    extracted = bare_extraction(tree, include_comments=False, include_tables=False)
    if extracted is None or not extracted.text.strip():
        raise BadRow("no main text: the page is empty or all boilerplate", preview)
    return extracted.text, url


def _page_url(tree: Any) -> str | None:
    """The absolute http(s) URL the page gives for itself: ``<link rel=canonical>``, else og:url.
    A relative one is dropped: without knowing where the page came from it cannot be resolved."""
    for xpath in ('//link[@rel="canonical"]/@href', '//meta[@property="og:url"]/@content'):
        for value in tree.xpath(xpath):
            parts = urlsplit(value.strip())
            if parts.scheme in ("http", "https") and parts.netloc:
                return value.strip()
    return None


def _page_document(source: Source, key: str, page: bytes, url: str | None) -> Any:
    """A whole web page (an HTML file, a WARC response) as a document, or the BadRow saying why not.
    ``url`` (where the page was fetched from) wins over the page's own canonical URL."""
    try:
        text, page_url = _extract_page(page)
    except BadRow as bad:
        return bad
    return _row(source, f"{source.name}/{key}", text, url or page_url, None)


def _read_jsonl(fs: pafs.FileSystem, path: str, rel: str, source: Source) -> Iterator[tuple[int, Any]]:
    """Yield (line number, document dict or BadRow) for each non-blank line."""
    with fs.open_input_stream(path) as stream:
        buffer = b""
        lineno = 0
        while True:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                lineno += 1
                yield lineno, _parse_json_line(line, f"{rel}:{lineno}", source)
        if buffer:
            lineno += 1
            yield lineno, _parse_json_line(buffer, f"{rel}:{lineno}", source)


def _parse_json_line(line: bytes, where: str, source: Source) -> Any:
    if not line.strip():
        return None
    raw = line[: RAW_PREVIEW * 4].decode("utf-8", errors="replace")
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return BadRow(f"invalid UTF-8 at byte {exc.start}", raw)
    except json.JSONDecodeError as exc:
        return BadRow(f"malformed JSON: {exc.msg} (column {exc.colno})", raw)
    if not isinstance(record, dict):
        return BadRow(f"expected a JSON object, got {type(record).__name__}", raw)
    try:
        return _document(source, where, record)
    except BadRow as bad:
        return BadRow(str(bad), raw)


def _read_parquet(fs: pafs.FileSystem, path: str, rel: str, source: Source) -> Iterator[tuple[int, Any]]:
    with fs.open_input_file(path) as handle:
        reader = pq.ParquetFile(handle)
        if source.text_field not in reader.schema_arrow.names:
            raise BadRow(f"no column '{source.text_field}' (columns: {', '.join(reader.schema_arrow.names)})")
        row = 0
        for batch in reader.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                try:
                    yield row, _document(source, f"{rel}:{row}", record)
                except BadRow as bad:
                    yield row, BadRow(str(bad), json.dumps(record, default=str, ensure_ascii=False))


def _read_text(fs: pafs.FileSystem, path: str, rel: str, source: Source) -> Iterator[tuple[int, Any]]:
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield 1, BadRow(f"invalid UTF-8 at byte {exc.start}")
        return
    try:
        yield 1, _document(source.model_copy(update={"text_field": "text", "id_field": None}), rel, {"text": text})
    except BadRow as bad:
        yield 1, bad


def _read_html(fs: pafs.FileSystem, path: str, rel: str, source: Source) -> Iterator[tuple[int, Any]]:
    """One web page per file; its id is the file's path, as for text sources."""
    with fs.open_input_stream(path) as stream:
        yield 1, _page_document(source, rel, stream.read(), None)


def _read_warc(fs: pafs.FileSystem, path: str, rel: str, source: Source) -> Iterator[tuple[int, Any]]:
    """Yield (record number, item) for each WARC record (plain or gzipped). A file that stops being
    WARC part-way keeps every record before the damage; the damage is one quarantined row."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    with fs.open_input_stream(path) as stream:
        records = ArchiveIterator(stream)
        for number in itertools.count(1):
            try:
                record = next(records, None)
            except (ArchiveLoadFailed, AttributeError) as exc:
                # warcio 1.8 raises AttributeError on a record whose damaged headers lost its target URI
                why = exc if isinstance(exc, ArchiveLoadFailed) else "damaged headers"
                yield number, BadRow(f"unreadable WARC record: {why}")
                return
            if record is None:
                return
            yield number, _warc_document(source, f"{rel}:{number}", record)


def _warc_document(source: Source, fallback_id: str, record: Any) -> Any:
    """A 2xx HTML response as a document (id: its WARC-Record-ID, stable across reruns), SKIPPED
    for any other response (images, PDFs, redirects, errors), None for requests, metadata and the
    like, which never hold a page."""
    if record.rec_type != "response":
        return None
    if not _is_html_page(record.http_headers):
        return SKIPPED
    record_id = (record.rec_headers.get_header("WARC-Record-ID") or fallback_id).strip("<>")
    return _page_document(source, record_id, record.content_stream().read(), record.rec_headers.get_header("WARC-Target-URI"))


def _is_html_page(http: Any) -> bool:
    """Whether a response's HTTP headers announce a page: a 2xx status and an HTML content type.
    Missing or damaged headers (warcio then gives None for them) announce nothing."""
    if http is None:
        return False
    content_type = (http.get_header("Content-Type") or "").split(";")[0].strip().lower()
    return (http.get_statuscode() or "").startswith("2") and content_type in HTML_TYPES


READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet, "text": _read_text, "html": _read_html, "warc": _read_warc}


# ---------------------------------------------------------------------------------- writing


class _ShardWriter:
    """Streams rows into one Parquet file in row groups, under a temporary name until done."""

    def __init__(self, fs: pafs.FileSystem, final: str, schema: pa.Schema, group_rows: int):
        self.fs, self.final, self.schema, self.group_rows = fs, final, schema, group_rows
        self.tmp = f"{final}.partial"
        self.rows: list[dict] = []
        self.count = 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, self.schema, filesystem=self.fs)
        self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        self.rows = []

    def close(self, metadata: dict[str, str] | None = None, keep_empty: bool = True) -> bool:
        if self.count == 0 and not keep_empty:
            return False
        if self.writer is None or self.rows:
            self._flush()
        if metadata:
            self.writer.add_key_value_metadata(metadata)
        self.writer.close()
        self.fs.move(self.tmp, self.final)
        return True


def shard_name(source: str, file_index: int) -> str:
    """The name of the shard (in ``documents/``, and ``quarantine/``) that the source's file number ``file_index`` becomes."""
    return f"{source}-{file_index:05d}.parquet"


def ingest_file(task: dict[str, Any], cfg: IngestConfig, out_root: str, fs: pafs.FileSystem) -> dict[str, Any]:
    """Ingest one file into its shard; reuse the shard if an earlier attempt finished it."""
    source = cfg.sources[task["source_index"]]
    shard = shard_name(source.name, task["file_index"])
    docs_path = f"{out_root}/documents/{shard}"
    if fs.get_file_info(docs_path).type == pafs.FileType.File:
        meta = pq.read_metadata(docs_path, filesystem=fs).metadata or {}
        tallies = {key: int(meta.get(f"crucible.{key}".encode(), 0)) for key in TALLIES}  # shards from before `skipped` lack it
        return {"source": source.name, **tallies, "reused": True}

    src_fs = filesystem_for(task["fs_uri"])[0] if task["fs_uri"] else pafs.LocalFileSystem()
    docs = _ShardWriter(fs, docs_path, DOCUMENT_SCHEMA, cfg.row_group_rows)
    bad = _ShardWriter(fs, f"{out_root}/quarantine/{shard}", QUARANTINE_SCHEMA, cfg.row_group_rows)
    seen: set[str] = set()
    skipped = 0

    def quarantine(line: int, error: str, raw: str = "") -> None:
        bad.add({"source": source.name, "file": task["rel"], "line": line, "error": error, "raw": raw[:RAW_PREVIEW]})

    try:
        for line, item in READERS[source.format](src_fs, task["path"], task["rel"], source):
            if item is None:
                continue
            if item is SKIPPED:
                skipped += 1
            elif isinstance(item, BadRow):
                quarantine(line, str(item), item.raw)
            elif item["id"] in seen:
                quarantine(line, f"repeated id '{item['id']}'", item["text"])
            else:
                seen.add(item["id"])
                docs.add(item)
    except (OSError, BadRow) as exc:  # unreadable file or unusable schema: the whole file is quarantined
        quarantine(0, f"unreadable file: {exc}")
    bad.close(keep_empty=False)
    tallies = {"rows": docs.count, "quarantined": bad.count, "skipped": skipped}
    docs.close({f"crucible.{key}": str(n) for key, n in tallies.items()})
    return {"source": source.name, **tallies, "reused": False}


def run(ctx: StageContext) -> StageResult:
    import ray

    cfg: IngestConfig = ctx.config
    tasks = []
    for i, base, files in source_files(cfg):
        remote = is_remote(cfg.sources[i].path)
        for n, info in enumerate(files):
            tasks.append(
                {
                    "source_index": i,
                    "file_index": n,
                    "path": info.path,
                    "fs_uri": cfg.sources[i].path if remote else None,
                    "rel": relative_name(info.path, base),
                }
            )
    ctx.out.make("documents")
    ctx.out.make("quarantine")
    out_root, fs = ctx.out.root, ctx.out.fs
    stats = (
        ray.data.from_items(tasks, override_num_blocks=len(tasks))
        .map(lambda task: ingest_file(task, cfg, out_root, fs))
        .take_all()
    )
    per_source: dict[str, dict[str, int]] = {}
    for row in stats:
        entry = per_source.setdefault(row["source"], dict.fromkeys(("files", *TALLIES), 0))
        entry["files"] += 1
        for key in TALLIES:
            entry[key] += row[key]
    rows, quarantined, skipped = (sum(e[key] for e in per_source.values()) for key in TALLIES)
    counts = {"files": len(stats), "quarantined": quarantined, "skipped": skipped, "reused_shards": sum(r["reused"] for r in stats)}
    for name, entry in per_source.items():
        counts.update({f"{key}.{name}": entry[key] for key in TALLIES})
    table = "\n".join(
        f"| {name} | {e['files']} | {e['rows']} | {e['quarantined']} | {e['skipped']} |" for name, e in sorted(per_source.items())
    )
    report = (
        f"Ingested **{rows}** documents from {len(stats)} files; **{quarantined}** rows quarantined "
        f"(see `quarantine/`); {skipped} WARC responses skipped (not 2xx HTML).\n\n"
        f"| source | files | documents | quarantined | skipped |\n|---|---|---|---|---|\n{table}\n"
    )
    write_id_index(ctx.out, _id_index(ctx.out, {shard_name(cfg.sources[t["source_index"]].name, t["file_index"]): t["rel"] for t in tasks}))
    return StageResult(rows=rows, counts=counts, metrics={"quarantine_rate": quarantined / max(1, rows + quarantined)}, report=report)


def _id_index(out: StageDir, files: dict[str, str]) -> pa.Table:
    """Every document's shard and the input file it was read from (``files``: shard -> file),
    for ``crucible trace``."""
    parts = [
        pa.table({"id": ids["id"], "file": constant(files[shard.removeprefix("documents/")], len(ids)),
                  "shard": constant(shard, len(ids))})
        for shard, ids in shard_tables(out, "documents", ["id"])
    ]
    return pa.concat_tables(parts) if parts else ID_INDEX_SCHEMA.empty_table()


STAGE = Stage(name="ingest", upstream=(), version="2", run=run, inputs=inputs_digest)
