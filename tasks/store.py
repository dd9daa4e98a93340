"""Where stage outputs live: a local folder or any URI pyarrow's filesystems understand.

Every stage writes under ``{store}/{stage}/{fingerprint}/``. The manifest is written last and
atomically (temporary name + rename on local disks, a single PUT on object stores), so a folder
without ``manifest.json`` is always an incomplete stage and is never read downstream. Beside
each folder, ``{fingerprint}.lease`` names the run writing it (``tasks/lease.py``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
SETTLE_S = 2.0
"""Object stores: how long ``create_exclusive`` waits before reading its write back. It must
exceed the time between another writer's existence check and its write (milliseconds)."""


def is_remote(uri: str) -> bool:
    """An object-store URI (``s3://…``, ``gs://…``), not a local path or a ``file://`` URI."""
    return "://" in uri and not uri.startswith("file://")


def _split(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    local = uri.removeprefix("file://")
    return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())


@dataclass(frozen=True)
class StageDir:
    """One stage's output folder, on whichever filesystem the store lives."""

    fs: pafs.FileSystem
    root: str  # path inside ``fs``
    uri: str  # the same place as a URI/path a user can paste

    @classmethod
    def at(cls, store: str, stage: str, fingerprint: str) -> StageDir:
        fs, base = _split(store)
        root = f"{base.rstrip('/')}/{stage}/{fingerprint}"
        uri = root if isinstance(fs, pafs.LocalFileSystem) else f"{store.rstrip('/')}/{stage}/{fingerprint}"
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
        return StageDir(fs=self.fs, root=self.root.rsplit("/", 1)[0], uri=self.uri.rsplit("/", 1)[0])

    def path(self, relative: str = "") -> str:
        """Path of ``relative`` inside this folder, as ``self.fs`` expects it."""
        return f"{self.root}/{relative}" if relative else self.root

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
    fs, path = _split(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")
