"""The code sandbox: runaway, hostile or broken programs become failed samples, never a crashed stage."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import tasks.eval.sandbox as sandbox_module
from tasks.eval.code_exec import CodeRow, CodeSuite, program
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
    # refused by the audit hook or a read-only mount, or not there at all (bwrap's private filesystem)
    assert any(why in result.detail for why in ("PermissionError", "Read-only file system", "No such file or directory"))
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


# --- a pass needs proof that the tests ran to the end; the program sees only its folder and Python ---

ROW = CodeRow(
    id="1", task_id="t/0", entry_point="double",
    prompt="def double(x):\n    \"\"\"Return twice x.\"\"\"\n",
    test="def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-1) == -2\n",
)
PROJECT_FILE = Path(__file__).resolve().parents[1] / "README.md"
EXIT_TRICKS = {
    "sys.exit at import": "    return None\nimport sys\nsys.exit(0)\n",
    "sys.exit in the function": "    import sys\n    sys.exit(0)\n",
    "os._exit at import": "    return None\nimport os\nos._exit(0)\n",
    "os._exit in the function": "    import os\n    os._exit(0)\n",
    "raise SystemExit": "    raise SystemExit\n",
    "raise SystemExit(0) at import": "    return None\nraise SystemExit(0)\n",
    "exit from atexit": "    import atexit, os\n    atexit.register(os._exit, 0)\n    raise SystemExit(1)\n",
}


def _no_bwrap(monkeypatch):
    monkeypatch.setattr(sandbox_module, "bubblewrap", lambda: None)


@pytest.fixture(params=["bwrap", "own-namespaces", "audit-hook"])
def mode(request, monkeypatch):
    """Each confinement: bwrap (where usable here), the boot's own namespaces, the audit hook alone."""
    if request.param == "bwrap":
        if sandbox_module.bubblewrap() is None:
            pytest.skip("bubblewrap is not installed or cannot create namespaces here")
        return LIMITS
    _no_bwrap(monkeypatch)
    return limits(request.param == "own-namespaces")


def test_a_correct_completion_passes_and_the_token_stays_out_of_its_output(mode):
    result = run_program(program(ROW, "    print('computing')\n    return 2 * x\n"), mode)
    assert result.status == "passed", (result.stderr, result.isolation)
    assert result.stdout == "computing\ncomputing\n"  # the completion token is not shown


@pytest.mark.parametrize("completion", list(EXIT_TRICKS.values()), ids=list(EXIT_TRICKS))
def test_leaving_before_the_tests_end_is_no_pass(mode, completion):
    result = run_program(program(ROW, completion), mode)
    assert result.status == "failed", (result.status, result.returncode, result.stderr)
    assert "before its end" in result.detail or "no completion token" in result.detail


def test_the_token_is_not_in_argv_environment_or_descriptors(mode):
    # a completion that goes looking for the token everywhere a harness usually leaves things
    snoop = (
        "    import os, sys\n"
        "    seen = ' '.join(sys.argv) + ' '.join(os.environ.values())\n"
        "    for fd in range(3, 256):\n"
        "        try:\n"
        "            seen += os.read(fd, 4096).decode(errors='replace')\n"
        "        except OSError:\n"
        "            pass\n"
        "    for line in open(__file__) if os.path.exists(__file__) else []:\n"
        "        seen += line\n"
        "    print(seen)\n"
        "    os._exit(0)\n"
    )
    result = run_program(program(ROW, snoop), mode)
    assert result.status == "failed", (result.status, result.stderr)


def test_memory_introspection_is_refused(mode):
    for probe in ("import gc\n    gc.get_objects()", "import sys\n    sys._current_frames()",
                  "import ctypes\n    ctypes.string_at(id(x), 8)", "open('/proc/self/mem', 'rb')"):
        result = run_program(program(ROW, f"    {probe}\n    return 2 * x\n"), mode)
        assert result.status == "failed" and "PermissionError" in result.detail, (probe, result.stderr)


def test_reading_the_project_is_refused(mode):
    assert PROJECT_FILE.exists()
    completion = f"    print(open({str(PROJECT_FILE)!r}).read()[:50])\n    return 2 * x\n"
    result = run_program(program(ROW, completion), mode)
    assert result.status == "failed", (result.status, result.stdout, result.isolation)
    assert "Crucible" not in result.stdout
    listing = run_program(f"import os\nprint(os.listdir({str(PROJECT_FILE.parent)!r}))\n", mode)
    assert listing.status == "failed" and "README.md" not in listing.stdout


def test_bwrap_gives_an_empty_world_but_python_and_the_folder():
    if sandbox_module.bubblewrap() is None:
        pytest.skip("bubblewrap is not installed or cannot create namespaces here")
    source = (
        "import os, json, sys\n"
        "open('here.txt', 'w').write('ok')\n"
        "print(json.dumps({'root': sorted(os.listdir('/')), 'tmp': os.listdir('/tmp'), 'pid': os.getpid(),\n"
        "                  'home': os.path.exists(os.path.expanduser('~/here.txt')), 'work': os.path.exists('/work')}))\n"
    )
    result = run_program(source, LIMITS)
    assert result.status == "passed", result.stderr
    seen = json.loads(result.stdout)
    assert "bubblewrap" in result.isolation and "private-filesystem" in result.isolation
    assert seen["home"] and not seen["work"]
    assert "home" not in seen["root"] and seen["pid"] < 10  # its own PID namespace
    assert len(seen["tmp"]) == 1 and seen["tmp"][0].startswith("crucible-sandbox-")  # a private /tmp


def test_bwrap_is_probed_once(monkeypatch):
    calls = []
    sandbox_module.bubblewrap.cache_clear()
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    first = sandbox_module.bubblewrap()
    assert sandbox_module.bubblewrap() == first
    assert len(calls) == (1 if shutil.which("bwrap") else 0)
