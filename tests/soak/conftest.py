"""The soak's shape and its plan.

The shape is the README's (tests/shapes): a server with a secret and an admin key, a CPU
worker on the server's host started with the plain command, and an enrolled GPU box with two
processes in its own folder and network namespace, run under a supervisor that restarts it.
Here it runs on a private RabbitMQ node, so the broker can be restarted, with a cutting proxy
between the box and the SFTP server, and with short thresholds, so that faults show in seconds.

The plan comes from the environment, so that ``python -m tests.soak.run`` can run it longer:
``SOAK_SEED`` (default: a fresh one, printed), ``SOAK_MINUTES`` of faults (2), ``SOAK_TASKS``
(40) and ``SOAK_DRAIN_MINUTES`` (10), and ``SOAK_REPORT``, a file the count is written to.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chaos.conftest import PrivateRabbitmq, private_rabbitmq  # noqa: F401 (fixture)
from tests.shapes.conftest import Network, Shape, network, open_shape  # noqa: F401 (fixture)
from tests.soak.nemesis import box_settings, sftp_proxy
from tests.transfer.proxy import CuttingProxy


@dataclass(frozen=True)
class Plan:
    """How long and how hard one soak runs.

    Parameters:
      seed: seeds every random choice (which file, which fault, when, for how long).
      minutes: how long faults strike and tasks are submitted.
      tasks: how many files are submitted, evenly over ``minutes``.
      drain_minutes: how long the tasks may take to end once the faults stop.
      report: a file the count is written to, besides the test's output.
    """

    seed: int
    minutes: float
    tasks: int
    drain_minutes: float
    report: Path | None

    @classmethod
    def from_environment(cls) -> Plan:
        seed = os.environ.get("SOAK_SEED")
        report = os.environ.get("SOAK_REPORT")
        return cls(
            seed=int(seed) if seed else random.SystemRandom().randrange(2**32),
            minutes=float(os.environ.get("SOAK_MINUTES", "2")),
            tasks=int(os.environ.get("SOAK_TASKS", "40")),
            drain_minutes=float(os.environ.get("SOAK_DRAIN_MINUTES", "10")),
            report=Path(report) if report else None,
        )


PLAN = Plan.from_environment()

#: The server's settings: heartbeats every 3 s, a worker stale after 15 s and dead after 30 s,
#: a queue without live workers moved after 5 s, a running task nobody reports on delivered
#: again after 20 s, and a submit that waits 10 s for the broker before leaving the task to the
#: reconciler.
SERVER_ENV = {
    "MORAG_HEARTBEAT_INTERVAL": "3",
    "MORAG_WORKER_STALE_AFTER": "15",
    "MORAG_WORKER_DEAD_AFTER": "30",
    "MORAG_REROUTE_AFTER": "5",
    "MORAG_TASK_LOST_AFTER_S": "20",
    "MORAG_PUBLISH_WAIT_S": "10",
}
#: The box's own tunings, in its morag.env.
BOX_SETTINGS = {"heartbeat_interval": "3", "min_backoff_ms": "500", "max_backoff_ms": "5000"}


@dataclass
class Rig:
    """The soak's parts: the shape, its broker node and the proxy the box's SFTP goes through."""

    shape: Shape
    rabbit: PrivateRabbitmq
    proxy: CuttingProxy


@pytest.fixture
def plan() -> Plan:
    return PLAN


@pytest.fixture
def rig(
    tmp_path: Path,
    private_rabbitmq: PrivateRabbitmq,  # noqa: F811 (the fixture imported above)
    network: Network,  # noqa: F811
    request: pytest.FixtureRequest,
) -> Iterator[Rig]:
    """The shape on the private node (which has no management API: the box is enrolled without a
    broker user of its own), started, with the box's SFTP through the cutting proxy."""
    (tmp_path / "shape").mkdir()
    with open_shape(tmp_path / "shape", private_rabbitmq.url, network, broker_user=False, request=request,
                    **SERVER_ENV) as shape:  # fmt: skip
        # The SFTP server listens on 127.0.0.1, behind the proxy the box reaches on its network.
        shape.stack.env.pop("MORAG_SFTP_LISTEN_HOST", None)
        shape.start_server()
        proxy = sftp_proxy(shape)
        box_settings(shape, **BOX_SETTINGS)
        try:
            shape.start_cpu_worker()
            shape.start_box()
            yield Rig(shape, private_rabbitmq, proxy)
        finally:
            shape.stack.stop_all()
            proxy.close()
