"""A booting worker and the cancellation stream: no task runs before the notices kept so far
are read, and the worker's boot does not wait for them."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import dramatiq
import pika
import pytest
from dramatiq import Worker
from dramatiq.broker import MessageProxy

from pipeline.brokers.cancellations import STREAM, CancelListener, declare, publish_cancel
from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import Settings
from pipeline.middleware.cancellations import Cancellations, cancel
from tests.conftest import queue_depth

pytestmark = pytest.mark.rabbitmq


def proxy(job: dict[str, Any] | None) -> MessageProxy:
    kwargs = {"job": job} if job is not None else {}
    return MessageProxy(dramatiq.Message("cpu", "convert_document", (), kwargs, {}))


def publish_notices(vhost: str, task_ids: list[str]) -> None:
    """Append cancellation notices as the server does (``publish_cancel``), many at once."""
    connection = pika.BlockingConnection(pika.URLParameters(vhost))
    channel = connection.channel()
    declare(channel)
    for task_id in task_ids:
        body = json.dumps({"task_id": task_id, "reason": "canceled by the user", "at": time.time()})
        channel.basic_publish("", STREAM, body.encode(), pika.BasicProperties(delivery_mode=2))
    connection.close()


def test_a_task_canceled_before_the_worker_booted_never_runs(vhost: str) -> None:
    """The canceled task's message is there at boot, so a worker thread takes it at once, while
    the listener still reads the thousands of notices kept before it: the task waits for them,
    then is skipped."""
    publish_notices(vhost, [f"old-{n}" for n in range(20_000)])
    publish_cancel(pika.URLParameters(vhost), "gone", "canceled by the user")
    broker = build_rabbitmq_broker(Settings(broker_url=vhost, heartbeat_interval=0))
    ran: list[str] = []
    finished = threading.Event()

    @dramatiq.actor(broker=broker, queue_name="cpu", actor_name="convert_document")
    def convert_document(job: dict[str, Any]) -> None:
        ran.append(job["task_id"])
        if job["task_id"] == "kept":
            finished.set()

    convert_document.send({"task_id": "gone"})
    convert_document.send({"task_id": "kept"})
    worker = Worker(broker, queues={"cpu"}, worker_threads=2)
    worker.start()
    try:
        assert finished.wait(30), "the task that was not canceled never ran"
        deadline = time.monotonic() + 10
        while queue_depth(vhost, "cpu") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop()
        broker.close()
    assert ran == ["kept"]
    assert queue_depth(vhost, "cpu") == 0  # the canceled one was acknowledged, not left behind


def test_only_task_messages_wait_for_the_notices(vhost: str, caplog: pytest.LogCaptureFixture) -> None:
    """A listener that has not read the stream yet (never started here) holds back task messages,
    up to ``catch_up_s`` after boot, and nothing else; a canceled task is still skipped after."""
    middleware = Cancellations(catch_up_s=1.5)
    middleware.listener = CancelListener(pika.URLParameters(vhost), cancel)
    middleware._caught_up_by = time.monotonic() + 1.5
    broker = build_rabbitmq_broker(Settings(broker_url=vhost, heartbeat_interval=0))
    try:
        started = time.monotonic()
        middleware.before_process_message(broker, proxy(None))
        middleware.before_process_message(broker, proxy({"no": "task id"}))
        assert time.monotonic() - started < 1.0, "a message naming no task waited for the stream"

        with caplog.at_level(logging.WARNING):
            middleware.before_process_message(broker, proxy({"task_id": "a"}))
            assert time.monotonic() - started >= 1.4, "a task message ran before the notices were read"
            middleware.before_process_message(broker, proxy({"task_id": "b"}))
        warned = [r for r in caplog.records if "cancellation notices not read yet" in r.getMessage()]
        assert len(warned) == 1

        cancel("c")
        with pytest.raises(dramatiq.middleware.SkipMessage):
            middleware.before_process_message(broker, proxy({"task_id": "c"}))
    finally:
        broker.close()
