"""Cancellation notices: how workers, which have no database, learn that a task was canceled.

The server publishes one notice per canceled task to ``morag.cancellations``,
a RabbitMQ stream (an append-only log that consumers read without taking
from it), kept for 7 days like the dead letters. Every worker process reads
it from a thread started at boot, from the first notice kept: a worker that
boots, or reconnects after a broker restart, long after a cancellation still
learns of it before it takes the task. A fanout exchange would reach only the
workers connected at the moment of the cancel.

Stream segments are kept small so the 7-day retention applies (RabbitMQ
drops whole segments only).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pika
from pika.adapters.blocking_connection import BlockingChannel

from pipeline.logs import get_logger

logger = get_logger(__name__)

STREAM = "morag.cancellations"
ARGUMENTS = {
    "x-queue-type": "stream",
    "x-max-age": "7D",
    "x-stream-max-segment-size-bytes": 1_000_000,
}

#: Notices the stream sends ahead of the listener's acknowledgements.
PREFETCH = 1000
#: Notices acknowledged at once (and every notice read when the stream falls quiet): one frame
#: for many, so that a booting worker reads a long stream sooner. Below ``PREFETCH``, so that
#: the stream never waits for an acknowledgement.
ACK_EVERY = 250


def declare(channel: BlockingChannel) -> None:
    channel.queue_declare(STREAM, durable=True, arguments=ARGUMENTS)


def publish_cancel(parameters: pika.ConnectionParameters, task_id: str, reason: str) -> None:
    """Append a cancellation notice, confirmed by the broker."""
    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        declare(channel)
        body = json.dumps({"task_id": task_id, "reason": reason, "at": time.time()})
        channel.basic_publish(
            exchange="",
            routing_key=STREAM,
            body=body.encode(),
            properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
            mandatory=True,
        )
    finally:
        if connection.is_open:
            connection.close()


class CancelListener(threading.Thread):
    """Reads the stream and calls ``on_cancel(task_id)`` for every notice, reconnecting as needed.

    Parameters:
      parameters: how to reach RabbitMQ (the worker broker's).
      on_cancel: called with each canceled task id (old notices too, after a reconnect).
      reconnect_s: the pause before reconnecting after the broker went away.
    """

    def __init__(
        self,
        parameters: pika.ConnectionParameters | list[pika.ConnectionParameters],
        on_cancel: Callable[[str], None],
        reconnect_s: float = 2.0,
    ) -> None:
        super().__init__(name="morag-cancel-listener", daemon=True)
        self.parameters = parameters
        self.on_cancel = on_cancel
        self.reconnect_s = reconnect_s
        self.caught_up = threading.Event()
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._listen()
            except (pika.exceptions.AMQPError, OSError) as exc:
                logger.warning("cancellation stream unreachable; reconnecting", extra={"error": str(exc)})
                self._stopping.wait(self.reconnect_s)

    def _listen(self) -> None:
        connection = pika.BlockingConnection(self.parameters)
        try:
            channel = connection.channel()
            declare(channel)
            channel.basic_qos(prefetch_count=PREFETCH)  # a stream consumer needs a prefetch
            stream = channel.consume(
                STREAM, auto_ack=False, arguments={"x-stream-offset": "first"}, inactivity_timeout=0.5
            )
            last_tag, unacked = 0, 0
            for method, _properties, body in stream:
                if self._stopping.is_set():
                    break
                if method is None:  # nothing new: everything kept so far has been read
                    if unacked:
                        channel.basic_ack(last_tag, multiple=True)
                        unacked = 0
                    self.caught_up.set()
                    continue
                try:
                    task_id = json.loads(body)["task_id"]
                except (ValueError, KeyError, TypeError):
                    logger.warning("malformed cancellation notice ignored")
                else:
                    self.on_cancel(str(task_id))
                last_tag, unacked = method.delivery_tag, unacked + 1
                if unacked >= ACK_EVERY:  # one acknowledgement for many: the stream's credit back
                    channel.basic_ack(last_tag, multiple=True)
                    unacked = 0
        finally:
            if connection.is_open:
                connection.close()
