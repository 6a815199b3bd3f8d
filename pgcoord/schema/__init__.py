"""pgcoord's schema, declared once as SQLAlchemy tables: the Alembic ``target_metadata``.

Each service declares its tables in its own module here; hot paths use raw psycopg SQL against
the same names. Every table lives in pgcoord's schema (``Coordinator(schema=...)``), next to
Alembic's own version table ``pgcoord_alembic_version``, so pgcoord never meets the host
application's tables or its Alembic history.
"""

from __future__ import annotations

from sqlalchemy import MetaData

from pgcoord.schema import cache, locks, messages, queue

#: Alembic's version table for pgcoord (inside pgcoord's schema).
VERSION_TABLE = "pgcoord_alembic_version"


def build_metadata(schema: str) -> MetaData:
    """All of pgcoord's tables, placed in ``schema``."""
    metadata = MetaData(schema=schema)
    for module in (locks, messages, queue, cache):
        module.define(metadata)
    return metadata


def migration_schema() -> str:
    """The schema the running Alembic migration targets (call only inside a revision)."""
    from alembic import op

    schema: str | None = op.get_context().version_table_schema
    if not schema:  # pragma: no cover - env.py always sets it
        raise RuntimeError("pgcoord migrations must run through pgcoord's Alembic env")
    return schema
