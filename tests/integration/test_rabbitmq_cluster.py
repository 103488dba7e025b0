"""A RabbitMQ cluster of three nodes on one machine (docs/rabbitmq.md, "A 3-node cluster"): the
documented definitions load, the task queues are replicated on every node, and tasks run through
the crash of the node that leads the ``cpu`` queue, none lost, none doubled.

The three nodes are the test's own (``ops/rabbitmq-extra-node.sh``: their own names, ports,
folders and Erlang cookie). The machine's RabbitMQ, which every other test shares, is never
part of the cluster: joining it would put other tests' quorum queues on nodes this test kills.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.brokers import QUEUES
from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import QueueType, Settings
from tests.chaos.conftest import RABBITMQ_BIN, consumers, events, submit, task
from tests.conftest import ROOT, Stack, free_port, open_stack, queue_depth, wait_for

pytestmark = [pytest.mark.rabbitmq_nodes, pytest.mark.slow]

SCRIPT = ROOT / "ops" / "rabbitmq-extra-node.sh"
DOC = ROOT / "docs" / "rabbitmq.md"
#: The nine queues of the pipeline's topology.
TASK_QUEUES = [f"{queue}{suffix}" for queue in QUEUES for suffix in ("", ".DQ", ".XQ")]


def documented_definitions(password: str) -> dict[str, Any]:
    """The definitions of docs/rabbitmq.md's cluster section, with ``password`` for ``<secret>``."""
    section = DOC.read_text().split("## A 3-node cluster", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block, "docs/rabbitmq.md: no definitions in the cluster section"
    return json.loads(block.group(1).replace("<secret>", password))


@dataclass(frozen=True)
class Node:
    """One RabbitMQ node of the test's cluster: its short name and its ports on 127.0.0.1.

    No management plugin: it would double the time a node takes to rejoin (``start_app``), and
    ``rabbitmqctl`` tells everything the test checks, from RabbitMQ itself.
    """

    name: str
    amqp_port: int
    dist_port: int

    @property
    def erlang(self) -> str:
        """The node's Erlang name, as RabbitMQ lists cluster members."""
        return f"{self.name}@localhost"


class Cluster:
    """Three local RabbitMQ nodes in one folder, driven through ``ops/rabbitmq-extra-node.sh``.

    Parameters:
      folder: where the nodes keep their cookie, configuration, data and logs.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        prefix = f"morag-{uuid.uuid4().hex[:6]}"
        self.nodes = [Node(f"{prefix}-{n}", free_port(), free_port()) for n in (1, 2, 3)]
        self.env = {**os.environ, "RABBITMQ_SCRIPTS": str(RABBITMQ_BIN)}

    def script(self, *args: str, timeout: float = 180) -> str:
        """Run the helper script; its output, or an AssertionError with the output and the node's log."""
        done = subprocess.run(
            [str(SCRIPT), args[0], str(self.folder), *args[1:]],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"{SCRIPT.name} {' '.join(args)}: {done.stdout}{done.stderr}\n{self.logs()}")
        return done.stdout

    def start(self) -> None:
        """Start the three nodes side by side, then join the second and third to the first."""
        starting = [self._starting(node) for node in self.nodes]
        for node, proc in zip(self.nodes, starting, strict=True):
            output, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, f"{node.name} did not start: {output}\n{self.logs()}"
        for node in self.nodes[1:]:
            self.script("join", node.name, self.nodes[0].name)

    def _starting(self, node: Node) -> subprocess.Popen:
        """``start``, in the background: the three nodes boot side by side."""
        return self._background("start", node.name, str(node.amqp_port), str(node.dist_port))

    def _background(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(SCRIPT), args[0], str(self.folder), *args[1:]],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def ctl(self, node: Node, *args: str) -> str:
        """``rabbitmqctl`` on ``node``."""
        return self.script("ctl", node.name, *args)

    def queues(self, node: Node, vhost: str) -> dict[str, dict[str, Any]]:
        """``rabbitmqctl list_queues`` on ``node``: each queue's type, leader, members and policy."""
        rows = json.loads(
            self.ctl(node, "-q", "list_queues", "-p", vhost, "name", "type", "leader", "members", "online",
                     "policy", "messages_ready", "messages_unacknowledged", "--formatter", "json")
        )  # fmt: skip
        return {row["name"]: row for row in rows}

    def pid(self, node: Node) -> int | None:
        """The operating system's process id of ``node``, None when it does not run."""
        pid_file = self.folder / node.name / "pid"
        if not pid_file.exists():
            return None
        pid = int(pid_file.read_text().strip())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def crash(self, node: Node) -> None:
        """Kill ``node`` at once (SIGKILL), as a machine that fails does."""
        pid = self.pid(node)
        assert pid is not None, f"{node.name} is not running"
        os.kill(pid, signal.SIGKILL)
        wait_for(f"{node.name} gone", lambda: self.pid(node) is None, timeout=30)

    def stop(self) -> None:
        """Stop every node still running, side by side: cleanly, else by SIGKILL."""
        stopping = [self._background("stop", node.name) for node in self.nodes if self.pid(node)]
        for proc in stopping:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=90)
        for node in self.nodes:
            pid = self.pid(node)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.folder.glob("*/log/*.log"))
            if not path.name.endswith("_upgrade.log")
        )


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three RabbitMQ nodes of this test, clustered; stopped afterwards whatever happened."""
    server = RABBITMQ_BIN / "rabbitmq-server"
    if not server.exists():
        pytest.skip(
            f"{server} not found: the cluster test starts RabbitMQ nodes of its own and needs a local"
            " RabbitMQ install (Debian: apt-get install rabbitmq-server; elsewhere set"
            " MORAG_TEST_RABBITMQ_BIN to the folder of rabbitmq-server and rabbitmqctl)"
        )
    nodes = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def amqp_url(node: Node, user: str, password: str, vhost: str) -> str:
    quoted = urllib.parse.quote(password, safe="")
    return f"amqp://{user}:{quoted}@127.0.0.1:{node.amqp_port}/{urllib.parse.quote(vhost, safe='')}"


def write_docs(folder: Path, names: list[str]) -> list[Path]:
    """One small Markdown document per name, each saying its own name."""
    folder.mkdir(exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.md"
        path.write_text(f"# Report {name}\n\nWritten for the cluster test, copy {name}.\n")
        paths.append(path)
    return paths


def test_tasks_survive_the_crash_of_the_node_leading_the_cpu_queue(
    cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    first = cluster.nodes[0]
    every_node = {node.erlang for node in cluster.nodes}
    status = json.loads(cluster.ctl(first, "-q", "cluster_status", "--formatter", "json"))
    assert set(status["running_nodes"]) == every_node

    # The definitions of docs/rabbitmq.md, loaded on one node, hold on every node.
    password = uuid.uuid4().hex
    definitions = tmp_path / "morag.json"
    definitions.write_text(json.dumps(documented_definitions(password)))
    cluster.ctl(cluster.nodes[1], "import_definitions", str(definitions))
    policies = json.loads(
        cluster.ctl(cluster.nodes[2], "-q", "list_policies", "-p", "morag", "--formatter", "json")
    )
    assert [policy["name"] for policy in policies] == ["morag-task-queues"]

    # The queues as the server declares them, declared first so that the test knows which node
    # leads cpu before anything connects: the server and the worker use another node.
    declared = amqp_url(first, "morag-server", password, "morag")
    broker = build_rabbitmq_broker(Settings(broker_url=declared, broker_queue_type=QueueType.quorum))
    try:
        for queue in QUEUES:
            broker.declare_queue(queue, ensure=True)
    finally:
        broker.close()
    queues = cluster.queues(first, "morag")
    assert sorted(queues) == sorted(TASK_QUEUES)
    for name in TASK_QUEUES:
        assert queues[name]["type"] == "quorum", queues[name]
        assert set(queues[name]["members"]) == every_node, queues[name]  # a replica on each node
        assert queues[name]["policy"] == "morag-task-queues", queues[name]
    # queue-leader-locator: balanced spreads the nine leaders over the three nodes.
    assert {queues[name]["leader"] for name in TASK_QUEUES} == every_node
    leader = next(node for node in cluster.nodes if node.erlang == queues["cpu"]["leader"])
    entry = next(node for node in cluster.nodes if node is not leader)

    url = amqp_url(entry, "morag-server", password, "morag")
    # Not the machine's management API: the nodes have none (the server logs that it cannot
    # check the consumer timeout, and goes on).
    settings = {
        "MORAG_BROKER_QUEUE_TYPE": "quorum",
        "MORAG_BROKER_MANAGEMENT_URL": f"http://127.0.0.1:{free_port()}",
    }
    (tmp_path / "stack").mkdir()
    with open_stack(tmp_path / "stack", url, request, settings) as stack:
        run_through_a_crash(stack, cluster, leader, entry, tmp_path / "docs")


def run_through_a_crash(stack: Stack, cluster: Cluster, leader: Node, entry: Node, docs: Path) -> None:
    """Tasks before, during and after the crash of ``leader``; the stack is connected to ``entry``."""
    url = stack.env["MORAG_BROKER_URL"]
    stack.start_server()
    stack.start_worker("cpu")
    wait_for("the CPU worker's consumer", lambda: consumers(url, "cpu") >= 1, 120, stack)

    before, waiting, after = (
        write_docs(docs, ["before"]),
        write_docs(docs, [f"queued-{n}" for n in range(4)]),
        write_docs(docs, ["after"]),
    )
    [first_id] = [submit(stack, path)["id"] for path in before]
    wait_for("the first task", lambda: task(stack, first_id)["state"] == "done", stack=stack)

    # The worker is frozen before the tasks come: RabbitMQ hands it one (its prefetch) and keeps
    # three waiting, so the crash finds a task in flight and three queued, whatever the speed.
    worker = stack.processes["cpu-worker"]
    os.killpg(worker.pid, signal.SIGSTOP)
    try:
        ids = {path.stem: submit(stack, path)["id"] for path in waiting}

        def held() -> bool:
            cpu = cluster.queues(entry, "morag")["cpu"]
            return cpu["messages_ready"] == 3 and cpu["messages_unacknowledged"] == 1

        wait_for("one task handed to the worker and three waiting", held, stack=stack)
        cluster.crash(leader)
        survivors = {node.erlang for node in cluster.nodes if node is not leader}

        def moved() -> dict[str, Any] | None:
            cpu = cluster.queues(entry, "morag")["cpu"]
            return cpu if cpu["leader"] in survivors and set(cpu["online"]) == survivors else None

        cpu = wait_for("a new leader of cpu", moved, timeout=60, stack=stack)
        assert set(cpu["members"]) == {node.erlang for node in cluster.nodes}  # the lost node stays a member
        # Nothing waiting or in flight was lost with the leader (its counts come with the new
        # leader's first statistics, a few seconds after the election).
        wait_for("the new leader's counts: one task in flight, three waiting", held, stack=stack)
    finally:
        os.killpg(worker.pid, signal.SIGCONT)

    # With two nodes of three the cluster still takes tasks.
    ids.update({path.stem: submit(stack, path)["id"] for path in after})
    for name, task_id in ids.items():
        done = wait_for(f"task {name}", lambda t=task_id: (d := task(stack, t))["state"] == "done" and d,
                        stack=stack)  # fmt: skip
        assert len(events(done, "done")) == 1, done["events"]
        assert f"copy {name}." in stack.get(f"/api/v1/tasks/{task_id}/result", timeout=30).text
    counts = stack.get("/api/v1/tasks", params={"limit": 1}, timeout=30).json()["counts"]
    assert counts.get("done") == 6 and not counts.get("failed"), counts
    assert queue_depth(url, "cpu") == 0 and queue_depth(url, "cpu.XQ") == 0

    # A node lost for good leaves the cluster from a live node; quorum queues drop its replica.
    cluster.ctl(entry, "forget_cluster_node", leader.erlang)
    left = cluster.queues(entry, "morag")
    survivors = {node.erlang for node in cluster.nodes if node is not leader}
    assert {name: set(left[name]["members"]) for name in TASK_QUEUES} == dict.fromkeys(TASK_QUEUES, survivors)
    status = json.loads(cluster.ctl(entry, "-q", "cluster_status", "--formatter", "json"))
    assert set(status["disk_nodes"]) == survivors
