"""Content digests of input files and model folders, cached so unchanged files are read once.

A fingerprint must depend on what an input holds, never on where it lies or when it was
touched: the same checkpoint copied to another folder reuses every output, and a file saved
again unchanged reruns nothing. Hashing a multi-GB checkpoint on every ``crucible status``
would be slow, so each file's digest is cached in the state dir under (real path, size,
mtime): a file is re-read only when one of them changes, and a changed mtime with unchanged
bytes still gives the same digest.

Objects on an object store (``s3://…``) are the exception: reading every one at each plan would
cost a pass over the data, so they stand for themselves by their key, size and mtime (a bucket
is the same wherever the pipeline runs; a local checkout is not).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path

import pyarrow.fs as pafs

from tasks.paths import state_db

CHUNK = 8 * 1024 * 1024
_lock = threading.Lock()


def _cache() -> sqlite3.Connection:
    return state_db("digests.sqlite", "digests (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, digest TEXT)")


def _hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as src:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """The digest of one local file's bytes (cached by real path, size and mtime)."""
    real = Path(os.path.realpath(path))
    stat = real.stat()
    with _lock:
        db = _cache()
        try:
            row = db.execute("SELECT size, mtime_ns, digest FROM digests WHERE path = ?", (str(real),)).fetchone()
            if row is not None and row[0] == stat.st_size and row[1] == stat.st_mtime_ns:
                return row[2]
            digest = _hash(real)
            with db:
                db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", (str(real), stat.st_size, stat.st_mtime_ns, digest))
            return digest
        finally:
            db.close()


def listed_digest(info: pafs.FileInfo, remote: bool) -> str:
    """One file a pyarrow listing found: its bytes' digest when local, its key, size and mtime on an
    object store (see the module's docstring)."""
    return f"{info.path}\0{info.size}\0{info.mtime_ns}" if remote else file_digest(info.path)


def listing_digest(listing: dict[str, str]) -> str:
    """One digest of ``name -> digest`` entries, whatever order they were listed in."""
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def folder_digest(path: str | Path) -> str:
    """The digest of every file under a local folder: relative names and contents, not locations."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return listing_digest({str(f.relative_to(root)): file_digest(f) for f in files})
