"""The connection layer's statements, from ``pgcoord/queries.sql`` (rendered once).

Only statements with no schema in them are here; ``migration_version`` is rendered per schema
by :func:`migration_version`.
"""

from __future__ import annotations

import functools

from psycopg import sql

from pgcoord.sqlfile import load, render

_FILE = load("pgcoord")
_PLAIN = render({k: v for k, v in _FILE.items() if "{" not in v})

LISTENER_SETUP = _PLAIN["listener_setup"]
PING = _PLAIN["ping"]
WORK_SESSION_SETUP = _PLAIN["work_session_setup"]
LISTENER_DATABASE = _PLAIN["listener_database"]
MIGRATION_LOCK = _PLAIN["migration_lock"].decode()  # for SQLAlchemy's exec_driver_sql
MIGRATION_UNLOCK = _PLAIN["migration_unlock"].decode()
BACKEND_PID = _PLAIN["backend_pid"]
BACKEND_PID_AND_NOTIFY = _PLAIN["backend_pid_and_notify"]


@functools.cache
def migration_version(schema: str, version_table: str) -> bytes:
    """``migration_version`` for ``schema``."""
    return render(
        {"q": _FILE["migration_version"]}, version_table=sql.Identifier(schema, version_table)
    )["q"]
