"""message_log rows name their app: each app's sweeper deletes only its own rows.

Revision ID: 0008_message_log_app
Revises: 0007_queue_failed_age
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from pgcoord.schema import migration_schema

revision = "0008_message_log_app"
down_revision = "0007_queue_failed_age"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``message_log.app`` (NULL on rows logged before) and its sweep index."""
    schema = migration_schema()
    op.add_column(
        "message_log", sa.Column("app", sa.Text(collation="C"), nullable=True), schema=schema
    )
    op.create_index(
        "message_log_app_created_idx", "message_log", ["app", "created_at"], schema=schema
    )


def downgrade() -> None:
    schema = migration_schema()
    op.drop_index("message_log_app_created_idx", table_name="message_log", schema=schema)
    op.drop_column("message_log", "app", schema=schema)
