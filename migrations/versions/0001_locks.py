"""locks tables.

Revision ID: 0001_locks
Revises: None
"""

from __future__ import annotations

revision = "0001_locks"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the locks service's tables (none yet)."""


def downgrade() -> None:
    """Drop the locks service's tables (none yet)."""
