"""The child side of the code sandbox: confine this process, then run the untrusted program.

Run as ``python -I sandbox_boot.py SPEC_JSON`` by ``tasks/eval/sandbox.py`` (never imported
by Crucible: it is standard library only, so each sample starts in milliseconds). The layers,
each applied when the kernel allows it and reported back on the ``report_fd`` pipe before the
program runs:

- ``network-namespace``: a fresh network namespace (only a loopback, down): no connection
  can be made to anything, the host's own loopback included.
- ``read-only-mounts``: a private mount namespace in which every mount is bind-remounted
  read-only; only the working directory is bind-mounted writable on top.
- ``pid-namespace``: the program runs as PID 1 of its own PID namespace, with a parent-death
  signal, so killing this process kills every process the program started.
- ``unprivileged-user``: when started as root, the program runs as ``nobody`` with one
  capability, CAP_DAC_READ_SEARCH (read-only access to the interpreter wherever it lives), so it
  cannot undo the mounts and ``RLIMIT_NPROC`` applies. Every other capability is dropped and
  ``no_new_privs`` is set, whatever the layers.
- ``user-namespace``: when not root, the namespaces above are created inside a new user
  namespace where the kernel permits unprivileged ones.
- ``rlimits``: address space (memory), CPU seconds, file size, open files, processes, no cores.
- ``bubblewrap``: when ``tasks/eval/sandbox.py`` starts this process inside Debian's ``bwrap``,
  the namespaces above come from it (``--unshare-all``, ``--die-with-parent``) and so does a
  ``private-filesystem``: only the Python installation and the system's libraries (read-only),
  the working directory (writable), a private ``/tmp``, ``/proc`` and ``/dev`` exist; nothing
  else on the machine (the project, other users' files) can even be named.
- ``audit-hook``: only when a kernel layer is missing, a ``sys.addaudithook`` hook stands in for
  it: sockets, writes outside the working directory, reads outside it and the Python
  installation, and new processes raise ``PermissionError``. A hook is a fallback, not a
  boundary (native code can bypass it), and the report says so.

**Proof of completion.** A pass needs more than exit status 0, which ``sys.exit(0)``,
``os._exit(0)`` or ``raise SystemExit`` inside the program give for free. The parent makes a
random token per run (``secrets``) and hands it over on a pipe that is read and closed here
before confinement: it is never in the program's file, its argv, its environment, a file or a
descriptor the program could read. Only after ``runpy`` has run the program to its last
statement (for code evaluation: ``check(entry_point)`` returned) does this harness write it to
stdout, with ``os.write`` (the program may have replaced ``sys.stdout``), and end the process
with ``os._exit(0)``, so nothing the program left behind (atexit handlers, threads) runs after
the verdict. An exit, exception or signal before that point leaves no token, and the parent
scores the run as failed whatever the exit status.

The token is a local of ``main`` while the program runs, in the same interpreter: an in-process
proof cannot be absolute, so the ``integrity`` part of the audit hook (always installed, whatever
the layers) shuts the routes to another part of the process's memory that need no knowledge of
this file: ``gc.get_objects``/``get_referrers``/``get_referents``, ``sys._current_frames``,
every ``ctypes`` call (raw memory), and opening ``/proc/*/mem``; the process is also made
non-dumpable, so a child it starts cannot read its memory either. What remains is code written
against this harness that walks its own frames' ``f_back`` up to ``main``; that is an attack on
the evaluation, not a mistake a model makes on its way to a right answer, and the kernel layers
still confine it.
"""

from __future__ import annotations

import ctypes
import json
import os
import pkgutil  # noqa: F401 - runpy imports it lazily, when the program's uid may no longer read the stdlib
import re
import resource
import runpy
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS = 1, 4, 8, 38
CAP_DAC_READ_SEARCH = 2
CAPABILITY_VERSION_3 = 0x20080522
# Per-mount flags a bind remount must keep (the kernel locks them inside user namespaces).
_KEPT_FLAGS = {
    "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> bool:
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _mount(source: str | None, target: str, flags: int) -> None:
    encode = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(encode(source), encode(target), None, ctypes.c_ulong(flags), None), f"mount {target}")


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, flags to keep) for every mount this process sees."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            fields = line.split()
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 = space
            kept = 0
            for option in fields[5].split(","):
                kept |= _KEPT_FLAGS.get(option, 0)
            points.append((target, kept))
    return points


def _read_only_except(workdir: str) -> None:
    """Every mount read-only in this (private) mount namespace, then ``workdir`` writable again."""
    _mount(None, "/", MS_REC | MS_PRIVATE)
    for target, kept in _mount_points():
        try:
            _mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
        except OSError:
            pass  # e.g. a mount hidden under another; what it holds stays behind the uid drop
    _mount(workdir, workdir, MS_BIND)  # a bind mount starts with its source's flags: read-only here
    _mount(None, workdir, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    probe = os.path.join("/", f".crucible-sandbox-probe-{os.getpid()}")
    try:  # the root must now refuse writes, or this layer is not in force
        with open(probe, "w"):
            pass
    except OSError:
        return
    os.unlink(probe)
    raise OSError("the root filesystem stayed writable")


def _namespaces(workdir: str) -> list[str]:
    """Create what namespaces the kernel allows; return the layers now in force."""
    layers = []
    if os.geteuid() != 0:
        uid, gid = os.geteuid(), os.getegid()
        if not _unshare(CLONE_NEWUSER):
            return layers
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as out:  # keep our own ids, so files can be created
                out.write(text)
        layers.append("user-namespace")
    if _unshare(CLONE_NEWNET):
        layers.append("network-namespace")
    if _unshare(CLONE_NEWNS):
        try:
            _read_only_except(workdir)
            layers.append("read-only-mounts")
        except OSError:
            pass
    if _unshare(CLONE_NEWPID):
        layers.append("pid-namespace")
    return layers


def _run_as_pid_one() -> None:
    """Fork the namespace's PID 1 and wait for it here; exit as it did (128+n for signal n)."""
    child = os.fork()
    if child == 0:
        return
    _, status = os.waitpid(child, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _become(uid: int) -> None:
    """Switch from root to ``uid``, keeping the capability sets for ``_drop_capabilities`` to trim."""
    _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(KEEPCAPS)")
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _drop_capabilities(keep: int) -> None:
    """Keep only the capabilities in the bit mask ``keep``, and let no exec gain any (no_new_privs).

    A root-started program keeps CAP_DAC_READ_SEARCH: the interpreter may live where only root can
    look (e.g. under /root), so reading and path search stay open; writing does not. In a user
    namespace this drops the namespace's full set, without which the mounts could be undone.
    """
    data = (_CapData * 2)(_CapData(keep, keep, 0), _CapData(0, 0, 0))
    _check(_libc.capset(ctypes.byref(_CapHeader(CAPABILITY_VERSION_3, 0)), data), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")


def _limit(spec: dict) -> None:
    mb = 1024 * 1024
    for which, value in (
        (resource.RLIMIT_AS, spec["memory_mb"] * mb),
        (resource.RLIMIT_CPU, spec["cpu_s"]),
        (resource.RLIMIT_FSIZE, spec["max_file_mb"] * mb),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_NPROC, spec["max_processes"]),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


_MEMORY_FILE = re.compile(r"^/proc/[^/]+/(task/[^/]+/)?mem$")
_INTEGRITY_EVENTS = {"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames"}


def _audit_hook(workdir: str, read_roots: list[str], block: set[str]):
    """The audit hook: the ``integrity`` checks always, and the confinement layers named in ``block``
    (``network``, ``writes``, ``reads``, ``processes``) where the kernel does not provide them."""
    root = os.path.realpath(workdir)
    readable = [root, os.devnull] + [os.path.realpath(r) for r in read_roots]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                   "os.symlink", "os.link", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
    process_events = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                      "os.forkpty", "pty.spawn"}

    def under(path, roots) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        real = os.path.realpath(os.fsdecode(path))
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

    def hook(event: str, args: tuple) -> None:
        if event in _INTEGRITY_EVENTS or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is disabled")
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) \
                and _MEMORY_FILE.match(os.path.realpath(os.fsdecode(args[0]))):
            raise PermissionError(f"sandbox: reading process memory is disabled ({args[0]})")
        if not block:
            return
        if "network" in block and event.startswith("socket."):
            raise PermissionError(f"sandbox: network is disabled ({event})")
        if "processes" in block and event in process_events:
            raise PermissionError(f"sandbox: starting processes is disabled ({event})")
        if event == "open" and args[0] is not None:
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & write_flags)
            if writing and "writes" in block and not under(path, [root, os.devnull]):
                raise PermissionError(f"sandbox: writing outside the working directory is disabled ({path})")
            if not writing and "reads" in block and not under(path, readable):
                raise PermissionError(f"sandbox: reading outside the working directory is disabled ({path})")
        elif event in ("os.listdir", "os.scandir") and "reads" in block and args and args[0] is not None \
                and not under(args[0], readable):
            raise PermissionError(f"sandbox: listing outside the working directory is disabled ({args[0]})")
        elif "writes" in block and event in path_events \
                and not all(under(a, [root]) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"sandbox: changing files outside the working directory is disabled ({event})")

    return hook


def _take_token(fd: int) -> bytes:
    """The run's completion token, read whole from its pipe; the descriptor is closed at once."""
    chunks = []
    try:
        while chunk := os.read(fd, 256):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).strip()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - the program may have closed or replaced it
            pass


def main() -> None:
    spec = json.loads(sys.argv[1])
    workdir = spec["workdir"]
    token = _take_token(spec["token_fd"])
    if spec.get("bubblewrap"):  # the namespaces and the filesystem come from bwrap
        layers = ["bubblewrap", "network-namespace", "pid-namespace", "private-filesystem"]
    else:
        layers = _namespaces(workdir) if spec["namespaces"] else []
        if "pid-namespace" in layers:
            _run_as_pid_one()  # from here on: PID 1 of the new namespace
    keep = 0
    if os.geteuid() == 0 and spec["uid"] is not None:
        _become(spec["uid"])
        keep = 1 << CAP_DAC_READ_SEARCH
        layers.append("unprivileged-user")
    _drop_capabilities(keep)
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no other process of this uid may read our memory
    if "pid-namespace" in layers:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # set after the uid change, which clears it
    _limit(spec)
    layers.append("rlimits")
    block = set()
    if "network-namespace" not in layers:
        block.add("network")
    if "read-only-mounts" not in layers and "private-filesystem" not in layers:
        block.add("writes")
    if "private-filesystem" not in layers:
        block.add("reads")
    if "pid-namespace" not in layers:
        block.add("processes")
    sys.addaudithook(_audit_hook(workdir, spec.get("read_roots", []), block))
    if block:
        layers.append("audit-hook")
    with os.fdopen(spec["report_fd"], "w") as report:
        json.dump({"isolation": layers}, report)
    os.chdir(workdir)
    sys.argv = [spec["program"]]
    try:
        runpy.run_path(spec["program"], run_name="__main__")
    except SystemExit as exc:  # an exit before the end is no pass, whatever its code
        _flush()
        sys.stderr.write(f"sandbox: the program exited before its end (SystemExit: {exc.code!r})\n")
        _flush()
        os._exit(exc.code if isinstance(exc.code, int) and exc.code not in (0, None) else 1)
    _flush()  # the program reached its last statement: only now does the token leave this process
    os.write(1, b"\n" + token + b"\n")
    os._exit(0)


if __name__ == "__main__":
    main()
