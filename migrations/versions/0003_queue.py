"""queue tables: the hot jobs table, the dead letters, and the idle-worker registry.

Revision ID: 0003_queue
Revises: 0002_messages
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from pgcoord.schema import migration_schema
from pgcoord.schema.queue import FAILED, JOBS, JOBS_STORAGE, WAITERS

revision = "0003_queue"
down_revision = "0002_messages"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``queue_jobs`` (claim index, autovacuum settings), ``queue_failed``, ``queue_waiters``."""
    schema = migration_schema()
    op.create_table(
        JOBS,
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("app", sa.Text(collation="C"), nullable=False),
        sa.Column("channel", sa.Text(collation="C"), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "run_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("retried", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("attempt_base", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_retries", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("timeout", sa.Float(precision=53), nullable=False),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        schema=schema,
        postgresql_with=JOBS_STORAGE,
    )
    op.create_index(
        "queue_jobs_claim",
        JOBS,
        ["app", "channel", sa.text("priority DESC"), "run_at", "id"],
        schema=schema,
    )
    op.create_table(
        FAILED,
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("app", sa.Text(collation="C"), nullable=False),
        sa.Column("channel", sa.Text(collation="C"), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("retried", sa.Integer(), nullable=False),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.Column("timeout", sa.Float(precision=53), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "failed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("traceback", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        schema=schema,
    )
    op.create_index(
        "queue_failed_app_channel", FAILED, ["app", "channel", "failed_at"], schema=schema
    )
    op.create_table(
        WAITERS,
        sa.Column("app", sa.Text(collation="C"), nullable=False),
        sa.Column("channel", sa.Text(collation="C"), nullable=False),
        sa.Column("worker", sa.Text(collation="C"), nullable=False),
        sa.Column("idle", sa.Boolean(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("app", "channel", "worker"),
        schema=schema,
    )


def downgrade() -> None:
    """Drop the queue tables (their indexes go with them)."""
    schema = migration_schema()
    op.drop_table(WAITERS, schema=schema)
    op.drop_table(FAILED, schema=schema)
    op.drop_table(JOBS, schema=schema)
