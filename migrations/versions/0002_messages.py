"""messages tables.

Revision ID: 0002_messages
Revises: 0001_locks
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import pgcoord.schema

revision = "0002_messages"
down_revision = "0001_locks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``message_log`` (sync-message log, spilled and transactional payloads)."""
    schema = pgcoord.schema.migration_schema()
    op.create_table(
        "message_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("xid", sa.BigInteger(), nullable=False),
        sa.Column("durable", sa.Boolean(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        postgresql_with={"autovacuum_vacuum_scale_factor": "0.05"},
        schema=schema,
    )
    op.create_index("message_log_xid_idx", "message_log", ["xid"], schema=schema)
    op.create_index("message_log_created_idx", "message_log", ["created_at"], schema=schema)


def downgrade() -> None:
    """Drop ``message_log`` (its indexes go with it)."""
    schema = pgcoord.schema.migration_schema()
    op.drop_index("message_log_created_idx", table_name="message_log", schema=schema)
    op.drop_index("message_log_xid_idx", table_name="message_log", schema=schema)
    op.drop_table("message_log", schema=schema)
