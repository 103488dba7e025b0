"""The in-process broker of the embedded ``run`` mode: no RabbitMQ, same actors."""

from __future__ import annotations

from dramatiq.brokers.stub import StubBroker

from pipeline.brokers import QUEUES
from pipeline.config import Settings
from pipeline.middleware import pipeline_middleware


def build_stub_broker(settings: Settings) -> StubBroker:
    broker = StubBroker(middleware=pipeline_middleware(settings))
    for queue in QUEUES:
        broker.declare_queue(queue)
    return broker
