"""Dead letters: messages that failed for good, kept in ``<queue>.XQ``.

Workers put a failed message there with its reason (``bury``): a copy that
carries an ``options["dead_letter"]`` record (reason, time, worker, retries,
deliveries) is published with confirm, then the original is acknowledged. A
message RabbitMQ dead-letters on its own (rejected by a worker that could not
publish, or unknown to the worker's actors) arrives without that record; its
``x-death`` header and last traceback stand in for it.

The server reads them without taking them (``browse``: every message of the
queue fetched unacknowledged, then released, so their order stays), retries
chosen ones (``retry``: the task goes back to ``queued`` with its history,
the message to its queue without its run counters) and purges them
(``purge``). Dramatiq declares each ``<queue>.XQ`` with a 7-day message TTL:
an unattended dead letter disappears after a week.

What a dead letter shows (``DeadLetter``, the API's ``/dead`` and the CLI) is
``redacted``: a task's transfer grant, a report's signature block and any
token or URL password in its options, body, reason or traceback are replaced
by ``[redacted]``, for every reader; a retry sends the message as it was.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import dramatiq
import pika
from dramatiq import Broker
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name, xq_name
from dramatiq.errors import BrokerConnectionError, DecodeError

from pipeline.errors import TaskNotFound
from pipeline.identity import worker_id
from pipeline.logs import get_logger
from pipeline.security import signatures
from pipeline.task_message import job_of, with_grant

if TYPE_CHECKING:  # workers dead-letter without the server's store (and its database layer)
    from pipeline.store import TaskStore

logger = get_logger(__name__)

#: Options that describe one run of a message; a retried dead letter starts without them.
RUN_OPTIONS = frozenset({"retries", "traceback", "requeue_timestamp", "deliveries", "dead_letter", "eta"})


#: What stands, in a dead letter shown to a reader, for a secret the message carried.
REDACTED = "[redacted]"
#: Keys whose values are credentials: a task's transfer grant, a signature block, tokens, passwords.
SECRET_KEYS = frozenset({"grant", signatures.OPTION, "token", "password", "secret", "api_key",
                         "worker_token", "worker_key", "secret_key", "sftp_password"})  # fmt: skip
#: A JSON Web Token (grants and worker tokens are), wherever it appears in a string.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
#: The password of a URL's credentials (``scheme://user:password@host``).
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*):[^/\s@]*@")


def redacted(value: Any) -> Any:
    """``value`` (options, a body, a reason, a traceback) with every credential it holds replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if str(k).lower() in SECRET_KEYS else redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\1:{REDACTED}@", _JWT.sub(REDACTED, value))
    return value


def condemn(message: MessageProxy, reason: str) -> None:
    """Mark a message for the dead letters with ``reason`` (the DeadLetters middleware buries it)."""
    message.options["dead_letter"] = {"reason": reason}
    message.fail()


def bury(broker: Broker, message: MessageProxy, reason: str) -> bool:
    """Publish the message, with its dead-letter record, to ``<queue>.XQ``; False if that failed.

    The caller acknowledges the original only when this returns True;
    otherwise it is rejected and RabbitMQ dead-letters it without a record.
    """
    queue = q_name(message.queue_name)
    record = {
        "reason": reason,
        "at": time.time(),
        "worker": worker_id(),
        "queue": queue,
        "retries": message.options.get("retries", 0),
        "deliveries": message.options.get("deliveries", 1),
    }
    letter = message.copy(queue_name=xq_name(queue), options={"dead_letter": record})
    try:
        broker.enqueue(letter)
    except BrokerConnectionError as exc:
        logger.warning(
            "dead letter not published; the message is rejected instead",
            extra={"message_id": message.message_id, "error": str(exc)},
        )
        return False
    return True


@dataclass
class DeadLetter:
    """One message in a dead-letter queue, as the CLI and the API show it (``redacted``)."""

    queue: str
    message_id: str
    actor: str
    task_id: str | None
    filename: str | None
    reason: str
    dead_at: float | None
    worker: str | None
    retries: int
    deliveries: int
    traceback: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("traceback", "options", "body"):
            data.pop(key)
        return data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, ids: Iterable[str]) -> bool:
        return any(i in (self.message_id, self.task_id) for i in ids)


def _letter(
    queue: str, properties: pika.BasicProperties, body: bytes
) -> tuple[DeadLetter, dramatiq.Message | None]:
    try:
        message = dramatiq.Message.decode(body)
    except DecodeError:
        return DeadLetter(
            queue, "?", "?", None, None, "undecodable message body", None, None, 0, 1,
            body={"raw": redacted(body[:2000].decode("utf-8", errors="replace"))},
        ), None  # fmt: skip
    options = dict(message.options)
    record = options.get("dead_letter") or {}
    job = job_of(message) or {}
    traceback = options.get("traceback")
    reason = record.get("reason")
    dead_at = record.get("at")
    if reason is None:
        death = ((properties.headers or {}).get("x-death") or [{}])[0]
        last = traceback.strip().splitlines()[-1] if traceback else "no reason recorded"
        reason = f"{death.get('reason', 'rejected')} by a worker: {last}"
        when = death.get("time")
        dead_at = calendar.timegm(when.utctimetuple()) if hasattr(when, "utctimetuple") else None
    letter = DeadLetter(
        queue=queue,
        message_id=message.message_id,
        actor=message.actor_name,
        task_id=job.get("task_id"),
        filename=job.get("filename"),
        reason=redacted(str(reason)),
        dead_at=dead_at,
        worker=record.get("worker"),
        retries=int(options.get("retries", 0)),
        deliveries=int(options.get("deliveries", 1)),
        traceback=redacted(traceback) if isinstance(traceback, str) else None,
        options=redacted(options),
        body=redacted(message.asdict()),
    )
    return letter, message


@dataclass
class _Held:
    tag: int
    letter: DeadLetter
    message: dramatiq.Message | None


@contextmanager
def _holding(
    parameters: pika.ConnectionParameters, queue: str, limit: int
) -> Iterator[tuple[pika.adapters.blocking_connection.BlockingChannel, list[_Held]]]:
    """Every message of ``queue``'s dead letters, held unacknowledged on one channel.

    Whatever the caller does not acknowledge goes back, in its order, when the
    channel closes.
    """
    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        try:
            count = channel.queue_declare(xq_name(queue), passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:  # never declared: no dead letters
            yield connection.channel(), []
            return
        held: list[_Held] = []
        for _ in range(min(count, limit)):
            method, properties, body = channel.basic_get(xq_name(queue), auto_ack=False)
            if method is None:
                break
            letter, message = _letter(queue, properties, body)
            held.append(_Held(method.delivery_tag, letter, message))
        yield channel, held
    finally:
        if connection.is_open:
            connection.close()


def browse(
    parameters: pika.ConnectionParameters, queues: Iterable[str], limit: int = 10_000
) -> list[DeadLetter]:
    """The dead letters of ``queues``, oldest first per queue; nothing is taken."""
    letters: list[DeadLetter] = []
    for queue in queues:
        with _holding(parameters, queue, limit) as (_, held):
            letters += [h.letter for h in held]
    return letters


def fresh_copy(message: dramatiq.Message) -> dramatiq.Message:
    """The message as it goes back to its queue: same id, args and route, no run counters."""
    options = {k: v for k, v in message.options.items() if k not in RUN_OPTIONS}
    options["dead_retries"] = int(message.options.get("dead_retries", 0)) + 1
    return dramatiq.Message(
        queue_name=q_name(message.queue_name),
        actor_name=message.actor_name,
        args=message.args,
        kwargs=message.kwargs,
        options=options,
        message_id=message.message_id,
    )


def _regranted(
    message: dramatiq.Message, regrant: Callable[[str, str | None], str] | None
) -> dramatiq.Message:
    job = job_of(message)
    if regrant is None or job is None or "grant" not in job:
        return message
    return with_grant(message, regrant(job["task_id"], job["input"].get("path")))


def retry(
    parameters: pika.ConnectionParameters,
    broker: Broker,
    store: TaskStore,
    queues: Iterable[str],
    ids: list[str] | None = None,
    regrant: Callable[[str, str | None], str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Send chosen dead letters (all when ``ids`` is None) back to their queues.

    ``regrant(task_id, input_path)`` gives a task message a fresh transfer
    grant: the one it carried may have expired while it lay dead.

    Each task goes back to ``queued`` first, with a ``requeued`` event; then
    the message is published with confirm and only then taken off the dead
    letters. A letter whose task is done or canceled stays where it is.
    """
    retried: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for queue in queues:
        with _holding(parameters, queue, limit=100_000) as (channel, held):
            for item in held:
                letter = item.letter
                if ids is not None and not letter.matches(ids):
                    continue
                if item.message is None:
                    skipped.append({**letter.summary(), "why": "undecodable; purge it"})
                    continue
                if signatures.OPTION in item.message.options:
                    # The server refuses a signed report it has seen (replay protection).
                    skipped.append({**letter.summary(), "why": "a worker's signed report cannot be replayed"})
                    continue
                why = _requeue_task(store, letter)
                if why:
                    skipped.append({**letter.summary(), "why": why})
                    continue
                try:
                    broker.enqueue(_regranted(fresh_copy(item.message), regrant))
                except BrokerConnectionError as exc:
                    if letter.task_id:
                        store.mark_failed(letter.task_id, f"dead letter retry not published: {exc}", None)
                    skipped.append({**letter.summary(), "why": f"could not publish: {exc}"})
                    continue
                channel.basic_ack(item.tag)
                retried.append(letter.summary())
                logger.info(
                    "dead letter retried",
                    extra={"task_id": letter.task_id, "queue": queue, "message_id": letter.message_id},
                )
    return {"retried": retried, "skipped": skipped}


def _requeue_task(store: TaskStore, letter: DeadLetter) -> str | None:
    """Put the letter's task back to queued; the reason it cannot be, or None."""
    if letter.task_id is None:
        return None
    try:
        task = store.get(letter.task_id, events=False)
    except TaskNotFound:
        return None  # a task the store does not know: the message still runs
    if task.state in ("done", "canceled"):  # State, a StrEnum
        return f"task is {task.state}; purge the letter instead"
    detail = {"from": xq_name(letter.queue), "message_id": letter.message_id, "reason": letter.reason}
    store.requeue(letter.task_id, detail)
    return None


def purge(parameters: pika.ConnectionParameters, queues: Iterable[str], ids: list[str] | None = None) -> int:
    """Drop chosen dead letters (all when ``ids`` is None); returns how many."""
    purged = 0
    for queue in queues:
        if ids is None:
            connection = pika.BlockingConnection(parameters)
            try:
                channel = connection.channel()
                with suppress(pika.exceptions.ChannelClosedByBroker):
                    purged += channel.queue_purge(xq_name(queue)).method.message_count
            finally:
                if connection.is_open:
                    connection.close()
            continue
        with _holding(parameters, queue, limit=100_000) as (channel, held):
            for item in held:
                if item.letter.matches(ids):
                    channel.basic_ack(item.tag)
                    purged += 1
    return purged
