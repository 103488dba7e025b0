"""RabbitMQ topology: queues ``gpu``, ``cpu`` and ``control``, priorities and dead letters.

Each queue is declared durable with dead-lettering to ``<queue>.XQ``, plus
``<queue>.DQ`` for delayed retries, as classic queues with ``x-max-priority``
(Dramatiq's own arguments) or as quorum queues (MORAG_BROKER_QUEUE_TYPE; the
arguments come from ``pipeline.brokers.queue_types``); each is bound to the
``morag`` topic exchange under its own name. Messages are published there,
persistent (``delivery_mode=2``), with publisher confirms.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
from dramatiq import Consumer, Message, Middleware
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import current_millis, dq_name, q_name, xq_name
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import MiddlewareError

from pipeline.brokers import QUEUES
from pipeline.brokers.acks import BatchedAcksConsumer
from pipeline.brokers.queue_types import (
    QueueRefused,
    Role,
    Version,
    cost,
    mismatch,
    parse_version,
    queue_arguments,
)
from pipeline.config import QueueType, Settings
from pipeline.identity import worker_id
from pipeline.logs import get_logger
from pipeline.middleware import pipeline_middleware

logger = get_logger(__name__)

#: Attempts to publish one message across lost connections.
PUBLISH_ATTEMPTS = 6

#: The exit status of a worker process whose queues RabbitMQ refuses: Dramatiq's
#: own status for a broker that fails while a worker starts.
EXIT_QUEUES_REFUSED = 3


#: Workers publish through this topic exchange, every queue bound to it by its
#: own name: RabbitMQ's topic permissions can then limit the queues a worker's
#: broker user may publish to, which the default exchange cannot.
EXCHANGE = "morag"


class PipelineRabbitmqBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker, publishing through the ``morag`` topic exchange.

    Queues are declared durable, dead-lettering to ``<queue>.XQ``, with the
    arguments of their type (``queue_types.queue_arguments``, the one place
    that builds them) and, with ``bind``, bound to the exchange under their
    names; messages are published to the exchange with the queue's name as
    routing key, persistent, with publisher confirms when enabled.

    Its consumers settle finished messages together (``acks.BatchedAcksConsumer``).

    A queue that exists with other arguments raises ``QueueMismatch`` (one
    line: the queue, its type, the fix). A worker's consumer cannot recover
    from that, and Dramatiq would restart it forever, so the worker process
    logs the line and exits (status 3), which stops the ``dramatiq`` command.

    Parameters:
      bind: declare the exchange and bind queues to it. The server does this
        at start; enrolled workers, whose broker users may not bind, do not.
      queue_type: classic or quorum queues (MORAG_BROKER_QUEUE_TYPE).
    """

    def __init__(
        self, *, bind: bool = True, queue_type: QueueType = QueueType.classic, **kwargs: Any
    ) -> None:
        # signal -> (the middleware list it was computed for, the hooks that do something)
        self._hooks: dict[str, tuple[list[Middleware], list[Callable[..., Any]]]] = {}
        super().__init__(**kwargs)
        self.bind = bind
        self.queue_type = queue_type
        self._version: Version | None = None

    @property
    def consumer_class(self) -> type[BatchedAcksConsumer]:
        return BatchedAcksConsumer

    @property
    def server_version(self) -> Version:
        """The RabbitMQ version the broker's connection reported when it opened."""
        if self._version is None:
            self._version = parse_version(server_version(self.connection))
        return self._version

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        try:
            return super().consume(queue_name, prefetch, timeout)
        except QueueRefused as exc:
            logger.error(str(exc), extra={"queue": queue_name, "worker": worker_id()})
            logging.shutdown()  # flush the line before the process ends
            os._exit(EXIT_QUEUES_REFUSED)

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """Dramatiq's ``emit_before``, calling only the middleware that implement the hook."""
        signal = "before_" + signal
        for hook in self._hooks_of(signal):
            try:
                hook(self, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                self.logger.critical("Unexpected failure in %s of %r.", signal, hook.__self__, exc_info=True)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """Dramatiq's ``emit_after`` (middleware in reverse order), calling only those that implement
        the hook."""
        signal = "after_" + signal
        for hook in self._hooks_of(signal):
            try:
                hook(self, *args, **kwargs)
            except Exception:
                self.logger.critical("Unexpected failure in %s of %r.", signal, hook.__self__, exc_info=True)

    def _hooks_of(self, signal: str) -> list[Callable[..., Any]]:
        """The middleware's bound ``signal`` hooks, in the order Dramatiq calls them, leaving out
        Middleware's own no-ops: a message passes some 40 hooks, half of which do nothing.
        Computed once per middleware list."""
        known = self._hooks.get(signal)
        if known is not None and known[0] == self.middleware:
            return known[1]
        order = reversed(self.middleware) if signal.startswith("after_") else self.middleware
        hooks = [getattr(m, signal) for m in order if _implements(m, signal)]
        self._hooks[signal] = (list(self.middleware), hooks)
        return hooks

    def _bind(self, queue_name: str) -> None:
        if self.bind:
            self.channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
            self.channel.queue_bind(queue_name, EXCHANGE, routing_key=queue_name)

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        return queue_arguments(
            queue_name, Role.queue, self.queue_type, self.server_version, self.max_priority
        )

    def _declare(self, queue_name: str, role: Role) -> Any:
        """Declare (and bind) canonical ``queue_name``'s queue of ``role``."""
        name = {Role.queue: queue_name, Role.delay: dq_name(queue_name), Role.dead: xq_name(queue_name)}[role]
        arguments = queue_arguments(queue_name, role, self.queue_type, self.server_version, self.max_priority)
        try:
            declared = self.channel.queue_declare(queue=name, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            del self.channel  # RabbitMQ closed it
            if exc.reply_code == 406 and "inequivalent arg" in exc.reply_text:
                raise mismatch(name, _vhost(self.parameters), self.queue_type, exc.reply_text) from None
            raise
        self._bind(name)
        return declared

    def _declare_queue(self, queue_name: str) -> Any:
        return self._declare(queue_name, Role.queue)

    def _declare_dq_queue(self, queue_name: str) -> Any:
        return self._declare(queue_name, Role.delay)

    def _declare_xq_queue(self, queue_name: str) -> Any:
        return self._declare(queue_name, Role.dead)

    def enqueue(self, message: Message, *, delay: int | None = None) -> Message:
        """Publish ``message`` to its queue (its delay queue when ``delay`` ms is given)."""
        canonical = message.queue_name
        if delay is not None:
            message = message.copy(queue_name=dq_name(canonical), options={"eta": current_millis() + delay})
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            try:
                self.declare_queue(canonical, ensure=True)
                self.emit_before("enqueue", message, delay)
                self.channel.basic_publish(
                    exchange=EXCHANGE,
                    routing_key=message.queue_name,
                    body=message.encode(),
                    properties=pika.BasicProperties(
                        delivery_mode=2, priority=message.options.get("broker_priority")
                    ),
                    # Only with confirms does RabbitMQ report a message no queue took.
                    mandatory=self.confirm_delivery,
                )
                self.emit_after("enqueue", message, delay)
                return message
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
                del self.connection  # the next attempt opens a new connection and channel
                if isinstance(exc, pika.exceptions.UnroutableError):
                    self.queues_pending.add(q_name(message.queue_name))  # declare and bind it again
                if attempt == PUBLISH_ATTEMPTS:
                    raise ConnectionClosed(exc) from None
        raise AssertionError("unreachable")


def _implements(middleware: Middleware, hook: str) -> bool:
    """Whether ``middleware`` does something on ``hook`` (an unknown hook counts, so that calling it
    fails as it does in Dramatiq)."""
    if hook in vars(middleware) or not hasattr(Middleware, hook):
        return True
    return getattr(type(middleware), hook, None) is not getattr(Middleware, hook)


def build_rabbitmq_broker(settings: Settings) -> RabbitmqBroker:
    broker = PipelineRabbitmqBroker(
        # An enrolled worker (it has a token) leaves the topology to the server.
        bind=settings.worker_token is None,
        queue_type=settings.broker_queue_type,
        url=settings.broker_url.get_secret_value(),
        confirm_delivery=True,
        max_priority=settings.broker_max_priority,
        middleware=pipeline_middleware(settings),
    )
    _tls(broker.parameters, settings)
    for queue in QUEUES:
        broker.declare_queue(queue)
    return broker


def server_version(connection: pika.BlockingConnection) -> str:
    """The version RabbitMQ announced when ``connection`` opened (``"?"`` if it did not)."""
    properties = getattr(connection._impl, "server_properties", None) or {}
    version = properties.get("version", "?")
    return version.decode() if isinstance(version, bytes) else str(version)


def _vhost(parameters: pika.ConnectionParameters | list[pika.ConnectionParameters]) -> str:
    first = parameters[0] if isinstance(parameters, list) else parameters
    return first.virtual_host


def log_queue_type(settings: Settings) -> str:
    """Log, once when the server starts, the queue type on this broker and what it costs.

    Returns the line. A broker that cannot be asked is logged and skipped.
    """
    try:
        connection = pika.BlockingConnection(connection_parameters(settings))
    except pika.exceptions.AMQPError as exc:
        logger.info(
            "queue type not reported: RabbitMQ unreachable", extra={"error": str(exc) or type(exc).__name__}
        )
        return ""
    try:
        shown = server_version(connection)
    finally:
        connection.close()
    queue_type, max_priority = settings.broker_queue_type, settings.broker_max_priority
    line = cost(queue_type, parse_version(shown), max_priority, shown)
    params = connection_parameters(settings)
    logger.info(line, extra={"rabbitmq": shown, "queue_type": str(queue_type), "vhost": params.virtual_host})
    return line


def _tls(params: pika.URLParameters, settings: Settings) -> None:
    """AMQPS verified against ``broker_ca_file`` when set (else pika's default for amqps://)."""
    if settings.broker_ca_file is None or not settings.broker_url.get_secret_value().startswith("amqps://"):
        return
    context = ssl.create_default_context(cafile=str(settings.broker_ca_file))
    params.ssl_options = pika.SSLOptions(context, server_hostname=params.host)


def connection_parameters(settings: Settings) -> pika.URLParameters:
    """Parameters for short-lived connections (checks, stats): one attempt, short timeouts."""
    params = pika.URLParameters(settings.broker_url.get_secret_value())
    _tls(params, settings)
    params.socket_timeout = settings.broker_connect_timeout
    params.blocked_connection_timeout = settings.broker_connect_timeout
    params.connection_attempts = 1
    return params


def queue_stats(settings: Settings, queues: tuple[str, ...] = QUEUES) -> dict[str, dict[str, int]]:
    """Messages waiting and consumers connected per queue (passive declares).

    A queue that does not exist yet is reported with zero of both.
    """
    stats: dict[str, dict[str, int]] = {}
    connection = pika.BlockingConnection(connection_parameters(settings))
    try:
        for name in queues:
            for queue in (name, f"{name}.XQ"):
                channel = connection.channel()
                try:
                    ok = channel.queue_declare(queue=queue, passive=True).method
                    stats[queue] = {"messages": ok.message_count, "consumers": ok.consumer_count}
                except pika.exceptions.ChannelClosedByBroker:
                    stats[queue] = {"messages": 0, "consumers": 0}
                finally:
                    if channel.is_open:
                        channel.close()
    finally:
        connection.close()
    return stats
