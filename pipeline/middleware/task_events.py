"""Tells the server when an attempt at a task failed, and whether it is the last."""

from __future__ import annotations

from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy

from pipeline.errors import BadInput, UnprovenMessage
from pipeline.reporting import reporter_for
from pipeline.task_message import task_id_of


def describe(exception: BaseException) -> str:
    """The reason a user sees: the message of our own errors, the type too of others."""
    if isinstance(exception, BadInput):
        return str(exception)
    return f"{type(exception).__name__}: {exception}"


class TaskEvents(Middleware):
    """Reports failed attempts of pipeline tasks to the ``control`` queue.

    A message refused as UnprovenMessage is not reported: its task is not its to fail.

    Register it before Dramatiq's Retries: ``after_*`` hooks run in reverse
    order, so by the time this one runs Retries has decided whether the
    message is retried or has failed for good (``message.failed``).
    """

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None or message.queue_name == "control" or isinstance(exception, UnprovenMessage):
            return  # a message the server did not send says nothing of the task it names
        task_id = task_id_of(message)
        if not task_id:
            return
        reporter = reporter_for(broker)
        attempts = message.options.get("retries", 0)
        if message.failed:
            reporter.failed(task_id, describe(exception), attempts=attempts)
        else:
            reporter.retrying(task_id, describe(exception), attempts=attempts)
