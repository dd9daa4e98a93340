"""One writer per stage folder: the lease ``run_stage`` holds while it writes a stage.

The stage here is ``ingest``'s declaration with a fake body (no Ray): it counts its calls in a
file, so "ran exactly once" holds across processes. Run as a script, this file is one such run
(the two-process test starts two).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import pytest
import yaml

import tasks.engine as engine
import tasks.lease as lease_module
import tasks.registry as registry
import tasks.store as store
from tasks.config import LeaseConfig, PipelineConfig, load_config, validate_config
from tasks.errors import StageError
from tasks.lease import Holder, StageLease
from tasks.stage import Stage, StageContext, StageResult
from tasks.store import StageDir

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def wait_for(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def counting_stage(work: Path, then: Callable[[StageContext], None] | None = None) -> Stage:
    """``ingest`` with a body that appends its pid to ``work/calls``, writes one file, holds
    while ``work/hold`` exists (so a test can keep it mid-write), then runs ``then``."""
    real = registry.STAGES["ingest"]

    def body(ctx: StageContext) -> StageResult:
        with open(work / "calls", "a") as calls:
            calls.write(f"{os.getpid()}\n")
        ctx.out.write_bytes_atomic("data.txt", b"written")
        wait_for(lambda: not (work / "hold").exists())
        if then:
            then(ctx)
        return StageResult(rows=1, report="fake ingest")

    return Stage("ingest", (), real.version, body, real.inputs)


def calls(work: Path) -> list[int]:
    return [int(line) for line in (work / "calls").read_text().split()] if (work / "calls").exists() else []


@pytest.fixture
def work(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture
def config(tmp_home, work) -> PipelineConfig:
    """The tiny config cut to ingest; written to ``work/config.yaml`` for other processes."""
    data = load_config(ROOT / "configs/tiny.yaml").model_dump(mode="json", exclude_none=True)
    data = {k: v for k, v in data.items() if k in {"name", "ingest"}}
    data["lease"] = {"wait_s": 60}
    (work / "config.yaml").write_text(yaml.safe_dump(data))
    return validate_config(data, "tiny (ingest)")


@pytest.fixture
def in_process(monkeypatch):
    """``run_stage`` in this process: no Ray (the fake bodies need none), and waiting runs look
    at the lease often."""
    monkeypatch.setattr(engine, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(lease_module, "POLL_S", 0.05)


@pytest.fixture
def fake_ingest(monkeypatch, work, in_process) -> None:
    monkeypatch.setitem(registry.STAGES, "ingest", counting_stage(work))


@pytest.fixture
def live_pid():
    """A process of this host that stays alive for the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def out_dir(config: PipelineConfig) -> StageDir:
    return engine.plan(config)["ingest"].out


def lease_of(config: PipelineConfig) -> StageLease:
    return StageLease(out_dir(config), "ingest", config.lease)


def current(lease: StageLease) -> Holder | None:
    """Who the lease file names now."""
    data = lease.place.read_bytes(lease.file)
    return Holder.model_validate_json(data) if data is not None else None


def plant(config: PipelineConfig, holder: Holder) -> None:
    """A lease file left by ``holder``, as if another run held the stage."""
    lease = lease_of(config)
    lease.place.write_bytes_atomic(lease.file, holder.model_dump_json().encode())


def holder(pid: int, host: str = HOST, beat_age_s: float = 0.0) -> Holder:
    now = datetime.now(timezone.utc)
    return Holder(host=host, pid=pid, token=f"planted-{pid}", started_at=now - timedelta(hours=1),
                  heartbeat_at=now - timedelta(seconds=beat_age_s))


def short_wait(config: PipelineConfig, **lease) -> PipelineConfig:
    return config.model_copy(update={"lease": LeaseConfig(**{"wait_s": 0.3, **lease})})


def test_two_processes_one_stage_runs_once(config, work):
    """Two OS processes run the same stage at once: one writes it, the other waits, says whom
    it waits for, and reports the stage cached from the first one's manifest."""
    (work / "hold").touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    outputs = [work / f"out{i}.txt" for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, __file__, str(work)], stdout=out.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        for out in outputs
    ]
    try:
        wait_for(lambda: calls(work) and any("is being written by" in out.read_text() for out in outputs))
        assert not any(p.poll() for p in procs), [out.read_text() for out in outputs]
        (work / "hold").unlink()
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    texts = [out.read_text() for out in outputs]
    assert codes == [0, 0], texts
    ran = 0 if "OUTCOME ran" in texts[0] else 1
    assert "OUTCOME ran" in texts[ran] and "OUTCOME cached" in texts[1 - ran], texts
    assert calls(work) == [procs[ran].pid]
    assert f"stage 'ingest' is being written by {HOST}:{procs[ran].pid} (run started " in texts[1 - ran]
    lease = lease_of(config)
    assert not lease.place.exists(lease.file)


@pytest.mark.parametrize("gone", [
    pytest.param(lambda: holder(pid=_exited_pid()), id="dead-pid-on-this-host"),
    pytest.param(lambda: holder(pid=1, host="elsewhere", beat_age_s=600), id="heartbeat-older-than-ttl"),
])
def test_stale_lease_is_taken_over(config, work, fake_ingest, gone):
    plant(config, gone())
    outcome = engine.run_stage(config, "ingest")
    assert outcome.state == "ran" and calls(work) == [os.getpid()]
    lease = lease_of(config)
    assert not lease.place.exists(lease.file)  # released after success
    assert [i.base_name for i in lease.place.fs.get_file_info(pafs.FileSelector(lease.place.root))] == [out_dir(config).name]


def _exited_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_live_holder_past_the_wait_is_an_error(config, work, fake_ingest, live_pid, capsys):
    plant(config, holder(live_pid))
    with pytest.raises(StageError) as err:
        engine.run_stage(short_wait(config), "ingest")
    lease = lease_of(config)
    assert f"still being written by {HOST}:{live_pid} (run started " in str(err.value)
    assert f"lease file {lease.uri}" in str(err.value)
    assert f"stage 'ingest' is being written by {HOST}:{live_pid} (run started " in capsys.readouterr().out
    assert calls(work) == [] and current(lease).pid == live_pid  # the holder's lease is left alone


def test_force_waits_for_the_holder_too(config, work, fake_ingest, live_pid):
    """--force clears the folder only under the lease: a held stage is neither cleared nor rerun."""
    first = engine.run_stage(config, "ingest")
    plant(config, holder(live_pid))
    with pytest.raises(StageError, match=f"still being written by {HOST}:{live_pid}"):
        engine.run_stage(short_wait(config), "ingest", force=True)
    assert engine.plan(config)["ingest"].manifest() == first.manifest and calls(work) == [os.getpid()]


def test_failing_stage_lets_go_of_its_lease(config, work, monkeypatch, in_process):
    def fail(ctx):
        raise RuntimeError("stage body failed")

    monkeypatch.setitem(registry.STAGES, "ingest", counting_stage(work, then=fail))
    with pytest.raises(RuntimeError, match="stage body failed"):
        engine.run_stage(config, "ingest")
    lease = lease_of(config)
    assert not lease.place.exists(lease.file) and engine.plan(config)["ingest"].manifest() is None


@pytest.mark.filterwarnings("ignore:.*lost its lease:RuntimeWarning")  # the heartbeat may notice it first
def test_heartbeat_refreshes_and_a_lost_lease_writes_no_manifest(config, work, monkeypatch, in_process):
    """The holder's heartbeat moves on while it runs; a run whose lease another run took over
    (here: rewritten under it) fails instead of writing the manifest, and leaves that lease be."""
    fast = short_wait(config, ttl_s=0.4, heartbeat_s=0.1)
    lease = lease_of(fast)
    beats: list[datetime] = []

    def watch_then_lose(ctx):
        for _ in range(2):
            beats.append(current(lease).heartbeat_at)
            time.sleep(0.3)
        plant(fast, holder(os.getpid(), host="other"))

    monkeypatch.setitem(registry.STAGES, "ingest", counting_stage(work, then=watch_then_lose))
    with pytest.raises(StageError, match=r"lost its lease .* \(now held by other:"):
        engine.run_stage(fast, "ingest")
    assert beats[1] > beats[0]
    assert engine.plan(fast)["ingest"].manifest() is None and current(lease).host == "other"


def hold_in_turns(out: StageDir, cfg: LeaseConfig, takers: int) -> list[tuple[float, float]]:
    """``takers`` threads enter the lease at once and each keeps it 0.2 s; their (enter, leave) times."""
    start = threading.Barrier(takers)
    spans: list[tuple[float, float]] = []

    def take() -> None:
        start.wait()
        with StageLease(out, "s", cfg):
            entered = time.monotonic()
            time.sleep(0.2)
            spans.append((entered, time.monotonic()))

    threads = [threading.Thread(target=take) for _ in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return sorted(spans)


def object_store(tmp_path) -> StageDir:
    """A store on fsspec's in-memory filesystem: not ``LocalFileSystem``, so the object-store
    code path, and like an object store it shows a written file whole or not at all."""
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    root = f"/{tmp_path.name}/store/s/fp"  # one process-wide memory store: a folder per test
    return StageDir(fs=fs, root=root, uri=f"memory:/{root}")


@pytest.mark.parametrize("where", ["local", "object-store"])
def test_takers_of_a_stale_lease_hold_it_one_at_a_time(tmp_path, monkeypatch, where):
    monkeypatch.setattr(lease_module, "POLL_S", 0.05)
    # On object stores two takers both win when one's look and write are further apart than the
    # settle time (documented best effort): 1.5 s keeps a loaded CI machine's thread switches inside it.
    monkeypatch.setattr(store, "SETTLE_S", 1.5)
    out = StageDir.at(str(tmp_path / "store"), "s", "fp") if where == "local" else object_store(tmp_path)
    cfg = LeaseConfig(wait_s=30)
    lease = StageLease(out, "s", cfg)
    lease.place.write_bytes_atomic(lease.file, holder(_exited_pid()).model_dump_json().encode())
    spans = hold_in_turns(out, cfg, takers=4 if where == "local" else 2)
    assert len(spans) == (4 if where == "local" else 2)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    assert [i.base_name for i in out.fs.get_file_info(pafs.FileSelector(lease.place.root))] == []  # no lease, no marker


@pytest.mark.parametrize("where", ["local", "object-store"])
def test_create_exclusive(tmp_path, monkeypatch, where):
    monkeypatch.setattr(store, "SETTLE_S", 0.0)
    out = StageDir.at(str(tmp_path / "store"), "s", "fp") if where == "local" else object_store(tmp_path)
    assert out.create_exclusive("x", b"first") and not out.create_exclusive("x", b"second")
    assert out.read_bytes("x") == b"first" and out.list_files() == ["x"]  # no temporary left behind


def test_lease_settings_do_not_change_fingerprints(config):
    before = {n: p.fingerprint for n, p in engine.plan(config).items()}
    assert {n: p.fingerprint for n, p in engine.plan(short_wait(config, ttl_s=10, heartbeat_s=1)).items()} == before


if __name__ == "__main__":  # one run of the fake ingest, for test_two_processes_one_stage_runs_once
    folder = Path(sys.argv[1])
    registry.STAGES["ingest"] = counting_stage(folder)
    engine.ensure_ray = lambda cfg: None
    print("OUTCOME", engine.run_stage(load_config(folder / "config.yaml"), "ingest").state, flush=True)
