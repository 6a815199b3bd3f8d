"""Tables of the cache service (declared here once; the Alembic revision creates them)."""

from __future__ import annotations

from sqlalchemy import MetaData


def define(metadata: MetaData) -> None:
    """Add this service's tables to ``metadata`` (whose ``schema`` is pgcoord's schema)."""
