"""RabbitMQ's consumer timeout, checked against the longest a worker may hold a delivery.

RabbitMQ closes the channel of a consumer that holds a delivery
unacknowledged for longer than its consumer timeout, and delivers every
message of that channel again. A worker holds a task's delivery while the
task runs (at most MORAG_MAX_TIME_LIMIT_S) and a retry's delivery while it
waits for its backoff in the delay queue (at most MORAG_MAX_BACKOFF_MS).

Where the timeout comes from, first match wins: the consumer's own argument
(the pipeline sets none), the queue's (RabbitMQ 3.12 and later: the
``x-consumer-timeout`` argument or a policy's ``consumer-timeout``), then the
global ``consumer_timeout`` of ``rabbitmq.conf``, the only one RabbitMQ 3.10
has. The management API shows a queue's arguments and policy, never the
global value: that one is what MORAG_BROKER_CONSUMER_TIMEOUT_S states, and
the settings refuse limits that reach it.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

import httpx
from dramatiq.common import dq_name

from pipeline.config import Settings
from pipeline.logs import get_logger

logger = get_logger(__name__)

TASK_QUEUES = ("gpu", "cpu")


@dataclass(frozen=True)
class QueueTimeout:
    """A queue's own consumer timeout as RabbitMQ reports it.

    Parameters:
      queue: the queue's name.
      seconds: the timeout; None when the queue has none of its own (the global one applies).
      source: where it is set (``argument`` or ``policy <name>``).
    """

    queue: str
    seconds: float | None
    source: str = "global consumer_timeout"


def held_at_most_s(queue: str, settings: Settings) -> float:
    """The longest a worker may hold a delivery of ``queue``: a task's limit, or a retry's backoff."""
    if queue.endswith(".DQ"):
        return settings.max_backoff_ms / 1000
    return float(settings.max_time_limit_s)


def queue_timeouts(settings: Settings, client: httpx.Client | None = None) -> tuple[str, list[QueueTimeout]]:
    """RabbitMQ's version and the consumer timeout of each task queue and its delay queue.

    A queue that does not exist yet is left out. Raises httpx.HTTPError when
    the management API cannot be asked.
    """
    amqp = urllib.parse.urlsplit(settings.broker_url.get_secret_value())
    vhost = urllib.parse.quote(urllib.parse.unquote(amqp.path.lstrip("/")) or "/", safe="")
    if client is None:
        auth = (
            urllib.parse.unquote(amqp.username or "guest"),
            urllib.parse.unquote(amqp.password or "guest"),
        )
        client = httpx.Client(base_url=settings.broker_management_url, auth=auth, timeout=10)
    with client:
        overview = client.get("/api/overview")
        overview.raise_for_status()
        version = str(overview.json().get("rabbitmq_version", "?"))
        found = []
        for queue in [name for base in TASK_QUEUES for name in (base, dq_name(base))]:
            response = client.get(f"/api/queues/{vhost}/{urllib.parse.quote(queue, safe='')}")
            if response.status_code == 404:
                continue
            response.raise_for_status()
            found.append(_own_timeout(queue, response.json()))
    return version, found


def _own_timeout(queue: str, info: dict) -> QueueTimeout:
    """The lower of a queue's argument and its policy's value (milliseconds in both)."""
    candidates = []
    argument = (info.get("arguments") or {}).get("x-consumer-timeout")
    if isinstance(argument, int | float) and argument > 0:
        candidates.append((argument / 1000, "argument x-consumer-timeout"))
    policy = (info.get("effective_policy_definition") or {}).get("consumer-timeout")
    if isinstance(policy, int | float) and policy > 0:
        candidates.append((policy / 1000, f"policy {info.get('policy') or '?'}"))
    if not candidates:
        return QueueTimeout(queue, None)
    seconds, source = min(candidates)
    return QueueTimeout(queue, seconds, source)


def check_consumer_timeout(settings: Settings, client: httpx.Client | None = None) -> list[str]:
    """Warnings, each logged, where RabbitMQ would deliver a task again before its limits end it.

    Meant to run once when the server starts. Only a queue's own timeout can
    be read; where the global one applies, an info line says how to check it.
    Nothing is raised: a broker that cannot be asked is logged and skipped.
    """
    try:
        version, timeouts = queue_timeouts(settings, client)
    except httpx.HTTPError as exc:
        logger.info("consumer timeout not checked: management API unreachable", extra={"error": str(exc)})
        return []
    warnings = []
    for timeout in timeouts:
        held = held_at_most_s(timeout.queue, settings)
        if timeout.seconds is not None and timeout.seconds <= held:
            setting = "MORAG_MAX_BACKOFF_MS" if timeout.queue.endswith(".DQ") else "MORAG_MAX_TIME_LIMIT_S"
            warnings.append(
                f"queue {timeout.queue}: RabbitMQ's consumer timeout is {timeout.seconds:g}s"
                f" ({timeout.source}), but a worker may hold its deliveries {held:g}s ({setting}):"
                f" RabbitMQ would close the worker's channel and deliver its tasks again;"
                f" raise the queue's consumer timeout or lower {setting}"
            )
    for line in warnings:
        logger.warning("consumer timeout too short", extra={"reason": line, "rabbitmq": version})
    if all(timeout.seconds is None for timeout in timeouts):
        logger.info(
            "consumer timeout: the global consumer_timeout applies, which the management API does not show;"
            " check it is above MORAG_MAX_TIME_LIMIT_S with"
            " `rabbitmqctl eval 'application:get_env(rabbit, consumer_timeout).'`",
            extra={
                "rabbitmq": version,
                "assumed_s": settings.broker_consumer_timeout_s,
                "max_time_limit_s": settings.max_time_limit_s,
            },
        )
    return warnings
