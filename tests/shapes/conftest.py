"""The deployment shapes: the system started exactly as README.md and ops/demo.sh start it.

One shape is a server with a secret and an admin API key (no development mode), a CPU
worker on the server's host started with the plain command and the server's settings,
and a GPU box enrolled with ``token issue --broker-user``: its ``morag.env`` in its own
empty folder, nothing of the server's settings in its environment, two processes, run
under a supervisor that restarts it (systemd ``Restart=always``, as the README asks),
and in its own network namespace, so that it reaches the server only over the network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chaos.conftest import PrivateRabbitmq, consumers, private_rabbitmq  # noqa: F401 (fixture)
from tests.conftest import BIN, MANAGEMENT, Stack, fresh_vhost, open_stack, wait_for
from tests.transfer.proxy import CuttingProxy

FINAL = ("done", "failed", "canceled")
#: One line per fault: how many tasks it made and how they ended (printed at the end of the run).
TALLY: list[str] = []


# --- the box's network -------------------------------------------------------------------------


@dataclass
class Network:
    """Where the GPU box runs: a network namespace of its own, joined to the host by a veth pair,
    or, where ``ip netns add`` is refused, the host itself.

    Parameters:
      namespace: the namespace's name (None: the box runs on the host).
      host_address: the server's address as the box sees it.
    """

    namespace: str | None
    host_address: str

    def command(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args] if self.namespace else args


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 in 10.251.0.0/16 that no interface of this host uses."""
    used = _ip("-o", "-4", "addr").stdout
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.251.{random.randrange(256)}.{4 * random.randrange(64)}/30")
        if not any(str(host) in used for host in net):
            return net
    raise RuntimeError("no free /30 in 10.251.0.0/16")


@contextlib.contextmanager
def box_network() -> Iterator[Network]:
    """A namespace with a veth pair (host side .1, box side .2 of a fresh /30), removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    namespace, host_end, box_end = f"morag-shape-{tag}", f"mh{tag}", f"mb{tag}"
    refused = _ip("netns", "add", namespace)
    if refused.returncode != 0:
        message = (
            f"ip netns add was refused ({refused.stderr.strip()}): the GPU box runs on the host, "
            "in its own folder, reaching the server over 127.0.0.1"
        )
        warnings.warn(message, stacklevel=1)
        TALLY.append(f"network: {message}")
        yield Network(None, "127.0.0.1")
        return
    try:
        subnet = _free_subnet()
        host, box = (str(a) for a in list(subnet.hosts())[:2])
        for args in (
            ("link", "add", host_end, "type", "veth", "peer", "name", box_end, "netns", namespace),
            ("addr", "add", f"{host}/30", "dev", host_end),
            ("link", "set", host_end, "up"),
            ("-n", namespace, "addr", "add", f"{box}/30", "dev", box_end),
            ("-n", namespace, "link", "set", box_end, "up"),
            ("-n", namespace, "link", "set", "lo", "up"),
        ):
            done = _ip(*args)
            if done.returncode != 0:
                raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
        yield Network(namespace, host)
    finally:
        _ip("netns", "del", namespace)
        _ip("link", "del", host_end)


# --- the shape --------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The direct children of a process."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


@dataclass
class Shape:
    """The server, the plain CPU worker and the enrolled two-process GPU box of one test run.

    Parameters:
      stack: the server's processes and environment (the server's settings, as on its host).
      network: where the box runs.
      folder: the run's folder; the box's own folder is ``folder/<box_name>``.
      broker_port: the test broker's port on 127.0.0.1.
      broker_user: enroll the box with its own RabbitMQ user (needs the management API).
    """

    stack: Stack
    network: Network
    folder: Path
    broker_port: int
    broker_user: bool = True
    box_name: str = field(default_factory=lambda: f"box1-{uuid.uuid4().hex[:6]}")
    forwarder: CuttingProxy | None = None

    @property
    def box_dir(self) -> Path:
        return self.folder / self.box_name

    @property
    def api(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.stack.env['MORAG_API_KEY']}"}
        return httpx.Client(base_url=self.stack.url, headers=headers, timeout=60)

    # The parts, started as the README says.

    def start_server(self) -> None:
        self.stack.start_server()

    def restart_server(self, **env: str) -> None:
        """Stop the server and start it again; ``env`` adds settings (an empty value removes one)."""
        if "server" in self.stack.processes:
            self.stack.stop("server")
        for key, value in env.items():
            if value:
                self.stack.env[key] = value
            else:
                self.stack.env.pop(key, None)
        self.start_server()

    def start_cpu_worker(self) -> None:
        """``dramatiq pipeline.actors.cpu --queues cpu`` with the server's settings and the shared disk."""
        self.stack.spawn(
            "cpu-worker",
            [str(BIN / "dramatiq"), "pipeline.actors.cpu", "--queues", "cpu"],
            MORAG_FILE_ACCESS="shared",
        )

    def enroll_box(self) -> None:
        """``morag-pipeline token issue ... --env-file box1.env``, copied to the box's folder as morag.env."""
        if (self.box_dir / "morag.env").exists():
            return
        vhost = urllib.parse.urlsplit(self.stack.env["MORAG_BROKER_URL"]).path or "/%2F"
        if self.network.namespace:
            self.forwarder = self.forwarder or CuttingProxy(
                self.broker_port, listen_host=self.network.host_address
            )
            address, port = self.network.host_address, self.forwarder.port
        else:
            address, port = "127.0.0.1", self.broker_port
        credentials = "" if self.broker_user else "guest:guest@"
        env_file = self.folder / f"{self.box_name}.env"
        args = [
            "token",
            "issue",
            "--worker",
            self.box_name,
            "--capability",
            "gpu",
            "--env-file",
            str(env_file),
        ]
        args += ["--broker-url", f"amqp://{credentials}{address}:{port}{vhost}"]
        args += ["--sftp-host", self.network.host_address]
        if self.broker_user:
            args.append("--broker-user")
        proc = self.stack.cli(*args)
        assert proc.returncode == 0, proc.stderr
        self.box_dir.mkdir()
        shutil.copy(env_file, self.box_dir / "morag.env")

    def start_box(self) -> None:
        """``dramatiq pipeline.actors.gpu --queues gpu --processes 2 --threads 2`` in the box's folder,
        in its namespace, restarted whenever it exits (``Restart=always``)."""
        self.enroll_box()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_")}
        env.update(MORAG_DATA_DIR=str(self.box_dir), HOME=str(self.box_dir), PYTHONUNBUFFERED="1")
        supervisor = (
            'while :; do "$0" "$@"; echo "supervisor: dramatiq exited ($?), restarting"; sleep 1; done'
        )
        dramatiq = [str(BIN / "dramatiq"), "pipeline.actors.gpu", "--queues", "gpu"]
        dramatiq += ["--processes", "2", "--threads", "2"]
        log = (self.stack.logs / "box.log").open("ab")
        self.stack.processes["box"] = subprocess.Popen(
            self.network.command(["bash", "-c", supervisor, *dramatiq]),
            cwd=self.box_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill_box(self) -> None:
        """SIGKILL the whole box: the machine is gone."""
        proc = self.stack.processes.pop("box")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_box(self) -> None:
        """Stop the box cleanly (SIGTERM to every process of it, as systemd stops a unit)."""
        proc = self.stack.processes.pop("box")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def box_processes(self) -> list[int]:
        """The box's worker processes: the children of its dramatiq master."""
        masters = children(self.stack.processes["box"].pid)
        return [pid for master in masters for pid in children(master)]

    def ensure(self, box: bool = True) -> None:
        """Whatever a previous fault left stopped is started again; with ``box``, wait for the box."""
        if "server" not in self.stack.processes or self.stack.processes["server"].poll() is not None:
            self.stack.processes.pop("server", None)
            self.start_server()
        if "cpu-worker" not in self.stack.processes or self.stack.processes["cpu-worker"].poll() is not None:
            self.stack.processes.pop("cpu-worker", None)
            self.start_cpu_worker()
        if box and "box" not in self.stack.processes:
            self.start_box()
        if box:
            self.wait_box_alive()

    def wait_box_alive(self, timeout: float = 180) -> None:
        wait_for(f"{self.box_name} alive with 2 consumers on gpu", self._box_alive, timeout, self.stack, 0.5)

    def _box_alive(self) -> bool:
        if consumers(self.stack.env["MORAG_BROKER_URL"], "gpu") < 2:
            return False
        with self.api as api:
            workers = api.get("/api/v1/workers").raise_for_status().json()
        return workers["queues"].get("gpu", {}).get("live", 0) >= 1 and any(
            w["id"] == self.box_name and w["state"] == "alive" for w in workers["workers"]
        )

    # What a user sees.

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.stack.cli(*args, timeout=timeout)

    def submit(self, *files: Path, options: tuple[str, ...] = ()) -> list[str]:
        """``morag-pipeline submit --no-wait``: the task ids it prints."""
        proc = self.cli("submit", "--no-wait", *options, *map(str, files))
        assert proc.returncode == 0, f"submit exited {proc.returncode}: {proc.stderr}"
        return proc.stdout.split()

    def task(self, task_id: str) -> dict[str, Any]:
        with self.api as api:
            return api.get(f"/api/v1/tasks/{task_id}").raise_for_status().json()

    def counts(self) -> dict[str, int]:
        with self.api as api:
            return api.get("/api/v1/tasks", params={"limit": 1}).raise_for_status().json()["counts"]

    def log(self, name: str) -> str:
        return self.stack.log(name)


def check_every_task_ended(
    shape: Shape, fault: str, ids: list[str], timeout: float = 300, canceled: bool = False
) -> dict[str, dict[str, Any]]:
    """Wait for every task to end, then check, task by task, what a user would check: ``done``
    with exactly one output set, or ``failed`` with a reason; the events say so; nothing of
    the whole run is left ``queued`` or ``running``. Returns the tasks by id."""
    assert ids, "the fault made no task"

    def ended() -> bool:
        return all(shape.task(i)["state"] in FINAL for i in ids)

    wait_for(f"{len(ids)} task(s) of '{fault}' to end", ended, timeout, shape.stack, 1.0)
    tasks = {i: shape.task(i) for i in ids}
    ends = {state: sum(t["state"] == state for t in tasks.values()) for state in FINAL}
    TALLY.append(f"{fault}: {len(ids)} task(s), {ends['done']} done, {ends['failed']} failed"
                 + (f", {ends['canceled']} canceled" if ends["canceled"] else "") + ", 0 stuck")  # fmt: skip
    for task_id, task in tasks.items():
        state = task["state"]
        assert state in (("done", "failed", "canceled") if canceled else ("done", "failed")), (task_id, state)
        names = [e["event"] for e in task["events"]]
        assert names.count(state) == 1, f"{task_id}: events {names} should name its end ({state}) once"
        if state == "failed":
            assert (task["error"] or "").strip(), f"{task_id} failed without a reason"
        if state != "done":
            continue
        formats = [o["format"] for o in task["outputs"]]
        assert formats and len(formats) == len(set(formats)), f"{task_id}: outputs {formats}"
        folder = shape.stack.data_dir / "files" / "tasks" / task_id / "output"
        files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        assert files == sorted(Path(o["path"]).name for o in task["outputs"]), (task_id, files)
    counts = shape.counts()
    assert counts["queued"] == 0 and counts["running"] == 0, f"left over: {counts}"
    return tasks


def delete_broker_user(name: str) -> None:
    parts = urllib.parse.urlsplit(MANAGEMENT)
    base = f"{parts.scheme}://{parts.hostname}:{parts.port}"
    with contextlib.suppress(httpx.HTTPError):
        httpx.delete(
            f"{base}/api/users/{urllib.parse.quote(name, safe='')}",
            auth=(parts.username or "guest", parts.password or "guest"),
            timeout=10,
        )


@contextlib.contextmanager
def open_shape(
    folder: Path,
    broker_url: str,
    network: Network,
    broker_user: bool = True,
    request: pytest.FixtureRequest | None = None,
    **server_env: str,
) -> Iterator[Shape]:
    """A shape on ``broker_url`` (a vhost of a broker on 127.0.0.1): the server with an admin key,
    not yet started; everything it starts is stopped, and the box's broker user deleted, afterwards."""
    with open_stack(folder, broker_url, request) as stack:
        stack.env.pop("MORAG_DEV_MODE", None)  # users run without it
        stack.env.update(server_env)
        if network.namespace:
            stack.env["MORAG_SFTP_LISTEN_HOST"] = network.host_address
        key = stack.cli("apikey", "create", "--name", "shapes", "--role", "admin")
        assert key.returncode == 0, key.stderr
        stack.env["MORAG_API_KEY"] = key.stdout.strip().splitlines()[-1]
        port = urllib.parse.urlsplit(broker_url).port or 5672
        shape = Shape(stack, network, folder, port, broker_user)
        try:
            yield shape
        finally:
            stack.stop_all()
            if shape.forwarder:
                shape.forwarder.close()
            if broker_user:
                delete_broker_user(shape.box_name)


#: The server's settings in the shapes: short liveness thresholds, so faults show within minutes.
SERVER_ENV = {
    "MORAG_WORKER_STALE_AFTER": "25",
    "MORAG_WORKER_DEAD_AFTER": "40",
    "MORAG_REROUTE_AFTER": "5",
}


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    with box_network() as net:
        yield net


@pytest.fixture(scope="module")
def shape(
    tmp_path_factory: pytest.TempPathFactory, network: Network, rabbitmq_available: None
) -> Iterator[Shape]:
    """One shape shared by the faults that leave it whole (each test starts again what it stopped)."""
    with fresh_vhost() as url, open_shape(tmp_path_factory.mktemp("shape"), url, network, **SERVER_ENV) as s:
        s.start_server()
        s.start_cpu_worker()
        s.start_box()
        yield s


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """The shape's logs, when a test of it failed."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for name in ("shape", "demo_shape"):
            if name in request.fixturenames:
                s = request.getfixturevalue(name)
                print(f"\n--- logs of the shape\n{s.stack.all_logs()}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TALLY:
        terminalreporter.section("deployment shapes: tasks per fault")
        for line in TALLY:
            terminalreporter.line(line)


def seconds_to_next_minute() -> float:
    return 60 - time.time() % 60
