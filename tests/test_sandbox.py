"""The code sandbox: runaway, hostile or broken programs become failed samples, never a crashed stage."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from tasks.eval.code_exec import CodeRow, CodeSuite
from tasks.eval.sandbox import SandboxLimits, run_program
from tasks.eval.suite import EvalSettings

LIMITS = SandboxLimits(timeout_s=3, memory_mb=256)
# Kernel isolation where this machine allows it, and the audit-hook fallback everywhere.
MODES = [pytest.param(True, id="namespaces"), pytest.param(False, id="audit-hook")]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox confines with Linux facilities")


def limits(namespaces: bool) -> SandboxLimits:
    return LIMITS.model_copy(update={"namespaces": namespaces})


def test_a_clean_program_passes_and_may_use_its_directory():
    result = run_program("open('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())\n", LIMITS)
    assert result.status == "passed", result.stderr
    assert result.stdout.strip() == "kept"
    assert "rlimits" in result.isolation


def test_infinite_loop_is_stopped():
    result = run_program("while True:\n    pass\n", LIMITS)
    assert result.status == "timeout", (result.status, result.stderr)
    assert result.duration_s < LIMITS.timeout_s + 5


def test_processes_the_program_started_die_with_it():
    marker = "31337.25"  # a sleep nobody else runs
    program = f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\nwhile True:\n    pass\n"
    result = run_program(program, LIMITS)
    assert result.status == "timeout"
    if "pid-namespace" not in result.isolation:
        pytest.skip("no PID namespace here: the audit hook refuses to start the process instead")
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            alive.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            continue
    assert not [c for c in alive if marker.encode() in c]


def test_memory_bomb_hits_the_limit():
    program = "blocks = []\nwhile True:\n    blocks.append(bytearray(10**8))\n"
    result = run_program(program, LIMITS.model_copy(update={"timeout_s": 20}))
    assert result.status == "memory_limit", (result.status, result.stderr)
    assert "MemoryError" in result.detail


def test_output_flood_is_capped():
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", LIMITS.model_copy(update={"max_file_mb": 1}))
    assert result.status == "output_limit"
    assert len(result.stdout) <= 2000


@pytest.mark.parametrize("namespaces", MODES)
def test_writing_outside_the_directory_fails(tmp_path, namespaces):
    target = tmp_path / "escape.txt"
    tmp_path.chmod(0o777)  # even a world-writable folder is out of reach
    result = run_program(f"open({str(target)!r}, 'w').write('got out')\n", limits(namespaces))
    assert result.status == "failed", (result.status, result.stderr)
    assert "PermissionError" in result.detail or "Read-only file system" in result.detail
    assert not target.exists()


@pytest.mark.parametrize("namespaces", MODES)
def test_network_is_unreachable(namespaces):
    server = socket.create_server(("127.0.0.1", 0))  # on the host's loopback; the kernel queues any connection
    port = server.getsockname()[1]
    program = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\n"
    result = run_program(program, limits(namespaces))
    server.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing ever connected
        server.accept()
    server.close()
    assert result.status == "failed", (result.status, result.stderr)
    expected = "network-namespace" if namespaces and "network-namespace" in result.isolation else "audit-hook"
    assert expected in result.isolation


class _ScriptedModel:
    """Stands in for a language model: replies with fixed completions (the sandbox is under test)."""

    def __init__(self, completions: list[str]):
        self.completions = completions

    def generate(self, prompts, *, samples, **_):
        return [self.completions[:samples] for _ in prompts]


def test_hostile_completions_are_failed_samples_and_pass_at_k_counts_the_good_one(tmp_path):
    row = CodeRow(
        id="1", task_id="t/0", entry_point="double",
        prompt="def double(x):\n    \"\"\"Return twice x.\"\"\"\n",
        test="def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-1) == -2\n",
    )
    completions = [
        "    return 2 * x\n",
        "    while True:\n        pass\n",
        "    return bytearray(10**10)\n",
        f"    open({str(tmp_path / 'out.txt')!r}, 'w').write('x')\n    return 2 * x\n",
        "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n    return 2 * x\n",
    ]
    suite = CodeSuite(name="code", path="unused.jsonl", samples=5, k=[1, 5], temperature=0.8)
    out = suite.evaluate(_ScriptedModel(completions), [row], EvalSettings(sandbox=LIMITS.model_copy(update={"timeout_s": 6})))
    statuses = [s["status"] for s in out.samples]
    assert statuses == ["passed", "timeout", "memory_limit", "failed", "failed"]
    assert out.metrics["pass@1"] == pytest.approx(0.2)
    assert out.metrics["pass@5"] == 1.0
    assert out.metrics["sandbox.timeout"] == pytest.approx(0.2)
    assert not (tmp_path / "out.txt").exists()
