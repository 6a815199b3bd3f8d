"""queue dead-letter retention: an index on queue_failed (app, failed_at).

Revision ID: 0007_queue_failed_age
Revises: 0006_queue_keys
"""

from __future__ import annotations

from alembic import op

from pgcoord.schema import migration_schema
from pgcoord.schema.queue import FAILED

revision = "0007_queue_failed_age"
down_revision = "0006_queue_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Index ``queue_failed`` on ``(app, failed_at)``: each app's ``queue_failed_retention``
    sweep finds its oldest dead letters without reading the others."""
    schema = migration_schema()
    op.create_index("queue_failed_app_age", FAILED, ["app", "failed_at"], schema=schema)


def downgrade() -> None:
    """Drop the index."""
    schema = migration_schema()
    op.drop_index("queue_failed_app_age", table_name=FAILED, schema=schema)
