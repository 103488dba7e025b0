"""The process-wide Dramatiq broker: RabbitMQ for workers and server, a stub
broker for the embedded ``run`` mode.

Actor modules call ``current_broker()`` before they declare actors, so the
broker is chosen once per process: by ``install`` (the embedded mode does
this before importing the actors) or else from the configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import get_settings

if TYPE_CHECKING:
    from dramatiq import Broker

QUEUES = ("gpu", "cpu", "control")

PRIORITIES = {"low": 0, "normal": 3, "high": 6, "urgent": 9}

_installed: Broker | None = None


def install(broker: Broker) -> Broker:
    """Make ``broker`` the one this process's actors use."""
    import dramatiq  # here, not above: the CLI reads QUEUES and PRIORITIES without it

    global _installed
    _installed = broker
    dramatiq.set_broker(broker)
    return broker


def current_broker() -> Broker:
    """The installed broker, or a RabbitMQ broker built from the configuration."""
    if _installed is None:
        from pipeline.brokers.rabbitmq import build_rabbitmq_broker

        install(build_rabbitmq_broker(get_settings()))
    assert _installed is not None
    return _installed
