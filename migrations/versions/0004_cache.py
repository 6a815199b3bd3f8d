"""cache tables.

Revision ID: 0004_cache
Revises: 0003_queue
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import pgcoord.schema

revision = "0004_cache"
down_revision = "0003_queue"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the cache service's UNLOGGED entries table and its expiry index."""
    schema = pgcoord.schema.migration_schema()
    op.create_table(
        "cache_entries",
        sa.Column("ns", sa.Text(collation="C"), nullable=False),
        sa.Column("key", sa.Text(collation="C"), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "written_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.PrimaryKeyConstraint("ns", "key", name="cache_entries_pkey"),
        prefixes=["UNLOGGED"],
        postgresql_with={"autovacuum_vacuum_scale_factor": "0.05"},
        schema=schema,
    )
    op.create_index(
        "cache_entries_expires_idx",
        "cache_entries",
        ["expires_at"],
        schema=schema,
        postgresql_where=sa.text("expires_at IS NOT NULL"),
    )


def downgrade() -> None:
    """Drop the cache service's table (its index goes with it)."""
    schema = pgcoord.schema.migration_schema()
    op.drop_index("cache_entries_expires_idx", table_name="cache_entries", schema=schema)
    op.drop_table("cache_entries", schema=schema)
