"""RabbitMQ topology: queues ``gpu``, ``cpu`` and ``control``, priorities and dead letters.

Dramatiq declares each queue durable with ``x-max-priority`` and
dead-lettering to ``<queue>.XQ``, plus ``<queue>.DQ`` for delayed retries.
Messages are published persistent (``delivery_mode=2``) with publisher confirms.
"""

from __future__ import annotations

import ssl

import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from pipeline.brokers import QUEUES
from pipeline.brokers.middleware import pipeline_middleware
from pipeline.config import Settings


def build_rabbitmq_broker(settings: Settings) -> RabbitmqBroker:
    broker = RabbitmqBroker(
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
