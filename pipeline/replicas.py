"""A server's place on its vhost: the only server, or one replica of a group.

A server on SQLite (no ``MORAG_DATABASE_URL``) is alone on its vhost: it holds
the exclusive queue ``morag.server``. RabbitMQ lets only the connection that
declared an exclusive queue use it and deletes it when that connection
closes, so a second server's declare is refused (RESOURCE_LOCKED) while the
first lives, and succeeds once it died, however it died. Two such servers
would each consume ``control`` into their own database: workers would flap
between them and completions would be lost.

Servers on PostgreSQL are replicas of one group. Each consumes two queues,
auto-deleted when their last consumer goes: ``morag.replicas``, which every
replica on the vhost consumes, and ``morag.replicas.<database id>``, which
only the replicas of one database consume (the id is one the database
records for itself). A replica that finds replicas running but none on its
database is refused: two groups would consume ``control`` into two
databases. The replicas of a group must also share the secret, the file
store and the SFTP host key: the first replica of a group records what it
holds in the database, and one that joins running replicas compares and is
refused, with what differs, before it serves anything. The consumers of
``morag.replicas`` are the replicas running now, which the management UI
shows by connection name.

The two kinds exclude each other: a single server refuses to start while
replicas consume ``morag.replicas``, and a replica while ``morag.server``
exists. (Two servers started in the same instant may both pass these
checks; start replicas one after the other.)

Each server holds its place on a connection of its own, kept open (and its
heartbeats answered) by a thread; should RabbitMQ drop it, the thread takes
the place again.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import threading
from pathlib import Path

import pika
import pika.exceptions

from pipeline.config import Settings, redact_url
from pipeline.errors import PipelineError
from pipeline.logs import get_logger

logger = get_logger(__name__)

SINGLE_QUEUE = "morag.server"
REPLICAS_QUEUE = "morag.replicas"
#: The file in the file store that names it: replicas sharing one store read the same id.
STORE_ID_NAME = ".store-id"
#: The names under which the database records its own id, and what a group's replicas share
#: (table server_parts).
DATABASE_ID_PART = "database id"
GROUP_PART = "replica group"

#: What a replica must share with the others, and how to fix a difference.
SHARED = {
    "secret": "its MORAG_SECRET_KEY differs from the running replicas' one; give every replica the same",
    "store": (
        "its MORAG_FILES_DIR is not the folder the running replicas share (the store ids differ);"
        " mount the same shared folder on every replica"
    ),
    "sftp_key": (
        "its SFTP host key differs from the one the running replicas serve, and workers would refuse it;"
        " point MORAG_SFTP_SERVER_KEY_FILE at the same key file on every replica"
    ),
}


class AnotherServer(PipelineError):
    """This server cannot take a place on the vhost: another server holds it, or differs."""


def is_replicated(settings: Settings) -> bool:
    """Whether this server is one replica of a group: its store is on PostgreSQL."""
    url = settings.database_url.get_secret_value() if settings.database_url else ""
    return url.startswith(("postgresql", "postgres:"))


def store_id(files_dir: Path) -> str:
    """The id of the file store in ``files_dir``, made on first use; replicas sharing it read one id."""
    path = files_dir / STORE_ID_NAME
    files_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        value = secrets.token_hex(8)
        f.write(value + "\n")
    return value


def database_id(settings: Settings) -> str:
    """The id the database records for itself, made on first use; replicas on one database read one id."""
    from pipeline.health import PartLog

    parts = PartLog(settings)
    parts.mark_once(DATABASE_ID_PART, {"id": secrets.token_hex(8)})
    record = parts.last(DATABASE_ID_PART)
    assert record is not None
    return str(record[1]["id"])


def shared_settings(settings: Settings, sftp_fingerprint: str | None) -> dict[str, str | None]:
    """What every replica of a group must share, as values that reveal none of it."""
    from pipeline.security.keys import server_secret

    secret = hmac.new(server_secret(settings), b"morag replica group", hashlib.sha256).hexdigest()[:16]
    return {"secret": secret, "store": store_id(settings.files_dir), "sftp_key": sftp_fingerprint}


class ServerPlace:
    """This server's place on its vhost, held while it runs (see the module's docstring).

    Parameters:
      settings: how to reach RabbitMQ, and whether this server is a replica (``is_replicated``).
      sftp_fingerprint: the host key the embedded SFTP server serves (None: none is served).
    """

    def __init__(self, settings: Settings, sftp_fingerprint: str | None = None) -> None:
        self.settings = settings
        self.replicated = is_replicated(settings)
        self.sftp_fingerprint = sftp_fingerprint
        self._connection: pika.BlockingConnection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the place, or raises AnotherServer with the reason and the fix."""
        self._connection = self._take()
        self._thread = threading.Thread(target=self._hold, name="morag-server-place", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def replicas(self) -> int:
        """How many replicas of the group run now (1 for a single server)."""
        if not self.replicated:
            return 1
        return _consumers(self.settings, REPLICAS_QUEUE) or 0

    def _refuse(self, reason: str) -> AnotherServer:
        url = redact_url(self.settings.broker_url.get_secret_value())
        return AnotherServer(f"{reason} ({url})")

    def _take(self) -> pika.BlockingConnection:
        from pipeline.brokers.rabbitmq import connection_parameters

        params = connection_parameters(self.settings)
        kind = "replica" if self.replicated else "server"
        params.client_properties = {
            "connection_name": f"morag-pipeline {kind} on {socket.gethostname()} (pid {os.getpid()})"
        }
        connection = pika.BlockingConnection(params)
        try:
            if self.replicated:
                self._join(connection)
            else:
                self._hold_alone(connection)
        except BaseException:
            if connection.is_open:
                connection.close()
            raise
        return connection

    def _hold_alone(self, connection: pika.BlockingConnection) -> None:
        running = _consumers(self.settings, REPLICAS_QUEUE, connection)
        if running:
            raise self._refuse(
                f"{running} morag-pipeline server replicas with a PostgreSQL store consume this vhost;"
                " set MORAG_DATABASE_URL to their database to join them, or use another vhost"
            )
        try:
            connection.channel().queue_declare(SINGLE_QUEUE, exclusive=True, auto_delete=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 405:  # RESOURCE_LOCKED
                raise
            raise self._refuse(
                f"another morag-pipeline server consumes this vhost (it holds the queue {SINGLE_QUEUE});"
                " run one server per vhost, give each its own MORAG_BROKER_URL vhost, or run replicas"
                " of one server on a PostgreSQL store (MORAG_DATABASE_URL, docs/replicas.md)"
            ) from None

    def _join(self, connection: pika.BlockingConnection) -> None:
        if _consumers(self.settings, SINGLE_QUEUE, connection) is not None:
            raise self._refuse(
                f"a morag-pipeline server with its own SQLite store holds this vhost (the queue"
                f" {SINGLE_QUEUE}); stop it, or move its store to this PostgreSQL database first"
                " (morag-pipeline db migrate-from-sqlite)"
            )
        from pipeline.health import PartLog

        group = f"{REPLICAS_QUEUE}.{database_id(self.settings)}"
        running = _consumers(self.settings, REPLICAS_QUEUE, connection) or 0
        ours = _consumers(self.settings, group, connection) or 0
        if running and not ours:
            raise self._refuse(
                f"{running} morag-pipeline server replicas on another database consume this vhost:"
                " this replica's MORAG_DATABASE_URL reaches another database than theirs"
            )
        mine = shared_settings(self.settings, self.sftp_fingerprint)
        parts = PartLog(self.settings)
        recorded = parts.last(GROUP_PART)
        if ours and recorded is not None:
            for name, value in mine.items():
                if recorded[1].get(name) != value:
                    raise self._refuse(f"this replica cannot join the running ones: {SHARED[name]}")
        elif not ours:
            parts.mark(GROUP_PART, mine)  # the first replica of a group says what the others share
        channel = connection.channel()
        for queue in (REPLICAS_QUEUE, group):
            channel.queue_declare(queue, auto_delete=True)
            channel.basic_consume(queue, lambda *_: None, auto_ack=True)

    def _hold(self) -> None:
        while not self._stop.is_set():
            try:
                if self._connection is None or not self._connection.is_open:
                    self._connection = self._take()
                    logger.warning("server place taken again after RabbitMQ dropped it")
                self._connection.process_data_events(time_limit=1)
            except Exception as exc:
                logger.error("server place lost; taking it again", extra={"error": str(exc)})
                self._connection = None
                self._stop.wait(5)
        if self._connection is not None and self._connection.is_open:
            self._connection.close()


def _consumers(
    settings: Settings, queue: str, connection: pika.BlockingConnection | None = None
) -> int | None:
    """The consumers of ``queue``, or None when it does not exist (a passive declare)."""
    from pipeline.brokers.rabbitmq import connection_parameters

    own = connection is None
    connection = connection or pika.BlockingConnection(connection_parameters(settings))
    try:
        channel = connection.channel()
        try:
            declared = channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:  # NOT_FOUND
                return None
            if exc.reply_code == 405:  # RESOURCE_LOCKED: exclusive to another connection, so it exists
                return 1
            raise
        channel.close()
        return declared.method.consumer_count
    finally:
        if own and connection.is_open:
            connection.close()
