"""Dead-letter queues and the cancellation stream on a real RabbitMQ, without workers."""

from __future__ import annotations

import time
from pathlib import Path

import dramatiq
import pika
import pytest

from pipeline.brokers import deadletters as dead
from pipeline.brokers.cancellations import CancelListener, publish_cancel
from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import load_settings
from pipeline.store import State, Task, TaskStore
from tests.conftest import queue_depth

pytestmark = pytest.mark.rabbitmq


def letter(task_id: str, reason: str | None) -> dramatiq.Message:
    options = {"broker_priority": 3, "retries": 2}
    if reason:
        options["dead_letter"] = {"reason": reason, "at": 1.0, "worker": "w1"}
    return dramatiq.Message(
        queue_name="cpu.XQ",
        actor_name="convert_document",
        args=(),
        kwargs={"job": {"task_id": task_id, "filename": f"{task_id}.md"}},
        options=options,
    )


def test_browse_purge_and_retry(vhost: str, tmp_path: Path) -> None:
    broker = build_rabbitmq_broker(load_settings(broker_url=vhost))
    try:
        for task_id, reason in (("t1", "bad input"), ("t2", None), ("t3", "poison")):
            broker.enqueue(letter(task_id, reason))
        # A message rejected by a worker: RabbitMQ dead-letters it, with x-death and no record.
        connection = pika.BlockingConnection(pika.URLParameters(vhost))
        channel = connection.channel()
        channel.basic_publish("", "cpu", letter("t4", None).copy(queue_name="cpu").encode())
        method, _, _ = channel.basic_get("cpu")
        channel.basic_nack(method.delivery_tag, requeue=False)
        connection.close()

        parameters = pika.URLParameters(vhost)
        letters = dead.browse(parameters, ["gpu", "cpu"])
        assert [x.task_id for x in letters] == ["t1", "t2", "t3", "t4"]
        assert [x.reason for x in letters[:2]] == ["bad input", "rejected by a worker: no reason recorded"]
        assert letters[3].reason == "rejected by a worker: no reason recorded" and letters[3].dead_at
        assert letters[0].worker == "w1" and letters[0].retries == 2
        assert queue_depth(vhost, "cpu.XQ") == 4  # browsing took nothing

        assert dead.purge(parameters, ["cpu"], ["t2"]) == 1
        assert [x.task_id for x in dead.browse(parameters, ["cpu"])] == ["t1", "t3", "t4"]

        store = TaskStore(tmp_path / "tasks.db")
        for task_id, state in (("t1", State.failed), ("t3", State.done)):
            store.create(Task(task_id, "convert", state, "a.md", {}, {}, {}))
        outcome = dead.retry(parameters, broker, store, ["cpu"], ["t1", "t3"])
        assert [x["task_id"] for x in outcome["retried"]] == ["t1"]
        assert [(x["task_id"], x["why"]) for x in outcome["skipped"]] == [
            ("t3", "task is done; purge the letter instead")
        ]
        assert store.get("t1").state == State.queued
        assert [x.task_id for x in dead.browse(parameters, ["cpu"])] == ["t3", "t4"]
        assert queue_depth(vhost, "cpu") == 1
        connection = pika.BlockingConnection(parameters)
        _, properties, body = connection.channel().basic_get("cpu", auto_ack=True)
        connection.close()
        again = dramatiq.Message.decode(body)
        assert again.options == {"broker_priority": 3, "dead_retries": 1}
        assert properties.priority == 3

        assert dead.purge(parameters, ["gpu", "cpu", "control"]) == 2
        assert dead.browse(parameters, ["gpu", "cpu", "control"]) == []
    finally:
        broker.close()


def test_a_worker_that_starts_after_a_cancel_still_hears_of_it(vhost: str) -> None:
    parameters = pika.URLParameters(vhost)
    publish_cancel(parameters, "early", "canceled by the user")
    heard: list[str] = []
    listener = CancelListener(parameters, heard.append)
    listener.start()
    try:
        assert listener.caught_up.wait(30)
        assert heard == ["early"]
        publish_cancel(parameters, "later", "canceled by the user")
        deadline = time.monotonic() + 30
        while "later" not in heard and time.monotonic() < deadline:
            time.sleep(0.1)
        assert heard == ["early", "later"]
    finally:
        listener.stop()
        listener.join(10)
    assert not listener.is_alive()
