"""Idempotent publishing: ``publish(..., idempotency_key=...)`` creates at most one job per key.

A publish whose connection fails after the statement was sent may or may not have created its
job; retrying it blindly can enqueue twice. With a key, the job's id is drawn first and
recorded under the key in the same statement that inserts the job, so a retry with the same
key (on this instance or any other) finds the record and returns the first job's id instead of
inserting another. Keys are remembered for ``queue_idempotency_window`` seconds after their
publish (whether or not the job has run by then), then swept by the instances of their app.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

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

_WAITING = (
    "EXISTS (SELECT 1 FROM {waiters} AS w WHERE w.app = %(app)s AND w.channel = %(channel)s "
    "AND w.idle AND w.expires_at > now())"
)

# The key row and the job row are inserted by one statement: either both commit or neither.
# Two publishes racing on one key meet at the key's unique index; the second waits for the
# first to commit, then inserts nothing and finds the first one's job with `existing`.
_PUBLISH = (
    "WITH nid AS (SELECT nextval(pg_get_serial_sequence({jobs_name}, 'id')) AS id), "
    "k AS (INSERT INTO {keys} (app, channel, key, job_id) "
    "SELECT %(app)s, %(channel)s, %(key)s, nid.id FROM nid "
    "ON CONFLICT (app, channel, key) DO NOTHING RETURNING job_id), "
    "ins AS (INSERT INTO {jobs} (id, app, channel, priority, run_at, max_retries, timeout, "
    "payload) SELECT k.job_id, %(app)s, %(channel)s, %(priority)s, "
    "now() + make_interval(secs => %(delay)s), %(max_retries)s, %(timeout)s, %(payload)s "
    "FROM k RETURNING id), "
    "w AS (SELECT " + _WAITING + " AS waiting){notify} "
    "SELECT ins.id, w.waiting FROM w LEFT JOIN ins ON true{join}"
)

_NOTIFY = ", n AS (SELECT pg_notify(%(pg_channel)s, '') FROM w, ins WHERE w.waiting)"


@dataclass(frozen=True)
class KeyQueries:
    """The keyed publish statements for one schema."""

    publish: sql.Composed
    publish_notify: sql.Composed  # the NOTIFY rides in the caller's transaction
    existing: sql.Composed
    sweep: sql.Composed

    @classmethod
    def for_schema(cls, schema: str) -> KeyQueries:
        """Compose the statements for tables in ``schema``."""
        parts = {
            "jobs": sql.Identifier(schema, JOBS),
            "keys": sql.Identifier(schema, KEYS),
            "waiters": sql.Identifier(schema, WAITERS),
            "jobs_name": sql.Literal(sql.Identifier(schema, JOBS).as_string(None)),
        }

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(**parts)

        return cls(
            publish=q(_PUBLISH.replace("{notify}", "").replace("{join}", "")),
            publish_notify=q(
                _PUBLISH.replace("{notify}", _NOTIFY).replace("{join}", " LEFT JOIN n ON true")
            ),
            existing=q(
                "SELECT job_id FROM {keys} "
                "WHERE app = %(app)s AND channel = %(channel)s AND key = %(key)s"
            ),
            # One app's window, for that app's keys only: apps sharing a schema never
            # shorten each other's promises.
            sweep=q(
                "DELETE FROM {keys} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {keys} "
                "WHERE app = %s AND created_at < now() - make_interval(secs => %s) LIMIT %s))"
            ),
        )


def check_idempotency_key(key: object) -> str | None:
    """``None`` or a non-empty str key (the same rules as lock and cache keys)."""
    return None if key is None else check_key(key, "idempotency_key")
