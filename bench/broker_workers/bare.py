"""Bare Dramatiq on RabbitMQ, publisher confirms on, and a no-op actor:
``dramatiq bench.broker_workers.bare --processes 1 --threads 8 --queues cpu``
(the benchmark sets ``dramatiq_queue_prefetch`` to our prefetch, one per thread)."""

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.broker_workers.counter import hit

broker = RabbitmqBroker(url=os.environ["BENCH_BROKER_URL"], confirm_delivery=True)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="cpu", actor_name="noop")
def noop(n: int) -> None:
    hit()
