"""One writer per stage folder: a lease beside ``{store}/{stage}/{fingerprint}/``.

Two runs of one config at once (two terminals, a scheduled refresh overlapping a manual run)
would otherwise write the same folder together. ``run_stage`` holds this lease while it writes.

The lease is a small JSON file, ``{store}/{stage}/{fingerprint}.lease``: beside the folder, so
``--force``, which deletes the folder, never deletes it. It names its holder (host, pid, a
random token, when its run started, its last heartbeat). The holder refreshes the heartbeat
from a background thread every ``lease.heartbeat_s`` and deletes the file when the stage ends,
whether it succeeded or failed. Another run waits while the holder is alive, up to
``lease.wait_s``.

A lease is stale when its holder is a dead process on this host, or its heartbeat is older than
``lease.ttl_s`` (a holder that crashed on another machine). A stale lease is taken over in two
steps, so that of several runs that find it stale only one takes it: first an exclusive create
of a marker named by the stale lease's token, then, if the lease is still that one, a rewrite.

Exclusive creates are exact on local disks and best effort on object stores, which have none
(see ``StageDir.create_exclusive``). A holder that stalls past ``ttl_s`` (a suspended laptop)
can be taken over while still alive; it then fails before writing its manifest rather than
complete a stage another run is writing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
import warnings
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.errors import StageError
from tasks.store import StageDir, join_uri

if TYPE_CHECKING:
    from tasks.config import LeaseConfig

POLL_S = 1.0  # how often a waiting run looks at the lease again


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _alive(pid: int) -> bool:
    """Whether a process of this host runs under ``pid`` (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class Holder(BaseModel):
    """The record in a lease file (and in a takeover marker): which run holds it, since when."""

    model_config = ConfigDict(frozen=True)  # extra keys allowed: records from newer versions stay readable

    host: str
    pid: int = Field(gt=0)
    token: str
    started_at: datetime
    heartbeat_at: datetime

    @classmethod
    def this_run(cls) -> Holder:
        now = _now()
        return cls(host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex, started_at=now, heartbeat_at=now)

    def describe(self) -> str:
        return f"{self.host}:{self.pid} (run started {self.started_at.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC)"

    def is_stale(self, ttl_s: float) -> bool:
        """Its run is gone: a dead process on this host, or no heartbeat for ``ttl_s`` (any host)."""
        if self.host == socket.gethostname() and not _alive(self.pid):
            return True
        return (_now() - self.heartbeat_at).total_seconds() > ttl_s


class StageLease:
    """The lease on one stage folder, held for a ``with`` block: entering waits for a live
    holder (or takes over a stale one), a thread heartbeats while inside, leaving lets go."""

    def __init__(self, out: StageDir, stage: str, cfg: LeaseConfig):
        self.place = out.parent()
        self.file = f"{out.name}.lease"
        self.uri = join_uri(self.place.uri, self.file)
        self.stage = stage
        self.cfg = cfg
        self.me = Holder.this_run()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease-{stage}", daemon=True)

    def __enter__(self) -> StageLease:
        self._acquire()
        self._beat.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._beat.join()  # no refresh may land after the delete and bring the file back
        try:
            if self._ours(self._read(self.file)):
                self.place.delete(self.file)
        except OSError as exc:  # the stage's own outcome stands; other runs take the lease once it is stale
            warnings.warn(f"could not release the lease {self.uri} ({exc})", RuntimeWarning)

    def ensure_held(self) -> None:
        """Raise unless this run still holds the lease: checked before the manifest is written,
        so a run that was taken over never completes a stage another run is writing."""
        current = self._read(self.file)
        if not self._ours(current):
            raise StageError(self._lost(current))

    def _acquire(self) -> None:
        deadline = time.monotonic() + self.cfg.wait_s
        announced: str | None = None
        while True:
            holder = self._read(self.file)
            free = holder is None or holder.is_stale(self.cfg.ttl_s)
            if free and self._claim(holder):
                return
            if not free and holder.token != announced:
                print(f"stage '{self.stage}' is being written by {holder.describe()}; waiting "
                      f"(up to {self.cfg.wait_s:g}s, lease.wait_s)", flush=True)
                announced = holder.token
            if time.monotonic() >= deadline:
                who = holder.describe() if holder else "another run"
                raise StageError(
                    f"stage '{self.stage}' is still being written by {who} after waiting {self.cfg.wait_s:g}s "
                    f"(lease file {self.uri}); raise lease.wait_s to wait longer, or delete the lease file "
                    f"if that run is gone"
                )
            time.sleep(POLL_S)

    def _claim(self, stale: Holder | None) -> bool:
        """Create the lease when there is none, or take over ``stale``: the exclusive marker
        admits one taker, which rewrites the lease only if it is still the stale one (a late
        taker that read it before an earlier takeover finds the new holder instead)."""
        if stale is None:
            return self.place.create_exclusive(self.file, self._fresh())
        marker = f"{self.file}.{stale.token}.takeover"
        if not self.place.create_exclusive(marker, self._fresh()):
            self._drop_if_stale(marker)  # a taker that died between its two steps
            return False
        try:
            current = self._read(self.file)
            if current is None or current.token != stale.token:
                return False
            self.place.write_bytes_atomic(self.file, self._fresh())
            return True
        finally:
            self.place.delete(marker)

    def _drop_if_stale(self, marker: str) -> None:
        found = self._read(marker)
        if found is not None and found.is_stale(self.cfg.ttl_s):
            self.place.delete(marker)

    def _heartbeat(self) -> None:
        """Refresh the lease until released; stop for good once it is no longer ours."""
        while not self._stop.wait(self.cfg.heartbeat_s):
            try:
                current = self._read(self.file)
                if not self._ours(current):
                    warnings.warn(self._lost(current), RuntimeWarning)
                    return
                self.place.write_bytes_atomic(self.file, self._fresh())
            except OSError as exc:  # a store outage: the next beat tries again
                warnings.warn(f"lease {self.uri}: heartbeat failed ({exc})", RuntimeWarning)

    def _fresh(self) -> bytes:
        """This run's record with the heartbeat set to now."""
        self.me = self.me.model_copy(update={"heartbeat_at": _now()})
        return self.me.model_dump_json().encode()

    def _ours(self, holder: Holder | None) -> bool:
        return holder is not None and holder.token == self.me.token

    def _lost(self, current: Holder | None) -> str:
        now = f"now held by {current.describe()}" if current else "the file is gone"
        return (f"stage '{self.stage}': this run lost its lease {self.uri} ({now}): another run took it over "
                f"once its heartbeat was older than lease.ttl_s, or it was deleted; this run does not write "
                f"the manifest")

    def _read(self, file: str) -> Holder | None:
        data = self.place.read_bytes(file)
        if data is None:
            return None
        try:
            return Holder.model_validate_json(data)
        except ValidationError as exc:
            raise StageError(
                f"{join_uri(self.place.uri, file)} is not a lease record ({exc.error_count()} problems); "
                f"delete it if no run is writing stage '{self.stage}'"
            ) from exc
