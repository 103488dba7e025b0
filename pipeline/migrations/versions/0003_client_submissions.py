"""Who submitted each task, and the ``Idempotency-Key`` of each submit.

``task_owners`` lets a key's event stream (``GET /api/v1/events``) follow that
key's tasks; ``idempotency_keys`` makes a retried submit return the task the
first one made. Tasks submitted before this revision have no owner.

Revision ID: 0003
Revises: 0002
Create Date: 2027-01-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Column, Double, ForeignKey, Index, MetaData, PrimaryKeyConstraint, Table, Text
from sqlalchemy.dialects import sqlite

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# This revision's tables, frozen here: later revisions change pipeline.schema, not this.
Time = Double().with_variant(sqlite.REAL(), "sqlite")
metadata = MetaData()
tasks = Table("tasks", metadata, Column("id", Text, primary_key=True))
task_owners = Table(
    "task_owners",
    metadata,
    Column("task_id", Text, ForeignKey("tasks.id"), primary_key=True),
    Column("owner", Text, nullable=False),
    Index("task_owners_owner", "owner", "task_id"),
)
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


def upgrade() -> None:
    bind = op.get_bind()
    present = set(sa.inspect(bind).get_table_names())
    for table in (task_owners, idempotency_keys):
        if table.name not in present:
            table.create(bind)


def downgrade() -> None:
    idempotency_keys.drop(op.get_bind(), checkfirst=True)
    task_owners.drop(op.get_bind(), checkfirst=True)
