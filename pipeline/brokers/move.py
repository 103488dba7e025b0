"""Moving waiting messages from one queue to another without losing or doubling one.

Every message of the source queue is read once, unacknowledged, and a
``decide`` function says what becomes of it:

- ``move``: a (rewritten) copy is published to the target queue on a channel
  in confirm mode, and the original is acknowledged only once RabbitMQ has
  confirmed the copy. A copy that is refused (nack) or unroutable leaves the
  original where it was.
- ``fail``: like ``move``, but the copy goes to the queue the decision names
  (the dead letters, ``<queue>.XQ``, with the reason in the copy); without a
  copy the original is rejected and RabbitMQ dead-letters it as it was.
- ``keep``: the original is held until the scan ends, then requeued, so the
  scan never reads it twice.

Nothing here counts deliveries. RabbitMQ flags a requeued message
``redelivered``, but workers count only a run that began and died with its
worker, by the start mark kept under the message's id
(``pipeline.middleware.delivery_count``); a moved copy keeps that id, so a
file that kills workers is still caught on the queue it moves to, and a
message kept across many sweeps is never counted.

Publishing is pipelined: many copies are in flight at once and each
confirmation releases its original, which is why this uses pika's
asynchronous connection rather than a blocking one (one round trip per
message). If the connection drops, RabbitMQ requeues every original not yet
acknowledged; only a copy confirmed in the instant before the drop can then
exist twice, with the same message id.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pika
from dramatiq import Message
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel

from pipeline.logs import get_logger
from pipeline.task_message import task_id_of

logger = get_logger(__name__)

#: AMQP caps a channel's prefetch at this many messages.
MAX_PREFETCH = 65535


class Action(StrEnum):
    move = "move"
    keep = "keep"
    fail = "fail"


@dataclass
class Decision:
    """What to do with one message.

    ``message`` is the copy to publish when moving or failing; ``queue`` where
    to publish it (default: the scan's target).
    """

    action: Action
    reason: str = ""
    message: Message | None = None
    queue: str | None = None


Decide = Callable[[Message], Decision]


@dataclass
class Handled:
    """A message that was moved or failed."""

    message_id: str
    task_id: str | None
    reason: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MoveReport:
    source: str
    target: str
    waiting: int = 0  # messages ready in the source when the scan began
    scanned: int = 0
    moved: list[Handled] = field(default_factory=list)
    failed: list[Handled] = field(default_factory=list)
    kept: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "waiting": self.waiting,
            "scanned": self.scanned,
            "moved": len(self.moved),
            "failed": len(self.failed),
            "kept": self.kept,
            "errors": self.errors[:5],
            "seconds": round(self.seconds, 3),
        }


def count_waiting(params: pika.ConnectionParameters, queues: list[str]) -> dict[str, int | None]:
    """Messages ready in each queue; None for a queue that does not exist."""
    found: dict[str, int | None] = {}
    connection = pika.BlockingConnection(params)
    try:
        for queue in queues:
            channel = connection.channel()
            try:
                found[queue] = channel.queue_declare(queue, passive=True).method.message_count
            except pika.exceptions.ChannelClosedByBroker:
                found[queue] = None
            finally:
                if channel.is_open:
                    channel.close()
    finally:
        connection.close()
    return found


class _Mover:
    """One scan of one queue on its own connection and I/O loop."""

    def __init__(
        self,
        params: pika.ConnectionParameters,
        report: MoveReport,
        decide: Decide,
        limit: int,
        idle_s: float,
        timeout_s: float,
    ) -> None:
        self.params = params
        self.report = report
        self.decide = decide
        self.limit = min(limit, report.waiting)
        self.idle_s = idle_s
        self.timeout_s = timeout_s
        self.connection: SelectConnection | None = None
        self.src: Channel | None = None
        self.dst: Channel | None = None
        self.consumer_tag: str | None = None
        self.seq = 0
        self.pending: dict[int, tuple[int, Action, Handled]] = {}  # publish seq -> (tag, action, what)
        self.by_id: dict[str, int] = {}  # message id -> publish seq, for returns
        self.returned: set[int] = set()
        self.held: list[int] = []
        self.stopping = False
        self.closing = False
        self.last_delivery = time.monotonic()

    def run(self) -> None:
        self.connection = SelectConnection(
            self.params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )
        self.connection.ioloop.start()

    # Setting up.
    def _on_open(self, connection: SelectConnection) -> None:
        connection.ioloop.call_later(self.timeout_s, self._on_timeout)
        connection.channel(on_open_callback=self._on_src)

    def _on_open_error(self, connection: SelectConnection, error: BaseException | str) -> None:
        self.report.errors.append(f"cannot connect: {error}")
        connection.ioloop.stop()

    def _on_closed(self, connection: SelectConnection, reason: BaseException) -> None:
        if not self.closing:
            self.report.errors.append(f"connection lost: {reason}")
        connection.ioloop.stop()

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if not self.closing:
            self.report.errors.append(f"channel closed: {reason}")
            self._close()

    def _on_src(self, channel: Channel) -> None:
        self.src = channel
        channel.add_on_close_callback(self._on_channel_closed)
        assert self.connection is not None
        self.connection.channel(on_open_callback=self._on_dst)

    def _on_dst(self, channel: Channel) -> None:
        self.dst = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: Any) -> None:
        assert self.src is not None
        prefetch = max(1, min(self.limit, MAX_PREFETCH))
        self.src.basic_qos(prefetch_count=prefetch, callback=self._on_qos)

    def _on_qos(self, _frame: Any) -> None:
        assert self.src is not None and self.connection is not None
        self.consumer_tag = self.src.basic_consume(self.report.source, self._on_message, auto_ack=False)
        self.last_delivery = time.monotonic()
        self.connection.ioloop.call_later(self.idle_s, self._on_idle_check)

    # Scanning.
    def _on_message(self, channel: Channel, method: Any, properties: Any, body: bytes) -> None:
        tag = method.delivery_tag
        self.last_delivery = time.monotonic()
        if self.stopping:
            self.held.append(tag)
            return
        self.report.scanned += 1
        try:
            message = Message.decode(body)
            decision = self.decide(message)
        except Exception as exc:  # not ours, or undecodable: leave it be
            decision = Decision(Action.keep, f"not moved: {exc}")
            message = None
        publish = decision.action in (Action.move, Action.fail) and decision.message is not None
        if publish and message is not None:
            copy = decision.message
            assert copy is not None and self.dst is not None
            self.seq += 1
            handled = Handled(copy.message_id, task_id_of(copy), decision.reason, dict(copy.options))
            self.pending[self.seq] = (tag, decision.action, handled)
            self.by_id[copy.message_id] = self.seq
            queue = decision.queue or self.report.target
            self.dst.basic_publish("", queue, copy.encode(), properties=properties, mandatory=True)
        elif decision.action is Action.fail and message is not None:
            channel.basic_nack(tag, requeue=False)
            self.report.failed.append(Handled(message.message_id, task_id_of(message), decision.reason))
        else:
            self.held.append(tag)
        if self.report.scanned >= self.limit:
            self._stop()

    def _on_return(self, _channel: Channel, _method: Any, _properties: Any, body: bytes) -> None:
        try:
            seq = self.by_id.get(Message.decode(body).message_id)
        except Exception:
            seq = None
        if seq is not None:
            self.returned.add(seq)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        if method.multiple:
            seqs = sorted(s for s in self.pending if s <= method.delivery_tag)
        else:
            seqs = [method.delivery_tag] if method.delivery_tag in self.pending else []
        assert self.src is not None
        for seq in seqs:
            tag, action, handled = self.pending.pop(seq)
            self.by_id.pop(handled.message_id, None)
            if acked and seq not in self.returned:
                self.src.basic_ack(tag)
                (self.report.moved if action is Action.move else self.report.failed).append(handled)
            else:
                why = "unroutable" if seq in self.returned else "refused by RabbitMQ"
                self.report.errors.append(f"{handled.message_id}: copy {why}; original kept")
                self.src.basic_nack(tag, requeue=True)
            self.returned.discard(seq)
        self._maybe_finish()

    # Stopping.
    def _on_idle_check(self) -> None:
        if self.stopping or self.connection is None:
            return
        if time.monotonic() - self.last_delivery >= self.idle_s:
            self._stop()
        else:
            self.connection.ioloop.call_later(self.idle_s / 2, self._on_idle_check)

    def _on_timeout(self) -> None:
        if self.closing or self.connection is None:
            return
        if self.stopping:  # confirmations never came: give up; RabbitMQ requeues what is unacked
            self.report.errors.append(f"{len(self.pending)} confirmation(s) missing; originals requeued")
            self._close()
            return
        self.report.errors.append(f"scan stopped after {self.timeout_s:.0f}s")
        self._stop()
        self.connection.ioloop.call_later(max(10.0, self.idle_s), self._on_timeout)

    def _stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self.src is not None and self.consumer_tag is not None and self.src.is_open:
            self.src.basic_cancel(self.consumer_tag, callback=lambda _frame: self._cancelled())
        else:
            self._cancelled()

    def _cancelled(self) -> None:
        self.consumer_tag = None
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self.stopping or self.consumer_tag is not None or self.pending or self.closing:
            return
        if self.src is not None and self.src.is_open:
            for tag in self.held:
                self.src.basic_nack(tag, requeue=True)
        self.report.kept += len(self.held)
        self.held.clear()
        self._close()

    def _close(self) -> None:
        if self.closing:
            return
        self.closing = True
        assert self.connection is not None
        if self.connection.is_open:
            self.connection.close()
        else:
            self.connection.ioloop.stop()


def move_messages(
    params: pika.ConnectionParameters,
    source: str,
    target: str,
    decide: Decide,
    *,
    limit: int = 100_000,
    idle_s: float = 2.0,
    timeout_s: float = 600.0,
) -> MoveReport:
    """Scan up to ``limit`` messages waiting in ``source``, moving or failing them as ``decide`` says.

    Both queues must exist. The scan ends when every message that was ready
    at its start has been read, when none arrives for ``idle_s`` seconds, or
    after ``timeout_s`` seconds.
    """
    started = time.perf_counter()
    report = MoveReport(source, target)
    waiting = count_waiting(params, [source, target])
    if waiting[source] is None or waiting[target] is None:
        missing = source if waiting[source] is None else target
        report.errors.append(f"queue {missing} does not exist")
        return report
    report.waiting = waiting[source] or 0
    if report.waiting and limit > 0:
        _Mover(params, report, decide, limit, idle_s, timeout_s).run()
    report.seconds = time.perf_counter() - started
    if report.moved or report.failed or report.errors:
        logger.info("queue scanned", extra=report.summary())
    return report
