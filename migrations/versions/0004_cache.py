"""cache tables.

Revision ID: 0004_cache
Revises: 0003_queue
"""

from __future__ import annotations

revision = "0004_cache"
down_revision = "0003_queue"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the cache service's tables (none yet)."""


def downgrade() -> None:
    """Drop the cache service's tables (none yet)."""
