"""Least privilege: the GRANT statements that let an application role run every service.

The intended setup (docs/security.md) has two roles: an *owner* that runs ``pgcoord migrate``
and so owns the schema and everything in it, and an *application* role that the instances
connect as, with ``migrate=False``. The application role gets exactly what the services' SQL
uses, and nothing that could change the schema or the privileges:

- ``USAGE`` on the schema (never ``CREATE``);
- ``SELECT, INSERT, UPDATE, DELETE`` on each service's tables (never ``TRUNCATE``,
  ``REFERENCES``, ``TRIGGER`` or ownership);
- ``SELECT`` only on Alembic's version table (``start()`` reads the revision; only the owner
  writes it);
- ``USAGE`` (``nextval``, nothing more: ``UPDATE`` would allow ``setval``, which could rewind
  the fencing tokens) on the schema's sequences (fencing tokens, the sync-message commit
  order, the queue's job ids drawn for idempotent publishes);
- ``EXECUTE`` on the schema's functions (the locks' lease functions, the commit-order trigger).

The tables come from the declared schema (:mod:`pgcoord.schema`), grouped by the service that
uses them; sequences and functions are granted with ``ALL ... IN SCHEMA``, which covers exactly
pgcoord's own, since nothing else lives in pgcoord's schema. Grants apply to the objects that
exist when they run: run :func:`grant` again after a ``pgcoord migrate`` that added objects
(it is idempotent).

Every name is composed with :mod:`psycopg.sql` as a quoted identifier, never formatted into
the text, so any role name works (``a"b`` included).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import MetaData

from pgcoord import _driver
from pgcoord.errors import InvalidInputError
from pgcoord.schema import VERSION_TABLE, cache, locks, messages, queue
from pgcoord.validation import check_key, check_schema

#: Which service uses which declared tables (a module of :mod:`pgcoord.schema` each).
SERVICE_SCHEMAS = (
    ("locks", locks),
    ("pub/sub and sync messages", messages),
    ("event queue", queue),
    ("cache", cache),
)

#: What the application role may do on each service table.
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")

#: Longest role name PostgreSQL keeps (NAMEDATALEN - 1 bytes); a longer name is silently
#: truncated by the server, which could grant to another role than the one named.
_ROLE_MAX_BYTES = 63

#: Role names that are not roles: a quoted "public" still means every role (the grammar
#: special-cases the word, not the token), and "none" is refused by the server.
_NOT_ROLES = frozenset({"public", "none"})


def service_tables(schema: str = "pgcoord") -> list[tuple[str, list[str]]]:
    """Each service with the names of the tables it uses in ``schema`` (sorted by name)."""
    check_schema(schema)
    grouped = []
    for service, module in SERVICE_SCHEMAS:
        metadata = MetaData(schema=schema)
        module.define(metadata)
        grouped.append((service, [table.name for table in metadata.sorted_tables]))
    return grouped


def check_role(role: object) -> str:
    """``role`` if it can name an application role, else a typed error (nothing is sent).

    Refuses ``public`` (which grants to every role, quoted or not), ``none``, the ``pg_``
    prefix (PostgreSQL's predefined roles) and names longer than PostgreSQL keeps.
    """
    name = check_key(role, "role")
    if name.lower() in _NOT_ROLES:
        raise InvalidInputError(
            f"role {name!r} is not a role: granting to it would give every role pgcoord's data"
        )
    if name.startswith("pg_"):
        raise InvalidInputError(
            f"role {name!r}: the pg_ prefix is reserved for PostgreSQL's predefined roles"
        )
    if len(name.encode("utf-8")) > _ROLE_MAX_BYTES:
        raise InvalidInputError(
            f"role name is {len(name.encode('utf-8'))} bytes; PostgreSQL keeps at most "
            f"{_ROLE_MAX_BYTES} (a longer one would be truncated to another name)"
        )
    return name


def grant_statements(role: str, schema: str = "pgcoord") -> list[tuple[str, sql.Composed]]:
    """The statements :func:`grant` runs, each with a comment saying what it is for."""
    name = check_role(role)
    check_schema(schema)
    who = sql.Identifier(name)
    where = sql.Identifier(schema)
    statements: list[tuple[str, sql.Composed]] = [
        (
            "look up pgcoord's objects (no CREATE: the owner runs migrations)",
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(where, who),
        ),
        (
            "start() checks the schema's revision; only the owner writes it",
            sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(
                sql.Identifier(schema, VERSION_TABLE), who
            ),
        ),
    ]
    privileges = sql.SQL(", ").join(sql.SQL(p) for p in TABLE_PRIVILEGES)
    for service, tables in service_tables(schema):
        statements.append(
            (
                service,
                sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                    privileges,
                    sql.SQL(", ").join(sql.Identifier(schema, t) for t in tables),
                    who,
                ),
            )
        )
    statements += [
        (
            "fencing tokens, the sync-message commit order, job ids of idempotent publishes",
            sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(where, who),
        ),
        (
            "the locks' lease functions and the message log's commit-order trigger",
            sql.SQL("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {} TO {}").format(where, who),
        ),
    ]
    return statements


def grant_sql(role: str, schema: str = "pgcoord") -> str:
    """The SQL that gives ``role`` what it needs to run every service on ``schema``.

    Pure: touches no database (``pgcoord grant --sql`` prints it). Run it as the role that
    owns the schema (the one that ran ``pgcoord migrate``) or a superuser. Raises
    :class:`~pgcoord.errors.InvalidInputError` / :class:`~pgcoord.errors.InvalidTypeError`
    for a role or schema name that cannot be used (see :func:`check_role`).
    """
    statements = grant_statements(role, schema)
    # repr() keeps the comment on one line whatever the role name holds.
    lines = [f"-- pgcoord: what role {role!r} needs to run every service on schema {schema!r}"]
    for comment, statement in statements:
        lines.append(f"-- {comment}")
        lines.append(statement.as_string() + ";")
    return "\n".join(lines) + "\n"


def grant(dsn: str, role: str, schema: str = "pgcoord", *, connect_timeout: float = 10.0) -> None:
    """Give ``role`` what it needs to run every service on ``schema`` (idempotent).

    Connects with ``dsn`` as the role that owns the schema (or a superuser) and runs
    :func:`grant_statements` in one transaction: all of them take effect, or none. Run it
    after ``pgcoord migrate``, and again after each migration that adds objects. Errors come
    out as pgcoord errors: a missing schema or table as
    :class:`~pgcoord.errors.SchemaOutdatedError` (migrate first), a missing role or a
    connecting role that may not grant as :class:`~pgcoord.errors.DatabaseError`.
    """
    statements = grant_statements(role, schema)
    with _driver.translated(dsn):
        conn: psycopg.Connection[Any] = psycopg.connect(
            dsn, **_driver.connect_kwargs(connect_timeout)
        )
        with conn, conn.transaction():
            for _, statement in statements:
                conn.execute(statement)
