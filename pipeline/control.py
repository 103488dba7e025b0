"""The contract of the ``control`` queue: what workers send the server, under which actor names.

Workers never import the server's actors: a message names its actor, and only
the server consumes ``control``. Every report a worker sends is built here.

Outcomes (a task's start, progress, completion, retry, failure, notes and
moves) are applied at least once and never refused for their age: the
task's state decides what a late one means, and the nonce of each applied
message is recorded with its effect, so a redelivered one is a no-op.
Heartbeats are only news while they are fresh.
"""

from __future__ import annotations

import time
from typing import Any

import dramatiq
from dramatiq import Broker

QUEUE = "control"

TASK_STARTED = "task_started"
TASK_PROGRESS = "task_progress"
TASK_COMPLETED = "task_completed"
TASK_RETRYING = "task_retrying"
TASK_FAILED = "task_failed"
TASK_NOTE = "task_note"
TASK_REROUTED = "task_rerouted"
WORKER_HEARTBEAT = "worker_heartbeat"
WORKER_GOODBYE = "worker_goodbye"

OUTCOMES = frozenset(
    {TASK_STARTED, TASK_PROGRESS, TASK_COMPLETED, TASK_RETRYING, TASK_FAILED, TASK_NOTE, TASK_REROUTED}
)
HEARTBEATS = frozenset({WORKER_HEARTBEAT, WORKER_GOODBYE})


def report(actor_name: str, **kwargs: Any) -> dramatiq.Message:
    """The message of one report to the server; task reports carry the sender and the time."""
    if actor_name in OUTCOMES:
        from pipeline.identity import worker_id

        kwargs.setdefault("worker", worker_id())
        kwargs.setdefault("ts", time.time())
    return dramatiq.Message(queue_name=QUEUE, actor_name=actor_name, args=(), kwargs=kwargs, options={})


def send(broker: Broker, actor_name: str, **kwargs: Any) -> dramatiq.Message:
    """Publish one report (signed on the way out by MessageSigning); raises what the broker raises."""
    return broker.enqueue(report(actor_name, **kwargs))
