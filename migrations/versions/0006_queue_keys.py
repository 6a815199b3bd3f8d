"""queue idempotency keys: the job each publish(idempotency_key=...) created.

Revision ID: 0006_queue_keys
Revises: 0005_lock_leases
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from pgcoord.schema import migration_schema
from pgcoord.schema.queue import KEYS

revision = "0006_queue_keys"
down_revision = "0005_lock_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``queue_keys`` and its index on ``(app, created_at)`` (each app's sweep)."""
    schema = migration_schema()
    op.create_table(
        KEYS,
        sa.Column("app", sa.Text(collation="C"), nullable=False),
        sa.Column("channel", sa.Text(collation="C"), nullable=False),
        sa.Column("key", sa.Text(collation="C"), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("app", "channel", "key"),
        schema=schema,
    )
    op.create_index("queue_keys_created", KEYS, ["app", "created_at"], schema=schema)


def downgrade() -> None:
    """Drop ``queue_keys`` (its index goes with it)."""
    schema = migration_schema()
    op.drop_index("queue_keys_created", table_name=KEYS, schema=schema)
    op.drop_table(KEYS, schema=schema)
