"""Delivery counting: a message that keeps killing its worker is dead-lettered, not looped."""

from __future__ import annotations

from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.errors import BrokerConnectionError
from dramatiq.middleware import SkipMessage

from pipeline.brokers.deadletters import condemn
from pipeline.logs import get_logger
from pipeline.reporting import reporter_for
from pipeline.task_message import task_id_of

logger = get_logger(__name__)


class DeliveryCount(Middleware):
    """Counts the deliveries of each task message in the message itself.

    A worker killed by the kernel's OOM killer or SIGKILL cannot count
    anything, and workers share no disk or database, so the count travels
    with the message. RabbitMQ flags a message ``redelivered`` when the
    consumer that held it went away without acknowledging it. Such a message
    is published again with ``options["deliveries"]`` one higher (with
    confirm, before the original is acknowledged, so it is neither lost nor
    doubled) and runs from that copy. When the count would pass
    ``max_deliveries`` the message is dead-lettered with the reason, the task
    fails with it, and no worker runs it again.

    A redelivery after a broker restart or a lost connection counts too; the
    limit leaves room for those. The copy waits behind messages of its
    priority already queued. ``control`` messages are not counted: their
    order matters and they are never poison.

    Parameters:
      max_deliveries: deliveries allowed before the message is dead-lettered.
    """

    def __init__(self, max_deliveries: int = 4) -> None:
        self.max_deliveries = max_deliveries

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        if message.queue_name == "control" or not getattr(message, "redelivered", False):
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
            if task_id:
                reporter_for(broker).failed(task_id, reason, attempts=deliveries - 1)
            raise SkipMessage(reason)
        try:
            broker.enqueue(message.copy(options={"deliveries": deliveries}))
        except BrokerConnectionError as exc:
            # Not counted this time, but not lost: it runs from this delivery.
            logger.warning("redelivery not counted: broker unreachable", extra={**log, "error": str(exc)})
            return
        logger.warning("redelivered message republished with its delivery count", extra=log)
        if task_id:
            detail = {"delivery": deliveries, "max_deliveries": self.max_deliveries}
            reporter_for(broker).note(task_id, "redelivered", detail)
        raise SkipMessage("republished with its delivery count")
