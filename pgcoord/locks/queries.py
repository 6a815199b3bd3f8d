"""The locks service's SQL, composed once per schema (identifiers via ``psycopg.sql``)."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

# The hot acquisition as one plain statement (no function call): the lock and the lease in a
# subquery that cannot be flattened (OFFSET 0; its volatile outputs are never pruned), the
# sequence value in the outer projection, which only runs on the row the subquery produced, i.e.
# once the lock is granted. The epoch part of the token is the one this session saw at its first
# acquisition: valid for the session's whole life, because only crash recovery resets the
# sequence, and a crash ends every session. The second column is how long the statement waited
# for the lock (see lock_acquire): the lease starts when the statement ends.
_ACQUIRE_FAST = """
SELECT nextval({seq}), date_part('epoch', clock_timestamp() - statement_timestamp())
FROM (SELECT pg_advisory_lock(%s), set_config('idle_session_timeout', %s, false) AS armed
      OFFSET 0) g
WHERE g.armed IS NOT NULL
"""

# Unlock and disarm the lease, in one round trip and one boolean (false: it was not held; the
# session is then dropped, so skipping the disarm on that path is harmless). The holder row is
# left behind on purpose (the connection's next acquisition reuses or rewrites it): holders()
# only trusts a row whose backend still holds that advisory key in pg_locks, and skipping the
# DELETE keeps the uncontended cycle free of writes.
_RELEASE = "SELECT pg_advisory_unlock(%s) AND set_config('idle_session_timeout', '0', false) = '0'"

# A holding's start is the end of its acquiring statement (state_change of the idle session),
# unless an extend recorded it; the lease counts from the session's last statement.
_HOLDERS = """
SELECT h.name, h.instance_id, h.pid, h.ttl_ms,
       extract(epoch FROM COALESCE(h.since, a.state_change)),
       extract(epoch FROM clock_timestamp() - a.state_change)
FROM {holders} h
JOIN pg_locks l
  ON l.locktype = 'advisory' AND l.granted AND l.pid = h.pid AND l.objsubid = 1
 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
 AND CAST(l.classid AS bigint) = (h.lock_key >> 32) & 4294967295
 AND CAST(l.objid AS bigint) = h.lock_key & 4294967295
LEFT JOIN pg_stat_activity a ON a.pid = h.pid
WHERE h.app = %s
ORDER BY 5, h.name
"""

# Rows of sessions that no longer exist (crashed holders) would only accumulate.
_PRUNE = """
DELETE FROM {holders} h
WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = h.pid)
"""


@dataclass(frozen=True)
class LockQueries:
    """Rendered statements for one schema (rendered once: composing per call costs time)."""

    acquire: str
    acquire_fast: str
    extend: str
    release: str
    holders: str
    prune: str
    xact_lock: str
    unlock_all: str

    @classmethod
    def for_schema(cls, schema: str) -> LockQueries:
        """Render every statement for ``schema``."""

        def render(query: sql.Composable) -> str:
            return query.as_string(None)

        holders = sql.Identifier(schema, "lock_holders")
        return cls(
            acquire=render(
                sql.SQL("SELECT token, waited FROM {}(%s, %s, %s, %s)").format(
                    sql.Identifier(schema, "lock_acquire")
                )
            ),
            acquire_fast=render(
                sql.SQL(_ACQUIRE_FAST).format(
                    seq=sql.Literal(sql.Identifier(schema, "lock_token_seq").as_string(None))
                )
            ),
            extend=render(
                sql.SQL("SELECT {}(%s, %s)").format(sql.Identifier(schema, "lock_extend"))
            ),
            release=_RELEASE,
            holders=render(sql.SQL(_HOLDERS).format(holders=holders)),
            prune=render(sql.SQL(_PRUNE).format(holders=holders)),
            xact_lock="SELECT pg_advisory_xact_lock(%s)",
            unlock_all="SELECT pg_advisory_unlock_all()",
        )
