"""Schema migrations: Alembic driven programmatically, serialised by an advisory lock.

``upgrade`` takes a session-level advisory lock (keyed by the schema name) before it reads the
version, so ten instances starting together with ``migrate=True`` migrate exactly once: the first
upgrades, the others wait and then find the schema at head.

Whoever runs the migration owns what it creates. In a least-privilege setup (docs/security.md)
that is an owner role, and the application role, which may not create anything, gets its
privileges from :mod:`pgcoord.grants`; a migration it attempts fails with a
:class:`~pgcoord.errors.DatabaseError` (SQLSTATE 42501) saying so.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from pgcoord import _driver
from pgcoord import _statements as statements
from pgcoord._conninfo import describe_server
from pgcoord.errors import DatabaseError, SchemaOutdatedError
from pgcoord.names import advisory_key
from pgcoord.schema import VERSION_TABLE
from pgcoord.validation import check_schema


@functools.cache
def script_location() -> str:
    """The directory of pgcoord's Alembic environment (in the wheel, or in a source checkout)."""
    try:
        import pgcoord.migrations as shipped  # type: ignore[import-not-found,unused-ignore]

        return str(Path(shipped.__file__).parent)
    except ImportError:
        return str(Path(__file__).resolve().parent.parent / "migrations")


def alembic_config(schema: str, *, connection: Any = None, output: Any = None) -> Config:
    """An Alembic ``Config`` for ``schema`` (a connection for online work, a buffer for ``--sql``)."""
    cfg = Config(output_buffer=output) if output is not None else Config()
    cfg.set_main_option("script_location", script_location())
    cfg.attributes["schema"] = schema
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head_revision() -> str:
    """The newest revision this pgcoord version ships."""
    head = ScriptDirectory.from_config(alembic_config("pgcoord")).get_current_head()
    assert head is not None
    return head


@functools.cache
def known_revisions() -> frozenset[str]:
    """Every revision this pgcoord version knows."""
    return frozenset(
        s.revision for s in ScriptDirectory.from_config(alembic_config("pgcoord")).walk_revisions()
    )


def migration_lock_key(schema: str) -> int:
    """The advisory lock that serialises migrations of one schema."""
    return advisory_key(schema, "", "migrate", schema)


def _engine(dsn: str, connect_timeout: float) -> sa.Engine:
    # SQLAlchemy only needs a psycopg connection; libpq parses the user's DSN as it is.
    return sa.create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dsn, **_driver.connect_kwargs(connect_timeout)),
        poolclass=sa.pool.NullPool,
    )


def _run_locked(dsn: str, schema: str, connect_timeout: float, action: str, revision: str) -> None:
    engine = _engine(dsn, connect_timeout)
    try:
        _run_on(engine, dsn, schema, action, revision)
    except sa.exc.DBAPIError as exc:
        # SQLAlchemy wraps the driver's error; translate the original one.
        orig = exc.orig or exc
        if isinstance(orig, psycopg.errors.InsufficientPrivilege):
            raise _not_the_owner(dsn, schema, orig) from exc
        raise _driver.translate(orig, dsn) from exc
    finally:
        engine.dispose()


def _not_the_owner(dsn: str, schema: str, exc: psycopg.Error) -> DatabaseError:
    # The usual cause: an application role (docs/security.md) started with migrate=True
    # against a schema that is not at head, or ran `pgcoord migrate` itself. The server's
    # message alone ("permission denied for database x") does not say what to do.
    return DatabaseError(
        f"the connecting role may not migrate schema {schema!r} "
        f"({describe_server(dsn)}): {exc}. Run `pgcoord migrate --schema {schema}` "
        "as the role that owns pgcoord's schema (with CREATE on the database), then "
        f"`pgcoord grant ROLE --schema {schema}`, and start the application's instances with "
        "migrate=False (see docs/security.md)",
        sqlstate=exc.sqlstate,
    )


def _run_on(engine: sa.Engine, dsn: str, schema: str, action: str, revision: str) -> None:
    with _driver.translated(dsn), engine.connect() as conn:
        key = migration_lock_key(schema)
        conn.exec_driver_sql(statements.MIGRATION_LOCK, (key,))
        conn.commit()  # the session lock outlives this transaction
        try:
            cfg = alembic_config(schema, connection=conn)
            if action == "upgrade":
                command.upgrade(cfg, revision)
            else:
                command.downgrade(cfg, revision)
            conn.commit()
        finally:
            conn.rollback()
            conn.exec_driver_sql(statements.MIGRATION_UNLOCK, (key,))
            conn.commit()


def upgrade(
    dsn: str, schema: str = "pgcoord", revision: str = "head", *, connect_timeout: float = 10.0
) -> None:
    """Upgrade ``schema`` to ``revision`` (head by default); safe to run from many processes at once."""
    check_schema(schema)
    _run_locked(dsn, schema, connect_timeout, "upgrade", revision)


def downgrade(
    dsn: str, schema: str = "pgcoord", revision: str = "base", *, connect_timeout: float = 10.0
) -> None:
    """Downgrade ``schema`` to ``revision`` (``base`` drops every pgcoord table)."""
    check_schema(schema)
    _run_locked(dsn, schema, connect_timeout, "downgrade", revision)


def upgrade_sql(schema: str = "pgcoord", revision: str = "head") -> str:
    """The DDL that upgrading an empty database would run; touches no database."""
    check_schema(schema)
    buffer = io.StringIO()
    command.upgrade(alembic_config(schema, output=buffer), revision, sql=True)
    return buffer.getvalue()


async def current_revision(conn: psycopg.AsyncConnection[Any], schema: str) -> str | None:
    """The revision recorded in ``schema`` (None when pgcoord's tables were never created)."""
    query = statements.migration_version(schema, VERSION_TABLE)
    try:
        async with conn.transaction():
            row = await (await conn.execute(query)).fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        return None
    return None if row is None else str(row[0])


async def check(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    """Raise :class:`SchemaOutdatedError` unless ``schema`` is at this pgcoord's head revision."""
    current = await current_revision(conn, schema)
    head = head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaOutdatedError(
            f"pgcoord's tables do not exist in schema {schema!r}; run `pgcoord migrate --schema {schema}` "
            "(or start the Coordinator with migrate=True)"
        )
    if current not in known_revisions():
        raise SchemaOutdatedError(
            f"schema {schema!r} is at revision {current!r}, which this pgcoord does not know: "
            "a newer pgcoord migrated it; upgrade pgcoord"
        )
    raise SchemaOutdatedError(
        f"schema {schema!r} is at revision {current!r} but this pgcoord needs {head!r}; "
        f"run `pgcoord migrate --schema {schema}` (or start the Coordinator with migrate=True)"
    )
