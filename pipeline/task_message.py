"""The task message: the job a task actor's message carries, built, read and moved here alone.

A task message is a Dramatiq message of a task actor (one per kind,
``pipeline.kinds``) whose one keyword argument, ``job``, holds what a
worker needs: task id, kind, input file ref, media facts, options, route and
transfer grant (``build_job``). Middleware, the sweep, the dead-letter tools
and the worker read it with ``job_of`` and ``task_id_of``; a message that
moves to another queue is copied with ``moved``, which keeps the job's route,
the message's record of moves and its time limit in step.

A job names the schema it is written in (``schema``), on the same rules as
``control``'s reports: additive fields keep it, a worker refuses a job in a
schema it does not read (``check_job``), and a job with none reads as schema 1.
Schema 2 adds the transcription options of ``speech_options`` (word timestamps,
``language: auto``, translation, ...), which a schema-1 worker would ignore or
misread; a job that asks none of them is still written in schema 1, so that
workers of the previous release keep taking it (``job_schema``). Schema 3 is the
job of a chunk of a long recording (``pipeline.chunks``), whose media's ``slice``
says which seconds to transcribe: a schema-2 worker would transcribe them all.

A transcription's job may name the live workers that hold its model loaded (``affinity``:
the model, the queue they were seen on, their ids): a worker of that queue that holds it not
puts the task back once for one of them to take (``pipeline.middleware.model_affinity``).
Workers of earlier releases ignore it, so the schema stays.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import dq_name

from pipeline import control
from pipeline.processors.speech_options import AUTO
from pipeline.processors.speech_options import KEYS as SPEECH_KEYS

if TYPE_CHECKING:  # workers read jobs without the server's store (and its database layer)
    from pipeline.store import Task

#: The newest schema this release writes jobs in, and the oldest one its workers still read.
JOB_SCHEMA = 3
OLDEST_JOB_SCHEMA = 1


def job_schema(options: dict[str, Any]) -> int:
    """The oldest schema that says what ``options`` ask: 2 with a transcription option of schema 2."""
    language_only = set(options) & set(SPEECH_KEYS) <= {"language"}
    return 1 if language_only and options.get("language") != AUTO else 2


def build_job(task: Task, grant: str | None = None, affinity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The message body a worker needs, and nothing more: with ``grant``, its transfer grant;
    with ``affinity``, the workers that hold its model (``model_affinity``).

    The job of a chunk of a long recording (its media names a ``slice``) is written in schema 3:
    a worker that reads only 2 would transcribe the whole recording for each chunk.
    """
    job = {
        "schema": 3 if "slice" in task.input.get("media", {}) else job_schema(task.options),
        "task_id": task.id,
        "kind": task.kind,
        "filename": task.filename,
        "input": {k: task.input[k] for k in ("path", "sha256", "size", "url") if k in task.input},
        "media": task.input["media"],
        "options": task.options,
        "route": {"queue": task.route["queue"], "gpu": task.route["gpu"]},
    }
    if grant is not None:
        job["grant"] = grant
    if affinity:
        job["affinity"] = affinity
    return job


def model_affinity(model: str, queue: str, holders: list[str]) -> dict[str, Any] | None:
    """A job's ``affinity``: the workers of ``queue`` that hold ``model``; None when none does."""
    return {"model": model, "queue": queue, "workers": sorted(holders)} if holders else None


def affinity_of(job: dict[str, Any]) -> dict[str, Any]:
    """The job's ``affinity`` (empty when it names none)."""
    found = job.get("affinity")
    return found if isinstance(found, dict) and isinstance(found.get("workers"), list) else {}


def job_of(message: dramatiq.Message | MessageProxy) -> dict[str, Any] | None:
    """The job a message carries (``job=``, or its first argument); None for any other message.

    A delivered message (a ``MessageProxy``) is read once: it keeps what was found, as some
    five middleware ask for it on every message (``bench/broker_throughput.py``)."""
    if isinstance(message, MessageProxy):
        found = message.__dict__.get("_job", _UNREAD)
        if found is _UNREAD:
            found = message.__dict__["_job"] = _read_job(message._message)
        return found
    return _read_job(message)


#: ``job_of``'s mark for a delivered message whose job it has not read yet.
_UNREAD: Any = object()


def _read_job(message: dramatiq.Message) -> dict[str, Any] | None:
    kwargs = message.kwargs if isinstance(message.kwargs, dict) else {}
    job = kwargs.get("job")
    if job is None and message.args:
        job = message.args[0]
    return job if isinstance(job, dict) else None


def check_job(job: dict[str, Any]) -> None:
    """Refuse (``UnsupportedSchema``) a job in a schema this worker does not read."""
    control.check_schema(job.get("schema"), "the task message", JOB_SCHEMA, OLDEST_JOB_SCHEMA, "this worker")


def task_id_of(message: dramatiq.Message) -> str | None:
    job = job_of(message)
    task_id = job.get("task_id") if job else None
    return task_id if isinstance(task_id, str) else None


def route_of(job: dict[str, Any]) -> dict[str, Any]:
    """The job's route: its queue and its GPU preference (``prefer`` when it says none)."""
    route = job.get("route")
    return route if isinstance(route, dict) else {}


def gpu_preference(job: dict[str, Any]) -> str:
    return str(route_of(job).get("gpu", "prefer"))


def moved(
    message: dramatiq.Message, target: str, reason: str, by: str, time_limit_s: int, at: float | None = None
) -> dramatiq.Message:
    """A copy of a task message for queue ``target`` (its delay queue for a delayed message).

    The job's route names the new queue, ``options["rerouted"]`` keeps the move
    with its reason, and the time limit is the one the task has there.
    """
    job = job_of(message) or {}
    source = message.queue_name.removesuffix(".DQ")
    move = {"from": source, "to": target, "reason": reason, "by": by, "at": time.time() if at is None else at}
    queue = dq_name(target) if message.queue_name.endswith(".DQ") else target
    return message.copy(
        queue_name=queue,
        kwargs={**message.kwargs, "job": {**job, "route": {**route_of(job), "queue": target}}},
        options={"rerouted": [*message.options.get("rerouted", []), move], "time_limit": time_limit_s * 1000},
    )


def with_grant(message: dramatiq.Message, grant: str) -> dramatiq.Message:
    """A copy of a task message carrying a fresh transfer grant."""
    job = job_of(message) or {}
    return message.copy(kwargs={**message.kwargs, "job": {**job, "grant": grant}})
