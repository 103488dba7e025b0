"""The monitoring history: the ``monitor_samples`` table, and two indexes on tasks.

The dashboard's charts read ``monitor_samples`` (one row per task queue per
sweep); each sample counts the tasks that ended since the one before, which
the ``tasks_finished`` index makes a range read instead of a scan. The
dashboard lists a worker's latest tasks through ``tasks_worker``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy import BigInteger, Column, Double, Integer, MetaData, PrimaryKeyConstraint, Table, Text
from sqlalchemy.dialects import sqlite

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# This revision's table, frozen here: later revisions change pipeline.schema, not this.
Time = Double().with_variant(sqlite.REAL(), "sqlite")
Count = BigInteger().with_variant(Integer(), "sqlite")
metadata = MetaData()
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


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    if "monitor_samples" not in inspector.get_table_names():
        monitor_samples.create(bind)
    indexes = {i["name"] for i in inspector.get_indexes("tasks")}
    if "tasks_finished" not in indexes:
        op.create_index("tasks_finished", "tasks", ["finished_at"])
    if "tasks_worker" not in indexes:
        op.create_index("tasks_worker", "tasks", ["worker", "created_at"])


def downgrade() -> None:
    op.drop_index("tasks_worker", table_name="tasks")
    op.drop_index("tasks_finished", table_name="tasks")
    monitor_samples.drop(op.get_bind(), checkfirst=True)
