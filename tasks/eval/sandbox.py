"""Run untrusted generated code: a separate, confined process per program, and a verdict.

``run_program(source, limits)`` writes ``source`` into a throwaway working directory and runs it
with ``tasks/eval/sandbox_boot.py``, which confines the process before the program starts
(network, filesystem, process and resource layers; see that module).

Where Debian's ``bubblewrap`` is installed and can create namespaces here (``bwrap --ro-bind / /
true`` is tried once per process and the answer kept), the boot runs inside ``bwrap``: a new
root holding only the Python installation and the system's libraries (read-only binds), the
working directory (writable), a private ``/tmp``, fresh ``/proc`` and ``/dev``; new network,
PID, IPC, UTS and cgroup namespaces (``--unshare-all``; as root, every one but the user
namespace, so that the boot can still drop to ``nobody`` and ``RLIMIT_NPROC`` counts a real
uid), ``--die-with-parent`` and ``--new-session``. The program cannot read the project or
anything else outside its folder and the interpreter, because nothing else exists in its
filesystem. Without bwrap (or with ``namespaces: false``) the boot's own namespaces and audit
hook stand in, as before.

**A pass is proven, not assumed.** Exit status 0 alone is no pass: ``sys.exit(0)`` before the
tests would give it. Each run gets a fresh ``secrets`` token, handed to the boot on a pipe it
reads and closes before the program starts; the boot writes it to stdout only after the
program's last statement returned (see ``sandbox_boot`` for why the program cannot see it). A
run passes when it exits 0 *and* its stdout ends with that token; the token line is removed from
the ``stdout`` a result shows.

What is enforced here, in the parent:

- **wall clock**: past ``timeout_s`` the whole process group is killed (with a PID namespace,
  every process the program started dies with it);
- **output**: stdout/stderr go to files capped by ``RLIMIT_FSIZE``, never to memory;
- **cleanup**: the working directory is removed afterwards, whatever the program left there.

Every outcome is a ``SandboxResult``: a program that loops, exhausts memory, writes outside its
directory or opens a socket is a failed sample (``timeout``, ``memory_limit``, ``failed``), never
an exception in the caller. ``SandboxResult.isolation`` lists the layers that were in force.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BOOT = Path(__file__).with_name("sandbox_boot.py")
NOBODY = 65534
OUTPUT_TAIL = 2000  # characters of stdout/stderr kept in a result

Status = Literal["passed", "failed", "timeout", "memory_limit", "output_limit", "crashed"]


class SandboxLimits(BaseModel):
    """What one program may use."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(10.0, gt=0, description="wall-clock seconds before the process group is killed")
    memory_mb: int = Field(1024, ge=64, description="address-space limit (RLIMIT_AS)")
    max_file_mb: int = Field(16, ge=1, description="largest file the program may write, its output included (RLIMIT_FSIZE)")
    max_processes: int = Field(32, ge=1, description="processes of the sandbox user (RLIMIT_NPROC; enforced once root is dropped)")
    namespaces: bool = Field(
        True, description="confine with Linux namespaces where the kernel allows; off: rlimits and an audit hook only"
    )


@dataclass
class SandboxResult:
    status: Status
    returncode: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    isolation: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def detail(self) -> str:
        """The last line of stderr (the exception, for a failed test)."""
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


# What a sandboxed program may read besides its folder: the system's executables and libraries.
SYSTEM_ROOTS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc/ld.so.cache", "/etc/ld.so.conf",
                "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime")
NOT_PROVEN = "sandbox: the program ended without reaching its end (no completion token on stdout)"


def _tail(path: Path, drop: bytes = b"") -> str:
    """The end of an output file, without the completion line ``drop`` where it ends the file."""
    with path.open("rb") as src:
        size = path.stat().st_size
        src.seek(max(0, size - OUTPUT_TAIL * 4 - len(drop)))
        data = src.read()
    if drop and data.endswith(drop):
        data = data[: -len(drop)]
    return data.decode("utf-8", errors="replace")[-OUTPUT_TAIL:]


def interpreter() -> str:
    """The Python that runs sandboxed programs: the base installation, not a virtual environment."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def python_roots() -> list[str]:
    """The folders of the (base) Python installation, as real paths, outermost only: never a venv,
    which may live inside the project."""
    paths = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    paths.add(os.path.dirname(os.path.dirname(interpreter())))
    return sorted(p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths))


def _unshare_args(root: bool) -> list[str]:
    # As root, no user namespace: the boot drops to nobody itself, a real uid RLIMIT_NPROC can count.
    if root:
        return ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    return ["--unshare-all"]


@functools.cache
def bubblewrap() -> str | None:
    """``bwrap``'s path when it is installed and can create its namespaces here, else None (asked once).

    Inside some containers unprivileged user namespaces (or any new namespace) are refused: then
    bwrap fails at once and the boot's own layers are used instead.
    """
    path = shutil.which("bwrap")
    if path is None:
        return None
    probe = [path, "--ro-bind", "/", "/", *_unshare_args(os.geteuid() == 0), "--die-with-parent", "true"]
    try:
        done = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if done.returncode == 0 else None


def _bwrap_command(bwrap: str, work: Path, boot: str, root: bool, info_fd: int) -> list[str]:
    """bwrap's arguments: a root with the system, the interpreter and the working directory only."""
    args = [bwrap, *_unshare_args(root), "--die-with-parent", "--new-session", "--info-fd", str(info_fd)]
    if root:  # bwrap leaves no capability by default: the boot needs these to become nobody
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_DAC_READ_SEARCH"]
    for path in SYSTEM_ROOTS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            args += ["--ro-bind", path, path]
    for path in python_roots():
        if not any(path == s or path.startswith(s + "/") for s in SYSTEM_ROOTS if not os.path.islink(s)):
            args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", str(work), str(work),
             "--ro-bind", str(BOOT), boot, "--chdir", str(work), "--"]
    return args


def _ends_with(path: Path, proof: bytes) -> bool:
    with path.open("rb") as src:
        src.seek(max(0, path.stat().st_size - len(proof)))
        return src.read() == proof


def _signal_of(returncode: int) -> int | None:
    """The signal that ended the program: negative codes come from Python, 128+n from PID 1's parent."""
    if returncode < 0:
        return -returncode
    if returncode > 128:
        return returncode - 128
    return None


def _status(returncode: int, timed_out: bool, stderr: str, proven: bool) -> Status:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed" if proven else "failed"
    sig = _signal_of(returncode)
    if sig == signal.SIGXCPU:
        return "timeout"
    if sig == signal.SIGXFSZ or "[Errno 27]" in stderr:  # Python ignores SIGXFSZ: writes fail with EFBIG
        return "output_limit"
    if "MemoryError" in stderr:
        return "memory_limit"
    return "crashed" if sig is not None else "failed"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_namespace(info_r: int) -> None:
    """Kill bwrap's sandbox init (``child-pid`` on its ``--info-fd``): the kernel then kills every
    process of its PID namespace before bwrap itself returns, so none outlives the wait."""
    ready, _, _ = select.select([info_r], [], [], 1.0)
    if not ready:
        return
    try:
        pid = int(json.loads(os.read(info_r, 4096) or b"{}").get("child-pid", 0))
    except (OSError, ValueError):
        return
    if pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_program(source: str, limits: SandboxLimits) -> SandboxResult:
    """Run ``source`` as a Python program under ``limits``; never raises for what the program does."""
    base = Path(tempfile.mkdtemp(prefix="crucible-sandbox-"))
    report_r, report_w = os.pipe()
    token_r, token_w = os.pipe()
    info_r, info_w = os.pipe()
    token = secrets.token_hex(32).encode()
    try:
        os.write(token_w, token)  # 64 bytes: far below a pipe's buffer, never blocks
        os.close(token_w)
        token_w = -1
        work = base / "work"
        work.mkdir()
        program = work / "program.py"
        program.write_text(source, encoding="utf-8")
        root = os.geteuid() == 0
        if root:  # the program runs as nobody: it must reach and own its directory, and nothing else
            base.chmod(0o711)
            os.chown(work, NOBODY, NOBODY)
            os.chown(program, NOBODY, NOBODY)
        bwrap = bubblewrap() if limits.namespaces else None
        spec = {
            "workdir": str(work),
            "program": str(program),
            "report_fd": report_w,
            "token_fd": token_r,
            "bubblewrap": bwrap is not None,
            "read_roots": [*python_roots(), *SYSTEM_ROOTS],
            "uid": NOBODY if root else None,
            "memory_mb": limits.memory_mb,
            "cpu_s": math.ceil(limits.timeout_s) + 1,
            "max_file_mb": limits.max_file_mb,
            "max_processes": limits.max_processes,
            "namespaces": limits.namespaces,
        }
        env = {
            "PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        }
        if bwrap is not None:
            boot = "/crucible/sandbox_boot.py"
            command = [*_bwrap_command(bwrap, work, boot, root, info_w), interpreter(), "-I", boot, json.dumps(spec)]
        else:
            command = [interpreter(), "-I", str(BOOT), json.dumps(spec)]
        started = time.monotonic()
        with (base / "stdout").open("wb") as out, (base / "stderr").open("wb") as err:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work, env=env,
                pass_fds=(report_w, token_r, info_w), start_new_session=True,
            )
        for fd in (report_w, token_r, info_w):
            os.close(fd)
        report_w = token_r = info_w = -1
        timed_out = False
        try:
            returncode = proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            if bwrap is not None:
                _kill_namespace(info_r)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            _kill_group(proc.pid)
            returncode = proc.wait()
        _kill_group(proc.pid)  # anything the program left behind in its group
        duration = time.monotonic() - started
        with os.fdopen(report_r, "r") as report:
            report_r = -1
            text = report.read()
        isolation = json.loads(text)["isolation"] if text else []
        proof = b"\n" + token + b"\n"
        stdout = _tail(base / "stdout", drop=proof)
        proven = _ends_with(base / "stdout", proof)
        stderr = _tail(base / "stderr")
        if returncode == 0 and not timed_out and not proven:
            stderr = (stderr + ("\n" if stderr and not stderr.endswith("\n") else "") + NOT_PROVEN)[-OUTPUT_TAIL:]
        return SandboxResult(
            status=_status(returncode, timed_out, stderr, proven), returncode=returncode, duration_s=duration,
            stdout=stdout, stderr=stderr, isolation=isolation,
        )
    finally:
        for fd in (report_r, report_w, token_r, token_w, info_r, info_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)
