"""The contract of the ``control`` queue: what workers send the server, under which actor names.

Workers never import the server's actors: a message names its actor, and only
the server consumes ``control``. Every report a worker sends is built here.

Outcomes (a task's start, progress, completion, retry, failure, notes and
moves) are applied at least once and never refused for their age: the
task's state decides what a late one means, and the nonce of each applied
message is recorded with its effect, so a redelivered one is a no-op.
Heartbeats are only news while they are fresh.

Every report carries the schema it is written in (``options["schema"]``).
Additive changes (a new optional field) keep the schema, and the server's
handlers ignore fields they do not know; a change an older peer would misread
raises ``SCHEMA``. The server refuses a report in a schema it does not read,
with the reason (``check_schema``), instead of guessing at it. Reports with no
schema come from releases before schemas were written, and read as schema 1.
"""

from __future__ import annotations

import time
from typing import Any

import dramatiq
from dramatiq import Broker

from pipeline.errors import UnsupportedSchema

QUEUE = "control"

#: The schema this release writes its reports in, and the oldest one it still reads.
SCHEMA = 1
OLDEST_SCHEMA = 1
SCHEMA_OPTION = "schema"

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
    return dramatiq.Message(
        queue_name=QUEUE, actor_name=actor_name, args=(), kwargs=kwargs, options={SCHEMA_OPTION: SCHEMA}
    )


def check_schema(written: object, what: str, newest: int, oldest: int, upgrade: str) -> None:
    """Refuse a message written in a schema outside ``oldest``..``newest`` (missing: schema 1).

    Parameters:
      written: the schema the message names.
      what: what the message is, for the reason ("report", "task message").
      newest, oldest: the schemas this release reads.
      upgrade: which side to upgrade when the message is newer ("the server", "this worker").
    """
    schema = 1 if written is None else written
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise UnsupportedSchema(f"{what} names schema {schema!r}, which is not a schema number")
    if schema > newest:
        raise UnsupportedSchema(
            f"{what} is written in schema {schema}, newer than this release reads ({newest}):"
            f" upgrade {upgrade}"
        )
    if schema < oldest:
        raise UnsupportedSchema(
            f"{what} is written in schema {schema}, older than this release reads ({oldest}):"
            " upgrade its sender"
        )


def send(broker: Broker, actor_name: str, **kwargs: Any) -> dramatiq.Message:
    """Publish one report (signed on the way out by MessageSigning); raises what the broker raises."""
    return broker.enqueue(report(actor_name, **kwargs))
