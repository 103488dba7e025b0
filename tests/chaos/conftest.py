"""Fixtures of the chaos tests: a private RabbitMQ node to restart, and helpers to watch tasks."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import Stack, consumers, free_port, looped_speech, open_stack, wait_for  # noqa: F401 (re-exported)

RABBITMQ_BIN = Path(os.environ.get("MORAG_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))

T = TypeVar("T")


def wait_consumers(stack: Stack, queue: str, count: int = 1, timeout: float = 90) -> None:
    url = stack.env["MORAG_BROKER_URL"]
    wait_for(f"{count} consumer(s) on {queue}", lambda: consumers(url, queue) >= count, timeout, stack)


def task(stack: Stack, task_id: str) -> dict[str, Any]:
    return stack.get(f"/api/v1/tasks/{task_id}", timeout=30).raise_for_status().json()


def submit(stack: Stack, path: Path, **form: str) -> dict[str, Any]:
    with path.open("rb") as f:
        response = stack.post("/api/v1/tasks", files={"file": (path.name, f)}, data=form, timeout=120)
    assert response.status_code == 201, response.text
    return response.json()


def events(task_dict: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in task_dict["events"] if e["event"] == name]


@pytest.fixture(scope="session")
def lasting_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About three and a half minutes of speech: long enough to act on a transcription
    while it runs, on any machine."""
    return looped_speech(tmp_path_factory.mktemp("media") / "lasting.mp3", 20)


@dataclass
class PrivateRabbitmq:
    """A RabbitMQ node of this test alone, so restarting it disturbs no one else."""

    node: str
    port: int
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def ctl(self, *args: str, timeout: float = 120) -> None:
        """``rabbitmqctl`` on this node. On a loaded machine the CLI can fail to reach a node that
        runs (exit 69, "unavailable"): that is tried again until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run(
                [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
                env=self.env, capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
            if proc.returncode == 0:
                return
            if proc.returncode != 69 or time.monotonic() > deadline:
                raise AssertionError(f"rabbitmqctl {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
            time.sleep(2)


@pytest.fixture
def private_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitmq]:
    server = RABBITMQ_BIN / "rabbitmq-server"
    if not server.exists():
        pytest.skip(f"{server} not found: a private RabbitMQ node needs the Debian package (ops/setup.sh)")
    base = tmp_path_factory.mktemp("rabbitmq")
    port = free_port()
    node = f"morag-chaos-{uuid.uuid4().hex[:8]}@localhost"
    (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{port}\n")
    (base / "enabled_plugins").write_text("[].\n")
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
        # Not the system node's settings (its name and port).
        "RABBITMQ_CONF_ENV_FILE": os.devnull,
    }
    subprocess.run([str(server), "-detached"], env=env, check=True, timeout=60)
    rabbit = PrivateRabbitmq(node, port, env)
    try:
        rabbit.ctl("wait", str(base / "rabbitmq.pid"), "--timeout", "90")
        yield rabbit
    finally:
        subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node, "shutdown"],
            env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def private_stack(
    tmp_path: Path, private_rabbitmq: PrivateRabbitmq, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """Like ``stack``, on the private node."""
    with open_stack(tmp_path, private_rabbitmq.url, request) as s:
        yield s
