"""Where stage outputs live: a local folder or any URI pyarrow's filesystems understand.

Every stage writes under ``{store}/{stage}/{fingerprint}/``. The manifest is written last and
atomically (temporary name + rename on local disks, a single PUT on object stores), so a folder
without ``manifest.json`` is always an incomplete stage and is never read downstream.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

MANIFEST = "manifest.json"


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

    def write_bytes_atomic(self, relative: str, data: bytes) -> None:
        """Write a small file so that readers see either nothing or all of it."""
        final = self.path(relative)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        if not self.is_local:  # object stores: one PUT is atomic
            with self.fs.open_output_stream(final) as out:
                out.write(data)
            return
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)

    def read_json(self, relative: str) -> dict | None:
        if not self.exists(relative):
            return None
        with self.fs.open_input_stream(self.path(relative)) as src:
            return json.loads(src.read())

    def clear(self) -> None:
        """Remove the folder (a forced rerun starts from nothing)."""
        if self.fs.get_file_info(self.root).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.root)


def read_text(uri: str) -> str:
    """The UTF-8 text of the file at ``uri``: a local path or an object-store URI."""
    fs, path = _split(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")
