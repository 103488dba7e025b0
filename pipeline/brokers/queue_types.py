"""Queue types: the arguments of each task queue, and what the choice costs.

Every task queue (``gpu``, ``cpu``, ``control``), its delay queue
``<queue>.DQ`` and its dead letters ``<queue>.XQ`` are declared with the
arguments ``queue_arguments`` builds, and nowhere else:

- ``classic``: exactly Dramatiq's own arguments: ``x-max-priority``, and
  dead-lettering to ``<queue>.XQ`` (which keeps messages 7 days). The queues
  live on one RabbitMQ node.
- ``quorum``: ``x-queue-type: quorum`` (replicated over a cluster's nodes),
  the same dead-lettering made at-least-once (``x-dead-letter-strategy:
  at-least-once``, which needs ``x-overflow: reject-publish``; RabbitMQ 3.10
  and later) and no ``x-max-priority``: RabbitMQ before 4.0 refuses it on a
  quorum queue, and from 4.0 quorum queues order by message priority without
  it (4.0-4.2: two levels, a priority above 4 is high; 4.3: 32 strict levels).

RabbitMQ refuses to declare a queue that exists with other arguments
(PRECONDITION_FAILED, "inequivalent arg"): ``QueueMismatch`` says which
queue, what it seems to be, and the fix. A queue's type never changes.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

from dramatiq.brokers.rabbitmq import DEAD_MESSAGE_TTL
from dramatiq.common import xq_name

from pipeline.config import QueueType
from pipeline.errors import PipelineError

Version = tuple[int, int, int]

#: Quorum queues need TTL on the dead letters and at-least-once dead-lettering: 3.10.
QUORUM_SINCE: Version = (3, 10, 0)
#: Quorum queues order by message priority, two levels (normal, and high above 4).
TWO_PRIORITIES_SINCE: Version = (4, 0, 0)
#: Quorum queues order by message priority, 32 strict levels (0-31).
STRICT_PRIORITIES_SINCE: Version = (4, 3, 0)

#: Arguments only this pipeline's quorum queues carry.
_QUORUM_ONLY = frozenset({"x-queue-type", "x-dead-letter-strategy", "x-overflow"})
_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)'.*?: received (.+?) but current is (.+)$")
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


class Role(StrEnum):
    """Which of a task queue's three queues is declared."""

    queue = "queue"  # the task queue itself, e.g. cpu
    delay = "delay"  # cpu.DQ: retries waiting for their backoff
    dead = "dead"  # cpu.XQ: the dead letters


class QueueRefused(PipelineError):
    """RabbitMQ will not declare the task queues as the settings ask."""


class QueueMismatch(QueueRefused):
    """A task queue exists with other arguments (another type or priority) than this process declares."""


class UnsupportedBroker(QueueRefused):
    """The broker's version lacks what the chosen queue type needs."""


def parse_version(text: str) -> Version:
    """``"3.10.8"`` as ``(3, 10, 8)``; a version that cannot be read counts as ``(0, 0, 0)``."""
    found = _VERSION.search(text or "")
    if found is None:
        return (0, 0, 0)
    major, minor, patch = found.groups()
    return (int(major), int(minor), int(patch or 0))


def queue_arguments(
    queue_name: str, role: Role, queue_type: QueueType, version: Version, max_priority: int | None
) -> dict[str, Any]:
    """The arguments ``queue_name``'s queue of ``role`` is declared with.

    Parameters:
      queue_name: the canonical queue name (``cpu``, never ``cpu.DQ``).
      role: which of its three queues.
      queue_type: classic or quorum (MORAG_BROKER_QUEUE_TYPE).
      version: the broker's RabbitMQ version.
      max_priority: ``x-max-priority`` of classic queues (MORAG_BROKER_MAX_PRIORITY).

    Raises UnsupportedBroker for quorum queues before RabbitMQ 3.10.
    """
    if queue_type is QueueType.quorum and version < QUORUM_SINCE:
        shown = ".".join(map(str, version))
        raise UnsupportedBroker(
            f"quorum queues need RabbitMQ 3.10 or later (dead letters with a TTL, at-least-once"
            f" dead-lettering), and this broker runs {shown}: upgrade RabbitMQ or set"
            f" MORAG_BROKER_QUEUE_TYPE=classic"
        )
    arguments: dict[str, Any] = {}
    if queue_type is QueueType.quorum:
        arguments["x-queue-type"] = "quorum"
    if role is Role.dead:
        # Expired head-first, so one static TTL for the whole queue.
        arguments["x-message-ttl"] = DEAD_MESSAGE_TTL
        return arguments
    arguments["x-dead-letter-exchange"] = ""
    arguments["x-dead-letter-routing-key"] = xq_name(queue_name)
    if queue_type is QueueType.quorum:
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"  # at-least-once falls back to at-most-once without it
    elif max_priority:
        arguments["x-max-priority"] = max_priority
    return arguments


def priority_levels(queue_type: QueueType, version: Version, max_priority: int | None) -> int:
    """How many message priorities a task queue tells apart (1: none, arrival order only)."""
    if queue_type is QueueType.classic:
        return (max_priority or 0) + 1
    if version >= STRICT_PRIORITIES_SINCE:
        return 32
    if version >= TWO_PRIORITIES_SINCE:
        return 2
    return 1


def cost(queue_type: QueueType, version: Version, max_priority: int | None, shown_version: str) -> str:
    """One line: the queue type on this broker, and what it costs (replication, priorities)."""
    head = f"queues: {queue_type} on RabbitMQ {shown_version}"
    levels = priority_levels(queue_type, version, max_priority)
    if queue_type is QueueType.classic:
        return (
            f"{head}: not replicated (each queue lives on one node), message priorities 0-{levels - 1}"
            f" (urgent tasks overtake)"
        )
    if levels == 1:
        return f"{head}: replicated, no message priorities (urgent tasks do not overtake)"
    if levels == 2:
        return (
            f"{head}: replicated, priorities: 2 levels on quorum queues (high and urgent tasks go"
            f" before low and normal ones, two for one)"
        )
    return f"{head}: replicated, priorities: {levels} strict levels on quorum queues (urgent tasks overtake)"


def existing_type(reply_text: str) -> QueueType | None:
    """The type of a queue RabbitMQ refused to redeclare, read from its reply; None if it does not tell.

    RabbitMQ names the first argument that differs: ``x-max-priority`` present
    only on classic queues, ``x-queue-type``, ``x-dead-letter-strategy`` and
    ``x-overflow`` only on quorum ones.
    """
    found = _INEQUIVALENT.search(reply_text)
    if found is None:
        return None
    argument, _received, current = found.groups()
    if argument in _QUORUM_ONLY:
        return QueueType.classic if current == "none" or "'classic'" in current else QueueType.quorum
    if argument == "x-max-priority":
        return QueueType.quorum if current == "none" else QueueType.classic
    return None


def mismatch(queue: str, vhost: str, queue_type: QueueType, reply_text: str) -> QueueMismatch:
    """The one-line refusal for a queue that exists with other arguments, with the fix."""
    reason = reply_text.split(" - ", 1)[-1]
    found = existing_type(reply_text)
    fix = (
        "drain its tasks (or let them finish), delete the vhost's queues (gpu, cpu, control and their"
        " .DQ and .XQ) and start again, or give MORAG_BROKER_URL a new vhost"
    )
    if found is not None and found is not queue_type:
        return QueueMismatch(
            f"queue {queue} in vhost {vhost!r} is a {found} queue, but MORAG_BROKER_QUEUE_TYPE={queue_type}"
            f" (RabbitMQ: {reason}); a queue's type never changes: {fix}, or set"
            f" MORAG_BROKER_QUEUE_TYPE={found}"
        )
    return QueueMismatch(
        f"queue {queue} in vhost {vhost!r} exists with other arguments than MORAG_BROKER_QUEUE_TYPE="
        f"{queue_type} and MORAG_BROKER_MAX_PRIORITY declare (RabbitMQ: {reason}); every server and worker"
        f" of a vhost needs the same two settings: use the ones the queues were declared with, or {fix}"
    )
