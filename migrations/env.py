"""Alembic environment for pgcoord (shipped in the wheel as ``pgcoord.migrations``).

pgcoord drives Alembic programmatically (``pgcoord.migrate``): the schema name arrives in
``config.attributes["schema"]`` and, online, an open SQLAlchemy connection in
``config.attributes["connection"]``. Alembic's version table is ``pgcoord_alembic_version`` in
that schema, so it never collides with the host application's own Alembic.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import text

from pgcoord.schema import VERSION_TABLE, build_metadata

config = context.config
schema: str = config.attributes.get("schema") or "pgcoord"
target_metadata = build_metadata(schema)


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Compare only pgcoord's own schema, never the host application's objects."""
    if type_ == "schema":
        return name == schema
    return name != VERSION_TABLE


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        include_schemas=True,
        include_name=include_name,
        **kwargs,
    )


def _create_schema(connection: Any = None) -> None:
    # The version table lives in the schema, so the schema must exist before Alembic writes it.
    # Online, an existing schema is left alone: CREATE SCHEMA IF NOT EXISTS checks CREATE on the
    # database even when the schema exists, and an owner whose schema a DBA pre-created may
    # lack it (docs/security.md).
    if connection is not None:
        found = connection.execute(text("SELECT to_regnamespace(:name)"), {"name": schema})
        if found.scalar() is not None:
            return
    quoted = context.get_context().dialect.identifier_preparer.quote_schema(schema)
    context.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quoted}"))


if context.is_offline_mode():
    _configure(
        url="postgresql+psycopg://", literal_binds=True, dialect_opts={"paramstyle": "named"}
    )
    with context.begin_transaction():
        _create_schema()
        context.run_migrations()
else:
    connection = config.attributes["connection"]
    _configure(connection=connection)
    with context.begin_transaction():
        _create_schema(connection)
        context.run_migrations()
