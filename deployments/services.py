"""Crucible's services on one machine: Prefect server + process worker, MLflow server, 2-node Ray,
an S3-compatible object store.

    python -m deployments.services up      # start what is not running, wait until it answers
    python -m deployments.services down    # stop everything this script started
    python -m deployments.services status
    python -m deployments.services stop NAME | start NAME   # one service (e.g. mlflow)

Everything lives under ``$CRUCIBLE_HOME/services`` (default ``.crucible/services``): one
``<name>.pid`` and ``<name>.log`` per process, the Prefect and MLflow databases, MLflow's
artifacts, Ray's session files. ``up`` is idempotent (a live pid is left alone), registers
``prefect.yaml``'s deployments, and writes the variables that point Crucible at the services
to ``services/env`` (shell syntax, for ``source``). Ports come from ``CRUCIBLE_PREFECT_PORT``,
``CRUCIBLE_MLFLOW_PORT``, ``CRUCIBLE_RAY_PORT`` and ``CRUCIBLE_S3_PORT``; servers listen on
127.0.0.1 only.

The object store is moto's S3 server, in memory (its objects go when it stops), with the bucket
``S3_BUCKET``; the env file's ``AWS_*`` variables point every S3 client at it (pyarrow's, so
``store: s3://crucible/store``), the Ray nodes and the Prefect worker included.

Each process starts in its own session, so stopping one is a signal to its process group:
``ray start --block`` tears its node down on SIGTERM. ``ray stop`` is not used because it
stops every Ray on the host, not only ours.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.paths import state_dir

PROJECT_DIR = Path(__file__).resolve().parents[1]
POOL = "crucible"
WORKER_NAME = "crucible-local"
CRASH_DETECTION = PROJECT_DIR / "deployments" / "crash_detection.yaml"  # Prefect marks dead runs Crashed
# How often flow runs beat, and how long without a beat before a run is marked Crashed (defaults:
# 30 s, Prefect's shortest, and the automation file's 120 s). Shorter windows catch a dead run
# sooner; the window must hold at least two beats, or a live run would be marked Crashed between them.
HEARTBEAT_S, CRASH_AFTER_S = "CRUCIBLE_HEARTBEAT_S", "CRUCIBLE_CRASH_AFTER_S"
CRASH_DETECTION_NAME = "crash-silent-flow-runs"
NODE2_RESOURCE = "crucible_node2"  # only the second Ray node has it: tests can place work there
BIN = Path(sys.executable).parent  # prefect, mlflow and ray live beside this interpreter
# Unix socket paths are limited to 107 bytes; Ray puts ~60 more under its temp dir.
MAX_RAY_TEMP_DIR = 45
RAY_LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray stays on 127.0.0.1 (see ``services``)
S3_BUCKET = "crucible"
S3_CREDENTIALS = {  # moto takes any key; AWS clients insist on having one
    "AWS_ACCESS_KEY_ID": "crucible",
    "AWS_SECRET_ACCESS_KEY": "crucible",
    "AWS_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


@dataclass(frozen=True)
class Layout:
    """Where the services keep their files, and the ports they listen on."""

    root: Path
    prefect_port: int
    mlflow_port: int
    ray_port: int
    s3_port: int

    @classmethod
    def from_env(cls) -> Layout:
        root = state_dir() / "services"
        saved = read_env_file(root / "env")
        return cls(
            root=root,
            prefect_port=int(os.environ.get("CRUCIBLE_PREFECT_PORT") or saved.get("CRUCIBLE_PREFECT_PORT", 4280)),
            mlflow_port=int(os.environ.get("CRUCIBLE_MLFLOW_PORT") or saved.get("CRUCIBLE_MLFLOW_PORT", 5080)),
            ray_port=int(os.environ.get("CRUCIBLE_RAY_PORT") or saved.get("CRUCIBLE_RAY_PORT", 6380)),
            s3_port=int(os.environ.get("CRUCIBLE_S3_PORT") or saved.get("CRUCIBLE_S3_PORT", 9080)),
        )

    @property
    def ray_temp_dir(self) -> Path:
        """``services/ray`` when short enough for Ray's sockets, else a short folder under /tmp."""
        here = self.root / "ray"
        if len(str(here)) <= MAX_RAY_TEMP_DIR:
            return here
        return Path("/tmp") / f"crucible-ray-{self.ray_port}"

    def s3_env(self) -> dict[str, str]:
        """The AWS SDK's standard settings that send S3 clients (pyarrow's, boto's) to the object store."""
        return object_store_env(f"http://127.0.0.1:{self.s3_port}")

    def client_env(self) -> dict[str, str]:
        """What a process needs to run Crucible against these services."""
        return {
            **self.s3_env(),
            "PREFECT_API_URL": f"http://127.0.0.1:{self.prefect_port}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.mlflow_port}",
            "RAY_ADDRESS": f"127.0.0.1:{self.ray_port}",
            RAY_LOOPBACK: "0",
            "CRUCIBLE_PROJECT_DIR": str(PROJECT_DIR),
            "CRUCIBLE_HOME": str(state_dir()),
            "CRUCIBLE_PREFECT_PORT": str(self.prefect_port),
            "CRUCIBLE_MLFLOW_PORT": str(self.mlflow_port),
            "CRUCIBLE_RAY_PORT": str(self.ray_port),
            "CRUCIBLE_S3_PORT": str(self.s3_port),
        }


def object_store_env(endpoint: str) -> dict[str, str]:
    """Settings for an S3-compatible server at ``endpoint`` with the dummy credentials it accepts."""
    return {"AWS_ENDPOINT_URL": endpoint, **S3_CREDENTIALS}


def create_bucket(env: dict[str, str], bucket: str) -> None:
    """Create ``bucket`` on the server ``env`` (``object_store_env``) names; one that exists is kept."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_REGION"],
        endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True,
    )
    fs.create_dir(bucket)


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of a ``services/env`` file (empty when there is none)."""
    if not path.exists():
        return {}
    pairs = (shlex.split(line.removeprefix("export "))[0] for line in path.read_text().splitlines() if "=" in line)
    return dict(pair.split("=", 1) for pair in pairs)


def _base_env() -> dict[str, str]:
    return {
        **os.environ,
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }


@dataclass(frozen=True)
class Service:
    """One long-running process: how to start it and how to tell that it answers."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    env: dict[str, str]
    timeout_s: float = 600.0  # a first start creates databases; CI machines can be slow
    then: Callable[[], None] | None = None  # once it answers: what it needs before use (the bucket)


def services(layout: Layout) -> list[Service]:
    """In start order; ``down`` stops them in reverse."""
    root = layout.root
    client = layout.client_env()
    prefect_env = {**_base_env(), "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": client["PREFECT_API_URL"]}
    ray_common = ["--disable-usage-stats", "--object-store-memory", str(300 * 1024**2), "--block"]
    # Loopback only: with clusters "disabled" Ray keeps 127.0.0.1 instead of the host's outward
    # address (drivers get the same switch through ``client_env``); the second node, which
    # needs clusters enabled, joins through ``deployments/ray_node.py``. No auth token on a
    # cluster nothing outside this host can reach. RAY_ADDRESS: Ray's own helpers inside our
    # workers (e.g. Ray Train's placement-group cleaner) look the cluster up by it; without it
    # they give up when another Ray runs on the host ("Found multiple active Ray instances").
    # The nodes' workers open the store too: they get the object store's settings.
    ray_env = {**_base_env(), **layout.s3_env(), "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": client["RAY_ADDRESS"]}
    s3_endpoint = layout.s3_env()["AWS_ENDPOINT_URL"]
    return [
        Service(
            "s3",
            [str(BIN / "moto_server"), "--host", "127.0.0.1", "--port", str(layout.s3_port)],
            lambda: _answers(f"{s3_endpoint}/moto-api/data.json"),
            _base_env(),
            then=lambda: create_bucket(layout.s3_env(), S3_BUCKET),
        ),
        Service(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(layout.prefect_port)],
            lambda: _answers(f"{client['PREFECT_API_URL']}/health"),
            prefect_env,
        ),
        Service(
            "mlflow",
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(layout.mlflow_port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
             "--artifacts-destination", str(root / "mlflow" / "artifacts"), "--serve-artifacts", "--workers", "1"],
            lambda: _answers(f"{client['MLFLOW_TRACKING_URI']}/health"),
            # No job runner: Crucible queues no MLflow server jobs, and its seven consumer
            # processes cost 2-core machines seconds at start and the 30 s grace at every stop.
            {**_base_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        ),
        Service(
            "ray-head",
            [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(layout.ray_port), "--num-cpus", "2",
             "--temp-dir", str(layout.ray_temp_dir), "--include-dashboard", "false",
             "--dashboard-agent-listen-port", str(_free_port()), *ray_common],
            lambda: _ray_nodes_alive(client["RAY_ADDRESS"]) >= 1,
            {**ray_env, RAY_LOOPBACK: "0"},
        ),
        Service(
            "ray-node2",
            [sys.executable, "-m", "deployments.ray_node", "start", "--address", client["RAY_ADDRESS"], "--num-cpus", "1",
             "--resources", json.dumps({NODE2_RESOURCE: 1}),
             "--dashboard-agent-listen-port", str(_free_port()), *ray_common],
            lambda: _ray_nodes_alive(client["RAY_ADDRESS"]) >= 2,
            {**ray_env, RAY_LOOPBACK: "1"},
        ),
        Service(
            "prefect-worker",
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--name", WORKER_NAME],
            lambda: _worker_online(client["PREFECT_API_URL"]),
            # The worker's flow runs inherit this: they reach Ray and MLflow, and run from the
            # checkout; they beat every $CRUCIBLE_HEARTBEAT_S, which CRASH_DETECTION watches for.
            {**prefect_env, **client, "PREFECT_WORKER_QUERY_SECONDS": "2",
             "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(_heartbeat_s())},
        ),
    ]


def _heartbeat_s() -> int:
    beat = int(os.environ.get(HEARTBEAT_S, "30"))
    if beat < 30:
        raise SystemExit(f"{HEARTBEAT_S}={beat}: Prefect's flow runs beat every 30 s at the most often")
    return beat


def _crash_detection(layout: Layout) -> Path:
    """CRASH_DETECTION with its window from $CRUCIBLE_CRASH_AFTER_S, written beside the services' logs."""
    import yaml

    spec = yaml.safe_load(CRASH_DETECTION.read_text())
    after = int(os.environ.get(CRASH_AFTER_S, spec["trigger"]["within"]))
    if after < 2 * _heartbeat_s():
        raise SystemExit(f"{CRASH_AFTER_S}={after} must be at least twice {HEARTBEAT_S}={_heartbeat_s()}")
    spec["trigger"]["within"] = after
    spec["description"] = f"Mark a Running flow run Crashed when it sends no heartbeat for {after} s"
    spec["actions"][0]["message"] = f"no heartbeat for {after} s: its process is gone"
    path = layout.root / CRASH_DETECTION.name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _ray_nodes_alive(address: str) -> int:
    """Alive nodes of the cluster, asked from a short-lived driver (0 while the head is down)."""
    host, port = address.rsplit(":", 1)
    if not _port_open(host, int(port)):
        return 0
    probe = (
        "import ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
        "print('ALIVE', sum(n['Alive'] for n in ray.nodes()))"
    )
    out = subprocess.run([sys.executable, "-c", probe % address], capture_output=True, text=True,
                         env={**_base_env(), RAY_LOOPBACK: "0"}, timeout=120)
    counts = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("ALIVE ")]
    return int(counts[-1]) if counts else 0


def _worker_online(api_url: str) -> bool:
    """The worker has sent a heartbeat to the server (it polls the pool from then on)."""
    request = urllib.request.Request(
        f"{api_url}/work_pools/{POOL}/workers/filter", data=b"{}", method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            workers = json.load(response)
    except OSError:
        return False
    return any(w["name"] == WORKER_NAME and w["status"] == "ONLINE" for w in workers)


def _automation_names(api_url: str) -> set[str]:
    request = urllib.request.Request(f"{api_url}/automations/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return {a["name"] for a in json.load(response)}


# ---------------------------------------------------------------------------------- processes


def _pid_file(layout: Layout, name: str) -> Path:
    return layout.root / f"{name}.pid"


def running_pid(layout: Layout, name: str) -> int | None:
    """The pid of a service this script started, if that process is still alive."""
    path = _pid_file(layout, name)
    if not path.exists():
        return None
    pid = int(path.read_text())
    if not _alive(pid):
        path.unlink()
        return None
    return pid


def _alive(pid: int) -> bool:
    try:  # our own child that exited is a zombie until reaped here
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def launch(layout: Layout, service: Service) -> None:
    """Start one service in its own session unless it runs already."""
    if running_pid(layout, service.name) is not None:
        return
    with open(layout.root / f"{service.name}.log", "ab") as out:
        process = subprocess.Popen(
            service.argv, env=service.env, cwd=PROJECT_DIR, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    _pid_file(layout, service.name).write_text(str(process.pid))


def wait_ready(layout: Layout, service: Service, attempts: int = 3) -> None:
    """Return once the service answers; start it again if it dies while starting.

    On an overloaded machine Ray's node start gives up after 30 s; a second try usually passes.
    """
    log = layout.root / f"{service.name}.log"
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        while not service.ready():
            if running_pid(layout, service.name) is None:
                break
            if time.monotonic() - started > service.timeout_s:
                raise RuntimeError(f"{service.name} did not answer within {service.timeout_s:.0f}s; see {log}")
            time.sleep(1)
        else:
            if service.then is not None:
                service.then()
            seconds = time.monotonic() - started
            print(f"  {service.name:<15} up   (pid {running_pid(layout, service.name)}, ready after {seconds:.1f}s)", flush=True)
            return
        if attempt < attempts:
            print(f"  {service.name:<15} exited while starting; starting it again", flush=True)
            launch(layout, service)
    tail = "\n".join(log.read_text().splitlines()[-30:])
    raise RuntimeError(f"{service.name} exited {attempts} times while starting; end of {log}:\n{tail}")


def stop(layout: Layout, name: str, sig: signal.Signals = signal.SIGTERM, grace_s: float = 30.0) -> bool:
    """Signal a service's process group, wait for it to go, then SIGKILL what is left."""
    pid = running_pid(layout, name)
    if pid is None:
        return False
    for signum, wait in ((sig, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.2)
        if not _group_alive(pid):
            break
    _pid_file(layout, name).unlink(missing_ok=True)
    return True


def _group_alive(pgid: int) -> bool:
    _alive(pgid)  # reaps the leader if it is our child
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------------------------- commands


def _prefect(layout: Layout, *args: str) -> subprocess.Popen:
    """Start a ``prefect`` command against the server; its output goes to ``services/prefect-cli.log``."""
    env = {**services(layout)[0].env, **layout.client_env()}
    with open(layout.root / "prefect-cli.log", "ab") as log:
        return subprocess.Popen([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=PROJECT_DIR,
                                stdout=log, stderr=subprocess.STDOUT)


def _finish(command: subprocess.Popen, layout: Layout) -> None:
    if command.wait() != 0:
        raise RuntimeError(f"{' '.join(command.args[1:])} failed; see {layout.root / 'prefect-cli.log'}")


def write_env(layout: Layout) -> dict[str, str]:
    """Write ``services/env``, the variables that point Crucible at the services; return them."""
    env = layout.client_env()
    layout.root.mkdir(parents=True, exist_ok=True)
    (layout.root / "env").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    return env


def up(layout: Layout) -> dict[str, str]:
    """Start every service, create the work pool and the crash-detection automation, deploy
    ``prefect.yaml``; write ``services/env``.

    The Ray nodes start first, one after the other, while the machine is otherwise quiet: a
    Ray node that cannot register within 30 s gives up. Then the object store (seconds) and
    its bucket, then the servers side by side.
    """
    for folder in ("prefect", "mlflow/artifacts"):
        (layout.root / folder).mkdir(parents=True, exist_ok=True)
    env = write_env(layout)
    s3, prefect, mlflow, head, node2, worker = services(layout)
    for node in (head, node2):
        launch(layout, node)
        wait_ready(layout, node)
    launch(layout, s3)
    wait_ready(layout, s3)
    launch(layout, prefect)
    launch(layout, mlflow)
    wait_ready(layout, prefect)
    _finish(_prefect(layout, "work-pool", "create", POOL, "--type", "process", "--overwrite"), layout)
    if CRASH_DETECTION_NAME not in _automation_names(env["PREFECT_API_URL"]):  # a restart keeps the server's
        _finish(_prefect(layout, "automation", "create", "--from-file", str(_crash_detection(layout))), layout)
    deploying = _prefect(layout, "deploy", "--all")
    launch(layout, worker)
    wait_ready(layout, mlflow)
    wait_ready(layout, worker)
    _finish(deploying, layout)
    print("  deployments     prefect.yaml deployed to work pool 'crucible'")
    return env


def down(layout: Layout) -> None:
    for service in reversed(services(layout)):
        if stop(layout, service.name):
            print(f"  {service.name:<15} stopped")


def status(layout: Layout) -> bool:
    alive = True
    for service in services(layout):
        pid = running_pid(layout, service.name)
        alive &= pid is not None
        print(f"  {service.name:<15} {'up' if pid else 'down':<5} {pid or ''}")
    return alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.services", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "start", "stop"])
    parser.add_argument("service", nargs="?", help="for start/stop: the service, e.g. mlflow")
    args = parser.parse_args(argv)
    layout = Layout.from_env()
    by_name = {s.name: s for s in services(layout)}
    if args.command in ("start", "stop") and args.service not in by_name:
        parser.error(f"{args.command} needs one of: {', '.join(by_name)}")
    if args.command == "up":
        env = up(layout)
        print(f"\nServices are up. Point Crucible at them (written to {layout.root / 'env'}):")
        print("".join(f"  export {k}={shlex.quote(v)}\n" for k, v in env.items() if not k.startswith("CRUCIBLE_")))
        print(f"Prefect UI: http://127.0.0.1:{layout.prefect_port}   MLflow UI: {env['MLFLOW_TRACKING_URI']}")
        print(f"Object store: {env['AWS_ENDPOINT_URL']} (in memory), for a config's `store: s3://{S3_BUCKET}/store`")
    elif args.command == "down":
        down(layout)
    elif args.command == "status":
        return 0 if status(layout) else 1
    elif args.command == "stop":
        stop(layout, args.service)
    else:
        launch(layout, by_name[args.service])
        wait_ready(layout, by_name[args.service])
    return 0


if __name__ == "__main__":
    sys.exit(main())
