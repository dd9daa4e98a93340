"""Where stage outputs live: a local folder or any URI pyarrow's filesystems understand.

Every stage writes under ``{store}/{stage}/{fingerprint}/``. The manifest is written last and
atomically (temporary name + rename on local disks, a single PUT on object stores), so a folder
without ``manifest.json`` is always an incomplete stage and is never read downstream. Beside
each folder, ``{fingerprint}.lease`` names the run writing it (``tasks/lease.py``).

Object stores take the AWS SDK's standard settings from the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), or pyarrow's from the URI's
query (``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``). A query travels with
every URI built from the store (``join_uri``), so manifests, Ray tasks and training workers reach
the same server; ``filesystem_for`` is the one place a URI becomes a filesystem.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
SETTLE_S = 2.0
"""Object stores: how long ``create_exclusive`` waits before reading its write back. It must
exceed the time between another writer's existence check and its write (milliseconds)."""


def is_remote(uri: str) -> bool:
    """An object-store URI (``s3://…``, ``gs://…``), not a local path or a ``file://`` URI."""
    return "://" in uri and not uri.startswith("file://")


def _query(uri: str) -> tuple[str, str]:
    """(the URI up to its query, ``?query`` or ""); local paths have no query (``?`` is a character)."""
    if not is_remote(uri):
        return uri, ""
    location, mark, query = uri.partition("?")
    return location, mark + query


def join_uri(base: str, *parts: str) -> str:
    """``base/part/…``: a path, or a URI whose query stays at the end."""
    location, query = _query(base)
    return "/".join([location.rstrip("/"), *parts]) + query


def parent_uri(uri: str) -> str:
    """The folder holding ``uri`` (its query kept)."""
    location, query = _query(uri)
    return location.rstrip("/").rsplit("/", 1)[0] + query


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``uri`` (a local path, ``file://…`` or an object-store URI)
    and the path inside it.

    S3 files are opened with ``allow_delayed_open``, so a file smaller than one upload part
    (a manifest, a lease) goes out as a single PUT that readers see whole or not at all, rather
    than as a multipart upload.
    """
    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).expanduser().resolve())
    location, query = _query(uri)
    if location.startswith("s3://") and "allow_delayed_open" not in parse_qs(query.removeprefix("?")):
        query = f"{query}&allow_delayed_open=true" if query else "?allow_delayed_open=true"
    return pafs.FileSystem.from_uri(location + query)


@dataclass(frozen=True)
class StageDir:
    """One stage's output folder, on whichever filesystem the store lives."""

    fs: pafs.FileSystem
    root: str  # path inside ``fs``
    uri: str  # the same place as a URI/path a user can paste

    @classmethod
    def at(cls, store: str, stage: str, fingerprint: str) -> StageDir:
        fs, base = filesystem_for(store)
        root = f"{base.rstrip('/')}/{stage}/{fingerprint}"
        uri = root if isinstance(fs, pafs.LocalFileSystem) else join_uri(store, stage, fingerprint)
        return cls(fs=fs, root=root, uri=uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.root.rsplit("/", 1)[1]

    def parent(self) -> StageDir:
        """The folder holding this one: ``{store}/{stage}``, where the stage's lease lives,
        out of reach of ``clear``."""
        return StageDir(fs=self.fs, root=self.root.rsplit("/", 1)[0], uri=parent_uri(self.uri))

    def path(self, relative: str = "") -> str:
        """Path of ``relative`` inside this folder, as ``self.fs`` expects it."""
        return f"{self.root}/{relative}" if relative else self.root

    def uri_of(self, relative: str) -> str:
        """``relative`` as a URI another process or tool opens: ``file://…`` on local disks."""
        return Path(self.path(relative)).as_uri() if self.is_local else join_uri(self.uri, relative)

    def make(self, relative: str = "") -> str:
        path = self.path(relative)
        self.fs.create_dir(path, recursive=True)
        return path

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def list_files(self) -> list[str]:
        """Every file under the folder, relative to it, sorted (the manifest's ``files``)."""
        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        prefix = self.root.rstrip("/") + "/"
        return sorted(
            info.path.removeprefix(prefix)
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and not info.base_name.startswith(".")
            and info.base_name != MANIFEST
        )

    def _in_made_dir(self, relative: str) -> str:
        final = self.path(relative)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        return final

    def write_bytes_atomic(self, relative: str, data: bytes) -> None:
        """Write a small file so that readers see either nothing or all of it."""
        final = self._in_made_dir(relative)
        if not self.is_local:  # object stores: one PUT is atomic
            with self.fs.open_output_stream(final) as out:
                out.write(data)
            return
        os.replace(_complete_temporary(final, data), final)

    def create_exclusive(self, relative: str, data: bytes) -> bool:
        """Create a small file unless one exists there; True when this call created it.

        Local disks (NFS included): a hard link to a complete temporary file, which fails when
        the name exists, so of several callers exactly one wins and no reader sees half a file.
        Object stores have no exclusive create: look, write, wait ``SETTLE_S``, read back, and
        win if the bytes are still ours. That is best effort: two callers both win only when
        one's look and write are further apart than ``SETTLE_S``.
        """
        final = self._in_made_dir(relative)
        if self.is_local:
            tmp = _complete_temporary(final, data)
            try:
                os.link(tmp, final)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self.exists(relative):
            return False
        self.write_bytes_atomic(relative, data)
        time.sleep(SETTLE_S)
        return self.read_bytes(relative) == data

    def read_bytes(self, relative: str) -> bytes | None:
        """The file's bytes, or None when there is no such file (also when it goes as it is read)."""
        try:
            with self.fs.open_input_stream(self.path(relative)) as src:
                return src.read()
        except FileNotFoundError:
            return None

    def read_json(self, relative: str) -> dict | None:
        data = self.read_bytes(relative)
        return json.loads(data) if data is not None else None

    def delete(self, relative: str) -> None:
        """Remove one file; one that is already gone is fine."""
        try:
            self.fs.delete_file(self.path(relative))
        except FileNotFoundError:
            pass

    def clear(self) -> None:
        """Remove the folder (a forced rerun starts from nothing)."""
        if self.fs.get_file_info(self.root).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.root)


def _complete_temporary(final: str, data: bytes) -> str:
    """A local file beside ``final`` holding ``data``, flushed to disk; returns its path."""
    tmp = f"{final}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    return tmp


def read_text(uri: str) -> str:
    """The UTF-8 text of the file at ``uri``: a local path or an object-store URI."""
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")
