"""Dead letters with their reason."""

from __future__ import annotations

from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from pipeline.brokers.deadletters import bury
from pipeline.middleware.task_events import describe


class DeadLetters(Middleware):
    """Puts a message that failed for good in ``<queue>.XQ`` with the reason it failed.

    Dramatiq rejects such a message and RabbitMQ dead-letters the body as it
    was delivered: without the last error, and without any reason at all for
    a bad input (never retried, so Retries recorded no traceback). This
    middleware publishes a copy with a ``dead_letter`` record (reason, time,
    worker, retries, deliveries) to ``<queue>.XQ`` and has the original
    acknowledged instead. If the copy cannot be published the original is
    rejected as before, so a dead letter is never lost.

    Register it before TaskEvents and Retries: ``after_*`` hooks run in
    reverse order, so this one runs last, once the failure is decided.
    RabbitMQ brokers only; the stub broker keeps its own dead letters.
    """

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        if message.failed:
            reason = describe(exception) if exception is not None else "failed"
            self._bury(broker, message, reason)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        if message.failed:
            self._bury(broker, message, "skipped")

    def _bury(self, broker: Broker, message: MessageProxy, reason: str) -> None:
        if not isinstance(broker, RabbitmqBroker):
            return
        record = message.options.get("dead_letter") or {}
        if bury(broker, message, record.get("reason", reason)):
            # Dramatiq acknowledges a message that is not failed: the copy stands for it.
            message.failed = False
