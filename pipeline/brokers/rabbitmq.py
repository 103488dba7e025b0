"""RabbitMQ topology: queues ``gpu``, ``cpu`` and ``control``, priorities and dead letters.

Dramatiq declares each queue durable with ``x-max-priority`` and
dead-lettering to ``<queue>.XQ``, plus ``<queue>.DQ`` for delayed retries;
each is bound to the ``morag`` topic exchange under its own name. Messages
are published there, persistent (``delivery_mode=2``), with publisher confirms.
"""

from __future__ import annotations

import ssl
from typing import Any

import pika
import pika.exceptions
from dramatiq import Message
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import current_millis, dq_name, q_name, xq_name
from dramatiq.errors import ConnectionClosed

from pipeline.brokers import QUEUES
from pipeline.config import Settings
from pipeline.middleware import pipeline_middleware

#: Attempts to publish one message across lost connections.
PUBLISH_ATTEMPTS = 6


#: Workers publish through this topic exchange, every queue bound to it by its
#: own name: RabbitMQ's topic permissions can then limit the queues a worker's
#: broker user may publish to, which the default exchange cannot.
EXCHANGE = "morag"


class PipelineRabbitmqBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker, publishing through the ``morag`` topic exchange.

    Queues are declared as Dramatiq declares them (durable, priorities, dead
    letters to ``<queue>.XQ``) and, with ``bind``, bound to the exchange under
    their names; messages are published to the exchange with the queue's name
    as routing key, persistent, with publisher confirms when enabled.

    Parameters:
      bind: declare the exchange and bind queues to it. The server does this
        at start; enrolled workers, whose broker users may not bind, do not.
    """

    def __init__(self, *, bind: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bind = bind

    def _bind(self, queue_name: str) -> None:
        if self.bind:
            self.channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
            self.channel.queue_bind(queue_name, EXCHANGE, routing_key=queue_name)

    def _declare_queue(self, queue_name: str) -> Any:
        declared = super()._declare_queue(queue_name)
        self._bind(queue_name)
        return declared

    def _declare_dq_queue(self, queue_name: str) -> Any:
        declared = super()._declare_dq_queue(queue_name)
        self._bind(dq_name(queue_name))
        return declared

    def _declare_xq_queue(self, queue_name: str) -> Any:
        declared = super()._declare_xq_queue(queue_name)
        self._bind(xq_name(queue_name))
        return declared

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


def build_rabbitmq_broker(settings: Settings) -> RabbitmqBroker:
    broker = PipelineRabbitmqBroker(
        # An enrolled worker (it has a token) leaves the topology to the server.
        bind=settings.worker_token is None,
        url=settings.broker_url.get_secret_value(),
        confirm_delivery=True,
        max_priority=settings.broker_max_priority,
        middleware=pipeline_middleware(settings),
    )
    _tls(broker.parameters, settings)
    for queue in QUEUES:
        broker.declare_queue(queue)
    return broker


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
