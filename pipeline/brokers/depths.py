"""How many messages each task queue, its delay queue and its dead letters hold, asked of RabbitMQ.

Passive declares on one short-lived connection: they need no management
plugin, and RabbitMQ answers with the queue's own count (the management API
lags by its statistics interval).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pika
import pika.exceptions
from dramatiq.common import dq_name, xq_name

from pipeline.brokers.rabbitmq import connection_parameters
from pipeline.config import Settings


@dataclass(frozen=True)
class QueueDepth:
    """One task queue as RabbitMQ holds it.

    Parameters:
      queue: the task queue's name (``gpu``).
      messages: messages ready in it (not those delivered and unacknowledged).
      consumers: consumers attached to it.
      delayed: messages in ``<queue>.DQ``: retries waiting for their backoff.
      dead_letters: messages in ``<queue>.XQ``.
      exists: whether RabbitMQ has the queue at all.
    """

    queue: str
    messages: int
    consumers: int
    delayed: int
    dead_letters: int
    exists: bool = True


def queue_depths(settings: Settings, queues: Iterable[str]) -> dict[str, QueueDepth]:
    """Each of ``queues`` with its delay queue and dead letters; a queue not declared yet counts zero.

    Raises pika's AMQPError when RabbitMQ cannot be reached.
    """
    connection = pika.BlockingConnection(connection_parameters(settings))
    try:
        found = {}
        for queue in queues:
            messages, consumers, exists = _declare(connection, queue)
            delayed, _, _ = _declare(connection, dq_name(queue))
            dead, _, _ = _declare(connection, xq_name(queue))
            found[queue] = QueueDepth(queue, messages, consumers, delayed, dead, exists)
        return found
    finally:
        connection.close()


def _declare(connection: pika.BlockingConnection, name: str) -> tuple[int, int, bool]:
    channel = connection.channel()
    try:
        ok = channel.queue_declare(queue=name, passive=True).method
        return ok.message_count, ok.consumer_count, True
    except pika.exceptions.ChannelClosedByBroker:  # 404: not declared yet
        return 0, 0, False
    finally:
        if channel.is_open:
            channel.close()
