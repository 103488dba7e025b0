"""The broker restarted at a sweep tick, on a RabbitMQ node of the test's own: the sweep keeps
running afterwards, and the tasks the killed GPU box left waiting are moved and end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.chaos.conftest import PrivateRabbitmq
from tests.conftest import SAMPLES, wait_for
from tests.shapes.conftest import SERVER_ENV, Network, Shape, check_every_task_ended, open_shape

pytestmark = [pytest.mark.shapes, pytest.mark.slow, pytest.mark.rabbitmq]


@pytest.fixture
def private_shape(
    tmp_path: Path, private_rabbitmq: PrivateRabbitmq, network: Network, request: pytest.FixtureRequest
) -> Iterator[Shape]:
    """The shape on the private node. That node has no management API, so the box is enrolled
    without a broker user of its own (``token issue`` without ``--broker-user``)."""
    with open_shape(tmp_path, private_rabbitmq.url, network, broker_user=False, request=request,
                    **SERVER_ENV) as s:  # fmt: skip
        s.start_server()
        s.start_cpu_worker()
        s.start_box()
        yield s


@pytest.mark.timeout(600)
def test_the_broker_restarted_at_a_sweep_tick(
    private_shape: Shape, private_rabbitmq: PrivateRabbitmq
) -> None:
    shape = private_shape
    shape.wait_box_alive()
    ids = shape.submit(*[SAMPLES / "speech.mp3"] * 4)
    assert all(shape.task(i)["route"]["queue"] == "gpu" for i in ids)
    wait_for(
        "the box at work", lambda: any(shape.task(i)["state"] == "running" for i in ids), 180, shape.stack
    )
    shape.kill_box()  # what waits on gpu now needs the sweep to move it

    # Down from two seconds before the sweep's next cron tick (each minute) until after it.
    tick = (time.time() // 60 + 1) * 60
    if tick - time.time() < 4:
        tick += 60
    time.sleep(tick - 2 - time.time())
    private_rabbitmq.ctl("stop_app")
    time.sleep(max(0.0, tick + 3 - time.time()))
    private_rabbitmq.ctl("start_app")
    restarted_at = time.time()

    tasks = check_every_task_ended(shape, "broker restarted at a sweep tick", ids, timeout=420)
    assert all(t["state"] == "done" for t in tasks.values()), {i: t["error"] for i, t in tasks.items()}
    # The box is gone for good: the sweep moved what it left, before the restart or after it
    # (on a busy machine the broker may stop a moment after the tick).
    moves = [e for t in tasks.values() for e in t["events"] if e["event"] == "rerouted"]
    assert moves and all(e["detail"]["by"] == "sweep" for e in moves), moves

    # The scheduler outlived the blip: a tick after the broker came back is swept, by the same
    # liveness process (the tick lost to the restart cost that tick only).
    def swept_after() -> dict | None:
        parts = httpx.get(f"{shape.stack.url}/healthz", timeout=30).json()["parts"]
        last = parts["scheduler"]["last_sweep"] or 0
        return parts["scheduler"] if last > restarted_at else None

    scheduler = wait_for("a sweep after the broker came back", swept_after, 150, shape.stack, interval=2)
    assert scheduler["ok"] and scheduler["process"] and scheduler["restarts"] == 0, scheduler
