"""Acknowledgements sent together: the consumer every morag-pipeline worker reads RabbitMQ with.

Dramatiq's RabbitMQ consumer has the connection's thread woken once for every
finished message, to send that message's ack: a wake-up, a frame and a socket
write per message, on a thread that also has the next deliveries to read. With
one message prefetched per worker thread, that thread is the worker's bottleneck
for short tasks. ``BatchedAcksConsumer`` hands the connection's thread all that
finished while it was busy, and settles them in one go.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import pika.exceptions
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import _RabbitmqConsumer
from dramatiq.errors import ConnectionClosed

#: One frame to send: ("ack" or "nack", delivery tag, multiple).
Frame = tuple[str, int, bool]


class BatchedAcksConsumer(_RabbitmqConsumer):
    """Dramatiq's RabbitMQ consumer, settling the messages its worker threads finish together.

    A worker thread that finishes a message adds its ack (or its nack, for a
    message dead-lettered) to a list; only the one that finds the list empty wakes
    the connection's thread, which takes the whole list and sends it, in the order
    it was handed over (``frames``). Nothing waits for company: the list goes as
    soon as the connection's thread runs, when Dramatiq's single ack would.

    When every delivery up to the highest tag in the list is settled by the list
    itself, and the list holds acks only, it goes as one ``multiple`` ack; otherwise
    one frame per message, so that a message still running, or one to dead-letter,
    is never acknowledged along with the others.

    Parameters: those of Dramatiq's ``_RabbitmqConsumer`` (the broker, the queue,
    the prefetch, the idle timeout in milliseconds).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()  # guards _handed and known_tags' removals
        self._handed: list[tuple[int, bool]] = []  # (delivery tag, ack) not sent yet

    def ack(self, message: MessageProxy) -> None:
        self._hand_over(message._tag, ack=True, tracked=True)

    def nack(self, message: MessageProxy) -> None:
        self._hand_over(message._tag, ack=False, tracked=True)

    def _nack(self, tag: int) -> None:
        # A delivery Dramatiq could not decode: never tracked, rejected on the connection's thread.
        self._hand_over(tag, ack=False, tracked=False)

    def _hand_over(self, tag: int, *, ack: bool, tracked: bool) -> None:
        with self._lock:
            if tracked:
                if tag not in self.known_tags:  # its connection was reset: RabbitMQ redelivers it
                    self.logger.warning("Failed to %s message: not in known tags.", "ack" if ack else "nack")
                    return
                self.known_tags.remove(tag)
            first = not self._handed
            self._handed.append((tag, ack))
        if not first:
            return  # the connection's thread is woken already, and takes this one too
        try:
            self.connection.add_callback_threadsafe(self._send)
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as e:
            # The connection is gone, and with it these deliveries: RabbitMQ redelivers them.
            with self._lock:
                self._handed.clear()
            raise ConnectionClosed(e) from None

    def _send(self) -> None:
        """On the connection's thread: send what was handed over."""
        with self._lock:
            handed, self._handed = self._handed, []
            unsettled = min(self.known_tags, default=None)
        for method, tag, multiple in frames(handed, unsettled):
            if method == "ack":
                self.channel.basic_ack(tag, multiple=multiple)
            else:
                self.channel.basic_nack(tag, requeue=False)


def frames(handed: Iterable[tuple[int, bool]], unsettled: int | None) -> list[Frame]:
    """The frames that settle ``handed`` ((delivery tag, ack) in the order handed over), given
    the lowest tag delivered on the channel and not settled yet (``unsettled``; None: none is).

    One ``multiple`` ack up to the highest tag when the list holds acks only and no
    unsettled delivery lies below it; one frame per message, in order, otherwise."""
    handed = list(handed)
    if len(handed) > 1 and all(ack for _, ack in handed):
        top = max(tag for tag, _ in handed)
        if unsettled is None or unsettled > top:
            return [("ack", top, True)]
    return [("ack" if ack else "nack", tag, False) for tag, ack in handed]
