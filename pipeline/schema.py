"""The server's database schema: every table of the task store, in one MetaData.

SQLite (the embedded default) and PostgreSQL hold the same tables. Times are
seconds since the epoch (REAL on SQLite, DOUBLE PRECISION on PostgreSQL);
JSON values are kept as text, so a database copies between the two verbatim.
Changes to this schema are Alembic revisions in ``pipeline/migrations``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
)
from sqlalchemy.dialects import sqlite

metadata = MetaData()

#: Seconds since the epoch: REAL on SQLite (as the first release wrote it), double precision elsewhere.
Time = Double().with_variant(sqlite.REAL(), "sqlite")
#: Counters that may pass 2**31 (bytes, event ids): INTEGER on SQLite, BIGINT elsewhere.
Count = BigInteger().with_variant(Integer(), "sqlite")


def _json(name: str, default: str) -> Column:
    return Column(name, Text, nullable=False, server_default=default)


tasks = Table(
    "tasks",
    metadata,
    Column("id", Text, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("filename", Text, nullable=False),
    Column("input", Text, nullable=False),
    Column("options", Text, nullable=False),
    Column("route", Text, nullable=False),
    _json("progress", "{}"),
    _json("outputs", "[]"),
    _json("result", "{}"),
    Column("error", Text),
    Column("worker", Text),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("created_at", Time, nullable=False),
    Column("updated_at", Time, nullable=False),
    Column("started_at", Time),
    Column("finished_at", Time),
    # The outbox: NULL until the task's message is published.
    Column("published_at", Time),
    Column("deliveries", Integer, nullable=False, server_default="0"),
    Index("tasks_state", "state"),
    Index("tasks_created", "created_at"),
    Index("tasks_finished", "finished_at"),
    Index("tasks_worker", "worker", "created_at"),
)

events = Table(
    "events",
    metadata,
    Column("id", Count, primary_key=True, autoincrement=True),
    Column("task_id", Text, ForeignKey("tasks.id"), nullable=False),
    Column("ts", Time, nullable=False),
    Column("event", Text, nullable=False),
    _json("detail", "{}"),
    Index("events_task", "task_id", "id"),
    sqlite_autoincrement=True,
)

seen_nonces = Table(
    "seen_nonces",
    metadata,
    Column("nonce", Text, primary_key=True),
    Column("ts", Time, nullable=False),
)

upload_usage = Table(
    "upload_usage",
    metadata,
    Column("key", Text, nullable=False),
    Column("day", Integer, nullable=False),
    Column("bytes", Count, nullable=False),
    PrimaryKeyConstraint("key", "day"),
)


def _heartbeat_columns() -> list[Column]:
    """The columns a worker's row and each of its processes' rows share (after their keys)."""
    return [
        Column("host", Text, nullable=False, server_default=""),
        Column("pid", Integer),
        Column("capability", Text, nullable=False),
        _json("queues", "[]"),
        Column("threads", Integer, nullable=False, server_default="0"),
        _json("hardware", "{}"),
        _json("models", "[]"),
        _json("current", "[]"),
        Column("done", Integer, nullable=False, server_default="0"),
        Column("failed", Integer, nullable=False, server_default="0"),
        Column("skipped", Integer, nullable=False, server_default="0"),
        _json("speed", "{}"),
        Column("draining", Integer, nullable=False, server_default="0"),
        Column("version", Text, nullable=False, server_default=""),
        Column("state", Text, nullable=False),
        Column("reason", Text),
    ]


def _times(*names: str) -> list[Column]:
    return [
        Column(name, Time, nullable=name not in ("joined_at", "last_seen", "state_since")) for name in names
    ]


workers = Table(
    "workers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("session", Text, nullable=False),
    *_heartbeat_columns(),
    Column("first_seen", Time, nullable=False),
    *_times("joined_at", "last_seen", "sent_at", "state_since", "booted_at"),
    Column("beats", Integer, nullable=False, server_default="0"),
    Index("workers_state", "state"),
)

worker_processes = Table(
    "worker_processes",
    metadata,
    Column("worker_id", Text, nullable=False),
    Column("session", Text, nullable=False),
    *_heartbeat_columns(),
    *_times("joined_at", "last_seen", "sent_at", "state_since", "booted_at"),
    Column("beats", Integer, nullable=False, server_default="0"),
    PrimaryKeyConstraint("worker_id", "session"),
)

worker_events = Table(
    "worker_events",
    metadata,
    Column("id", Count, primary_key=True, autoincrement=True),
    Column("worker_id", Text, nullable=False),
    Column("ts", Time, nullable=False),
    Column("event", Text, nullable=False),
    _json("detail", "{}"),
    Index("worker_events_worker", "worker_id", "id"),
    sqlite_autoincrement=True,
)

refused_senders = Table(
    "refused_senders",
    metadata,
    Column("worker", Text, primary_key=True),
    Column("refused", Integer, nullable=False, server_default="0"),
    Column("first_at", Time, nullable=False),
    Column("last_at", Time, nullable=False),
    Column("last_reason", Text, nullable=False),
    Column("last_report", Text, nullable=False),
)

queue_liveness = Table(
    "queue_liveness",
    metadata,
    Column("queue", Text, primary_key=True),
    Column("down_since", Time),
)

worker_tokens = Table(
    "worker_tokens",
    metadata,
    Column("id", Text, primary_key=True),
    Column("worker", Text, nullable=False),
    Column("capability", Text, nullable=False),
    Column("issued_at", Time, nullable=False),
    Column("expires_at", Time, nullable=False),
    Column("revoked_at", Time),
    Column("broker_user", Text),
    Column("last_used_at", Time),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("role", Text, nullable=False),
    Column("digest", Text, nullable=False),
    Column("created_at", Time, nullable=False),
    Column("revoked_at", Time),
)

server_parts = Table(
    "server_parts",
    metadata,
    Column("name", Text, primary_key=True),
    Column("at", Time, nullable=False),
    _json("detail", "{}"),
)

#: The monitoring history (``pipeline.history``): one row per task queue per sample, written by the
#: sweep; ``done`` and ``failed`` count the tasks of the queue that ended since the sample before.
monitor_samples = Table(
    "monitor_samples",
    metadata,
    Column("ts", Time, nullable=False),
    Column("queue", Text, nullable=False),
    Column("interval_s", Time, nullable=False),
    Column("messages", Count),
    Column("consumers", Integer),
    Column("dead", Count),
    Column("live", Integer, nullable=False, server_default="0"),
    Column("done", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    PrimaryKeyConstraint("ts", "queue"),
)

#: Who submitted each task (``owner``: the API key's id, or the principal's name without one): the
#: ``GET /api/v1/events`` stream of a key follows the tasks of that key.
task_owners = Table(
    "task_owners",
    metadata,
    Column("task_id", Text, ForeignKey("tasks.id"), primary_key=True),
    Column("owner", Text, nullable=False),
    Index("task_owners_owner", "owner", "task_id"),
)

#: The ``Idempotency-Key`` of each submit, per owner: the same key again returns ``task_id``.
#: ``task_id`` is NULL while the first request with the key is still being received.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("owner", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("task_id", Text),
    Column("created_at", Time, nullable=False),
    PrimaryKeyConstraint("owner", "key"),
    Index("idempotency_keys_created", "created_at"),
)

#: The webhook of each task submitted with a ``callback_url`` (``pipeline.webhooks``): ``waiting``
#: while the task runs, ``pending`` from its end until a 2xx answer (``delivered``) or its max age
#: (``gave_up``). ``claimed_until`` is the lease of the server sending it (one replica sends each);
#: ``due_since`` is when the task ended (the max age counts from it). ``key_id`` names the API key
#: whose webhook secret signs it (NULL: a request without a key, in development mode).
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("task_id", Text, ForeignKey("tasks.id"), primary_key=True),
    Column("url", Text, nullable=False),
    Column("key_id", Text),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("created_at", Time, nullable=False),
    Column("due_since", Time),
    Column("next_attempt_at", Time),
    Column("claimed_until", Time),
    Column("claimed_by", Text),
    Column("last_attempt_at", Time),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("delivered_at", Time),
    Index("webhook_deliveries_due", "state", "next_attempt_at"),
)

#: The version of each API key's webhook secret (derived from the server secret, the key's id and
#: this version; no row: version 1). ``morag-pipeline apikey webhook-secret --rotate`` adds one.
webhook_secret_versions = Table(
    "webhook_secret_versions",
    metadata,
    Column("key_id", Text, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("rotated_at", Time, nullable=False),
)
