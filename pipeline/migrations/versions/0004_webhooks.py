"""Signed webhooks: each task's delivery, and the version of each API key's webhook secret.

``webhook_deliveries`` holds the callback of a task submitted with a
``callback_url`` from submit until it is delivered or given up, so a delivery
survives a server restart and one replica claims each. ``webhook_secret_versions``
counts the rotations of each key's webhook secret (the secret itself is derived
from the server secret and is never stored).

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Column, Double, ForeignKey, Index, Integer, MetaData, Table, Text
from sqlalchemy.dialects import sqlite

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# This revision's tables, frozen here: later revisions change pipeline.schema, not this.
Time = Double().with_variant(sqlite.REAL(), "sqlite")
metadata = MetaData()
tasks = Table("tasks", metadata, Column("id", Text, primary_key=True))
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
webhook_secret_versions = Table(
    "webhook_secret_versions",
    metadata,
    Column("key_id", Text, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("rotated_at", Time, nullable=False),
)


def upgrade() -> None:
    bind = op.get_bind()
    present = set(sa.inspect(bind).get_table_names())
    for table in (webhook_deliveries, webhook_secret_versions):
        if table.name not in present:
            table.create(bind)


def downgrade() -> None:
    webhook_secret_versions.drop(op.get_bind(), checkfirst=True)
    webhook_deliveries.drop(op.get_bind(), checkfirst=True)
