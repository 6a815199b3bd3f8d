"""queue tables.

Revision ID: 0003_queue
Revises: 0002_messages
"""

from __future__ import annotations

revision = "0003_queue"
down_revision = "0002_messages"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the queue service's tables (none yet)."""


def downgrade() -> None:
    """Drop the queue service's tables (none yet)."""
