"""A RabbitMQ user per worker, limited to its capability's queues (real RabbitMQ management API)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pika
import pytest

from tests.conftest import Stack

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def issue(stack: Stack, worker: str, capability: str) -> dict[str, str]:
    proc = stack.cli("token", "issue", "--worker", worker, "--capability", capability, "--broker-user")
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def publish(channel, exchange: str, routing_key: str) -> None:  # type: ignore[no-untyped-def]
    channel.confirm_delivery()
    channel.basic_publish(exchange, routing_key, b"{}", pika.BasicProperties(delivery_mode=2))


def published(url: str, routing_key: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        publish(connection.channel(), "morag", routing_key)
    finally:
        connection.close()


def refused(url: str, action) -> str:  # type: ignore[no-untyped-def]
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as error:
            action(connection.channel())
        return str(error.value)
    finally:
        if connection.is_open:
            connection.close()


def test_worker_user_consumes_only_its_queues(stack: Stack, samples: Path) -> None:
    stack.start_server()
    bundle = issue(stack, "gpu-box-7", "gpu")
    url = bundle["MORAG_BROKER_URL"]
    assert url.startswith("amqp://gpu-box-7:") and "guest" not in url

    assert "ACCESS_REFUSED" in refused(url, lambda ch: ch.basic_get("cpu"))
    assert "ACCESS_REFUSED" in refused(url, lambda ch: ch.basic_get("control"))
    assert "ACCESS_REFUSED" in refused(url, lambda ch: ch.queue_declare("anything-else"))

    # Publishing: only through the morag exchange, only to the queues it needs.
    assert "ACCESS_REFUSED" in refused(url, lambda ch: publish(ch, "", "control"))  # default exchange
    assert "ACCESS_REFUSED" in refused(url, lambda ch: publish(ch, "morag", "cpu.DQ"))
    assert "ACCESS_REFUSED" in refused(url, lambda ch: publish(ch, "morag", "liveness"))
    for allowed in ("control", "gpu.DQ", "cpu"):  # reports, its own retries, the GPU fallback
        published(url, allowed)

    stack.start_worker("gpu", name="gpu-box-7", **bundle)
    stack.wait_consumers("gpu")
    done = stack.cli("submit", "--json", str(samples / "speech.mp3"))
    assert done.returncode == 0, done.stderr + stack.all_logs()
    assert json.loads(done.stdout)["worker"] == "gpu-box-7"

    token_id = next(t for t in json.loads(tokens_json(stack)) if t["worker"] == "gpu-box-7")["id"]
    assert stack.cli("token", "revoke", token_id).returncode == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            pika.BlockingConnection(pika.URLParameters(url)).close()
        except pika.exceptions.ProbableAuthenticationError:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the revoked worker's broker user can still log in")


def tokens_json(stack: Stack) -> str:
    import sqlite3

    db = sqlite3.connect(stack.data_dir / "tasks.db")
    rows = db.execute("SELECT id, worker FROM worker_tokens").fetchall()
    return json.dumps([{"id": i, "worker": w} for i, w in rows])
