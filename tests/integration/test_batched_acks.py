"""Acks settled together (``pipeline.brokers.acks``) on a real RabbitMQ: nothing is lost, nothing
is acknowledged that should not be.

A worker of 8 threads runs 400 messages as fast as they come, so that finished
messages pile up while the connection's thread is busy, and its acks go
together. Failures (dead-lettered with their reason) and deliveries that cannot
be decoded (rejected, so RabbitMQ dead-letters them) are mixed in: a ``multiple``
ack sent past one of those, or past a message still running, would lose it.
"""

from __future__ import annotations

import collections
import threading

import dramatiq
import pika
import pytest
from dramatiq import Worker

from pipeline.brokers.acks import frames
from pipeline.brokers.rabbitmq import build_rabbitmq_broker
from pipeline.config import load_settings
from tests.conftest import queue_depth, wait_for

pytestmark = pytest.mark.rabbitmq

MESSAGES = 400
UNDECODABLE = 6


def failing(n: int) -> bool:
    return n % 10 == 3


def test_acks_settled_together_lose_nothing_and_dead_letter_exactly_the_failures(vhost: str) -> None:
    broker = build_rabbitmq_broker(load_settings(broker_url=vhost))
    runs: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    @dramatiq.actor(broker=broker, queue_name="cpu", actor_name="work", max_retries=0)
    def work(n: int) -> None:
        with lock:
            runs[n] += 1
        if failing(n):
            raise ValueError(f"message {n} fails")

    connection = pika.BlockingConnection(pika.URLParameters(vhost))
    channel = connection.channel()
    for n in range(MESSAGES):
        work.send(n)
        if n % (MESSAGES // UNDECODABLE) == 7:  # among the others, a body no worker can read
            channel.basic_publish("", "cpu", b"\x00 not a message")
    connection.close()

    worker = Worker(broker, queues={"cpu"}, worker_threads=8)
    worker.start()
    try:
        wait_for("every message run", lambda: sum(runs.values()) >= MESSAGES, timeout=120)
        failures = sum(1 for n in range(MESSAGES) if failing(n))
        wait_for(
            "the dead letters", lambda: queue_depth(vhost, "cpu.XQ") >= failures + UNDECODABLE, timeout=30
        )
    finally:
        worker.stop()
        broker.close()

    assert sorted(runs) == list(range(MESSAGES)) and set(runs.values()) == {1}  # each ran once
    # Stopping a worker puts back what it had not acknowledged: none is.
    assert queue_depth(vhost, "cpu") == 0
    assert queue_depth(vhost, "cpu.XQ") == failures + UNDECODABLE


def test_a_batch_goes_as_one_ack_only_when_it_settles_everything_below_its_highest_tag() -> None:
    acks = [(5, True), (3, True), (4, True)]
    assert frames(acks, unsettled=None) == [("ack", 5, True)]
    assert frames(acks, unsettled=6) == [("ack", 5, True)]
    # Delivery 2 still runs: acknowledging "up to 5" would acknowledge it too.
    assert frames(acks, unsettled=2) == [("ack", 5, False), ("ack", 3, False), ("ack", 4, False)]
    # A rejection among them is sent as such, in the order handed over.
    mixed = [(3, True), (4, False), (5, True)]
    assert frames(mixed, unsettled=None) == [("ack", 3, False), ("nack", 4, False), ("ack", 5, False)]
    assert frames([(7, True)], unsettled=None) == [("ack", 7, False)]
