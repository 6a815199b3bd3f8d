"""messages tables.

Revision ID: 0002_messages
Revises: 0001_locks
"""

from __future__ import annotations

revision = "0002_messages"
down_revision = "0001_locks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the messages service's tables (none yet)."""


def downgrade() -> None:
    """Drop the messages service's tables (none yet)."""
