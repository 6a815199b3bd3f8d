"""Idempotent publishing: ``publish(..., idempotency_key=...)`` creates at most one job per key.

A publish whose connection fails after the statement was sent may or may not have created its
job; retrying it blindly can enqueue twice. With a key, the job's id is drawn first and
recorded under the key in the same statement that inserts the job, so a retry with the same
key (on this instance or any other) finds the record and returns the first job's id instead of
inserting another. Keys are remembered for ``queue_idempotency_window`` seconds after their
publish (whether or not the job has run by then), then swept by the instances of their app.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from psycopg import sql

from pgcoord import sqlfile
from pgcoord.schema.queue import JOBS, KEYS, WAITERS
from pgcoord.validation import check_key

#: Default seconds a key is remembered (``queue_idempotency_window``).
DEFAULT_WINDOW = 86_400.0
#: Expired keys deleted per sweep statement.
SWEEP_BATCH = 1000
#: A sweep runs after this many keyed publishes of one instance...
SWEEP_EVERY = 500
#: ... and every this many seconds on every running instance (or the window, if shorter).
SWEEP_INTERVAL = 60.0

#: The prefix of the keyed publish statements' names in ``queries.sql``.
_PREFIX = "key_"


@dataclass(frozen=True)
class KeyQueries:
    """The keyed publish statements for one schema: the ``key_*`` blocks of ``queries.sql``."""

    publish: bytes
    publish_notify: bytes  # the NOTIFY rides in the caller's transaction
    existing: bytes
    sweep: bytes

    @classmethod
    def for_schema(cls, schema: str) -> KeyQueries:
        """Render the statements for tables in ``schema``."""
        return _render(schema)


@functools.cache
def _render(schema: str) -> KeyQueries:
    # Cached: a KeyQueries is immutable, and every EventQueue of a schema sends the same bytes.
    statements = {
        name: text
        for name, text in sqlfile.load("pgcoord.queue").items()
        if name.startswith(_PREFIX)
    }
    rendered = sqlfile.render(
        statements,
        jobs=sql.Identifier(schema, JOBS),
        keys=sql.Identifier(schema, KEYS),
        waiters=sql.Identifier(schema, WAITERS),
        # pg_get_serial_sequence() takes the table's name as text, quoted as in SQL.
        jobs_name=sql.Literal(sql.Identifier(schema, JOBS).as_string(None)),
    )
    return KeyQueries(**{name.removeprefix(_PREFIX): text for name, text in rendered.items()})


def check_idempotency_key(key: object) -> str | None:
    """``None`` or a non-empty str key (the same rules as lock and cache keys)."""
    return None if key is None else check_key(key, "idempotency_key")
