"""Delivery counting: a message that keeps killing its worker is dead-lettered, not looped."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pika
from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.errors import BrokerConnectionError
from dramatiq.middleware import SkipMessage
from pika.adapters.blocking_connection import BlockingChannel

from pipeline.brokers.deadletters import condemn
from pipeline.logs import get_logger
from pipeline.reporting import reporter_for
from pipeline.task_message import task_id_of

logger = get_logger(__name__)

#: A start mark nobody reads for this long is removed by RabbitMQ (``x-expires``): a message
#: whose worker died and that waits longer than this before a worker takes it is not counted.
MARK_EXPIRES_MS = 7 * 24 * 3600 * 1000


class StartMarks:
    """Marks kept in RabbitMQ of the task messages whose run began and has not ended.

    A mark is a small durable queue, ``morag.started.<message id>``, declared
    when a worker starts running the message and deleted when the run ends,
    however it ends (done, failed, retried, skipped). A worker killed in the
    middle of a run cannot delete it, so a mark found when the message starts
    again says that its last run died with its process. A message a process
    held but never started (prefetched, or delivered while the worker shut
    down), and one the sweep read and put back, has none.

    The mark is kept by message id, which survives a reroute by the sweep, and
    lives in RabbitMQ because workers share no disk or database. It uses the
    worker thread's own connection to RabbitMQ; a mark that cannot be read or
    written (a broker user without the permission, RabbitMQ away) is reported
    as unknown.
    """

    PREFIX = "morag.started."

    def __init__(self) -> None:
        self._local = threading.local()
        self.refused = False  # the broker user may not declare marks: never asked again

    def name(self, message_id: str) -> str:
        return f"{self.PREFIX}{message_id}"

    def found(self, broker: Broker, message_id: str) -> bool | None:
        """Whether a run of the message began and never ended; None when it cannot be told."""

        def check(channel: BlockingChannel) -> bool:
            try:
                channel.queue_declare(self.name(message_id), passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                self._local.channel = None
                if exc.reply_code == 404:
                    return False
                raise
            return True

        return self._use(broker, check)

    def mark(self, broker: Broker, message_id: str) -> None:
        """Records that a run of the message begins."""
        name, arguments = self.name(message_id), {"x-expires": MARK_EXPIRES_MS}
        self._use(broker, lambda channel: channel.queue_declare(name, durable=True, arguments=arguments))

    def clear(self, broker: Broker, message_id: str) -> None:
        """Records that the run ended (deleting a mark that is not there is no error)."""
        self._use(broker, lambda ch: ch.queue_delete(self.name(message_id)))

    def _use(self, broker: Broker, operation: Callable[[BlockingChannel], Any]) -> Any:
        if self.refused or not hasattr(broker, "connection"):
            return None  # the stub broker of embedded runs: nothing is ever redelivered there
        for attempt in (1, 2):
            try:
                channel = getattr(self._local, "channel", None)
                if channel is None or not channel.is_open:
                    channel = self._local.channel = broker.connection.channel()
                return operation(channel)
            except pika.exceptions.ChannelClosedByBroker as exc:
                self._local.channel = None
                if exc.reply_code == 403:
                    self.refused = True
                    logger.warning(
                        "start marks refused by RabbitMQ: redeliveries are counted by RabbitMQ's"
                        " redelivered flag; allow this worker's broker user to configure and read"
                        f" {self.PREFIX}*",
                        extra={"error": str(exc)},
                    )
                return None
            except pika.exceptions.AMQPError as exc:
                self._local.channel = None
                del broker.connection  # Dramatiq's connection of this thread: it makes a new one
                if attempt == 2:
                    logger.warning("start mark not reached", extra={"error": str(exc) or type(exc).__name__})
        return None


class DeliveryCount(Middleware):
    """Counts the deliveries of each task message that died with its worker, in the message itself.

    A worker killed by the kernel's OOM killer or SIGKILL cannot count
    anything, so each run leaves a mark in RabbitMQ while it lasts
    (``StartMarks``). A message that starts while its mark from an earlier run
    is still there was running when its worker died: it is published again
    with ``options["deliveries"]`` one higher (with confirm, before the
    original is acknowledged, so it is neither lost nor doubled), its mark is
    cleared, and it runs from that copy. When the count would pass
    ``max_deliveries`` the message is dead-lettered with the reason, the task
    fails with it, and no worker runs it again.

    Only a run that began counts. RabbitMQ's ``redelivered`` flag is not
    proof: it is also set on the messages a dead worker held without running
    them, on those a worker held when it shut down, and on those the sweep
    read and put back. Where marks cannot be kept (a broker user not allowed
    to declare them, RabbitMQ away) the flag is counted instead.

    A run cut by a broker restart or a lost connection counts too; the limit
    leaves room for those. The copy waits behind messages of its priority
    already queued. Only task messages are counted: ``control`` messages'
    order matters, and neither they nor the sweep's ticks are ever poison.

    Parameters:
      max_deliveries: deliveries allowed before the message is dead-lettered.
    """

    def __init__(self, max_deliveries: int = 4) -> None:
        self.max_deliveries = max_deliveries
        self.marks = StartMarks()
        self._skipping = threading.local()  # the message this thread skips itself, its mark settled

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        if not _counted(message):
            return
        found = self.marks.found(broker, message.message_id)
        died = bool(getattr(message, "redelivered", False)) if found is None else found
        if not died:
            self.marks.mark(broker, message.message_id)
            return
        deliveries = int(message.options.get("deliveries", 1)) + 1
        task_id = task_id_of(message)
        log = {"task_id": task_id, "message_id": message.message_id, "deliveries": deliveries}
        if deliveries > self.max_deliveries:
            reason = (
                f"dead-lettered: delivered {deliveries - 1} times"
                f" (MORAG_MAX_DELIVERIES={self.max_deliveries}) and each time the worker went away"
                " before finishing it (killed, out of memory or disconnected); the input may crash"
                " the worker"
            )
            logger.error("poison message dead-lettered", extra=log)
            condemn(message, reason)
            self.marks.clear(broker, message.message_id)
            if task_id:
                reporter_for(broker).failed(task_id, reason, attempts=deliveries - 1)
            self._skipping.message_id = message.message_id
            raise SkipMessage(reason)
        # Cleared before the copy is published: a worker that starts the copy at once marks it
        # anew, and this one must not delete that mark.
        self.marks.clear(broker, message.message_id)
        try:
            broker.enqueue(message.copy(options={"deliveries": deliveries}))
        except BrokerConnectionError as exc:
            # Not counted this time, but not lost: it runs from this delivery.
            logger.warning("redelivery not counted: broker unreachable", extra={**log, "error": str(exc)})
            self.marks.mark(broker, message.message_id)
            return
        self._skipping.message_id = message.message_id
        logger.warning("redelivered message republished with its delivery count", extra=log)
        if task_id:
            detail = {"delivery": deliveries, "max_deliveries": self.max_deliveries}
            reporter_for(broker).note(task_id, "redelivered", detail)
        raise SkipMessage("republished with its delivery count")

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        if _counted(message):
            self.marks.clear(broker, message.message_id)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        if getattr(self._skipping, "message_id", None) == message.message_id:
            self._skipping.message_id = None  # skipped here: its mark is settled already
        elif _counted(message):
            self.marks.clear(broker, message.message_id)


def _counted(message: MessageProxy) -> bool:
    """Task messages are counted; ``control`` messages and the sweep's ticks are not."""
    return message.queue_name != "control" and task_id_of(message) is not None
