"""Run untrusted generated code: a separate, confined process per program, and a verdict.

``run_program(source, limits)`` writes ``source`` into a throwaway working directory and runs it
with ``tasks/eval/sandbox_boot.py``, which confines the process before the program starts
(network, filesystem, process and resource layers; see that module). What is enforced here, in
the parent:

- **wall clock**: past ``timeout_s`` the whole process group is killed (with a PID namespace,
  every process the program started dies with it);
- **output**: stdout/stderr go to files capped by ``RLIMIT_FSIZE``, never to memory;
- **cleanup**: the working directory is removed afterwards, whatever the program left there.

Every outcome is a ``SandboxResult``: a program that loops, exhausts memory, writes outside its
directory or opens a socket is a failed sample (``timeout``, ``memory_limit``, ``failed``), never
an exception in the caller. ``SandboxResult.isolation`` lists the layers that were in force.
"""

from __future__ import annotations

import json
import math
import os
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


def _tail(path: Path) -> str:
    with path.open("rb") as src:
        src.seek(max(0, path.stat().st_size - OUTPUT_TAIL * 4))
        return src.read().decode("utf-8", errors="replace")[-OUTPUT_TAIL:]


def _signal_of(returncode: int) -> int | None:
    """The signal that ended the program: negative codes come from Python, 128+n from PID 1's parent."""
    if returncode < 0:
        return -returncode
    if returncode > 128:
        return returncode - 128
    return None


def _status(returncode: int, timed_out: bool, stderr: str) -> Status:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
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


def run_program(source: str, limits: SandboxLimits) -> SandboxResult:
    """Run ``source`` as a Python program under ``limits``; never raises for what the program does."""
    base = Path(tempfile.mkdtemp(prefix="crucible-sandbox-"))
    report_r, report_w = os.pipe()
    try:
        work = base / "work"
        work.mkdir()
        program = work / "program.py"
        program.write_text(source, encoding="utf-8")
        root = os.geteuid() == 0
        if root:  # the program runs as nobody: it must reach and own its directory, and nothing else
            base.chmod(0o711)
            os.chown(work, NOBODY, NOBODY)
            os.chown(program, NOBODY, NOBODY)
        spec = {
            "workdir": str(work),
            "program": str(program),
            "report_fd": report_w,
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
        started = time.monotonic()
        with (base / "stdout").open("wb") as out, (base / "stderr").open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(BOOT), json.dumps(spec)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work, env=env,
                pass_fds=(report_w,), start_new_session=True,
            )
        os.close(report_w)
        report_w = -1
        timed_out = False
        try:
            returncode = proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            returncode = proc.wait()
        _kill_group(proc.pid)  # anything the program left behind in its group
        duration = time.monotonic() - started
        with os.fdopen(report_r, "r") as report:
            report_r = -1
            text = report.read()
        isolation = json.loads(text)["isolation"] if text else []
        stderr = _tail(base / "stderr")
        return SandboxResult(
            status=_status(returncode, timed_out, stderr), returncode=returncode, duration_s=duration,
            stdout=_tail(base / "stdout"), stderr=stderr, isolation=isolation,
        )
    finally:
        for fd in (report_r, report_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)
