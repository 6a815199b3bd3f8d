"""The locks service's SQL, composed once per schema (identifiers via ``psycopg.sql``).

A lock starts as a session advisory lock on a borrowed work connection and, once held for
``PROMOTE_AFTER``, becomes a row of ``lock_leases`` (see the 0005 revision for the functions).
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from pgcoord.locks.lease import TOKEN_EPOCH_SHIFT

# The hot acquisition, one statement: lock_free() takes the advisory lock and checks (with a
# snapshot taken after it) that no promoted lease holds the key; only then does the outer
# projection draw the token and arm the session's lease. The epoch is the live one (a crash
# empties lock_epoch_live and resets the sequence together; lock_new_epoch() starts the next).
_ACQUIRE = """
SELECT CASE WHEN g.free THEN
         COALESCE((SELECT epoch FROM {epoch_live} WHERE id = 1), {new_epoch}()) * {factor}
         + nextval({seq}) END,
       CASE WHEN g.free THEN set_config('idle_session_timeout', %s, false) END
FROM (SELECT {free}(%s) AS free OFFSET 0) g
"""

# A task of this process takes the lock over from the previous holder's session without it
# being let go: a new token, its own lease, and whether another instance waits (fairness).
_TAKE_OVER = """
SELECT COALESCE((SELECT epoch FROM {epoch_live} WHERE id = 1), {new_epoch}()) * {factor}
       + nextval({seq}),
       set_config('idle_session_timeout', %s, false),
       EXISTS (SELECT 1 FROM {leases} WHERE lock_key = %s AND wanted)
"""

# The same on a session that already knows the epoch (the client adds it): the epoch a session
# saw stays valid for its whole life, since only crash recovery resets the sequence and a crash
# ends every session.
_ACQUIRE_WARM = """
SELECT CASE WHEN g.free THEN nextval({seq}) END,
       CASE WHEN g.free THEN set_config('idle_session_timeout', %s, false) END
FROM (SELECT {free}(%s) AS free OFFSET 0) g
"""

_TAKE_OVER_WARM = """
SELECT nextval({seq}), set_config('idle_session_timeout', %s, false),
       EXISTS (SELECT 1 FROM {leases} WHERE lock_key = %s AND wanted)
"""

# Unlock on the session, disarm its lease, and say whether a waiter marked the key (then the
# caller sends wake_waiters). One plain statement: its snapshot predates the unlock, so a mark
# committed in the microseconds between is missed; the waiter covers that by trying once more
# shortly after marking (see LockManager._take).
_UNLOCK = """
SELECT pg_advisory_unlock(%s), set_config('idle_session_timeout', '0', false),
       EXISTS (SELECT 1 FROM {leases} WHERE lock_key = %s AND holder_pid IS NULL AND wanted)
"""

# Sent right after lock_promote in the same pipeline: lets go of the advisory lock only when
# the lease row with this token is there (committed by the previous statement), so the key is
# never free in between, and a refused promotion keeps the session lock.
_UNLOCK_PROMOTED = """
SELECT pg_advisory_unlock(l.lock_key), set_config('idle_session_timeout', '0', false)
FROM {leases} l WHERE l.lock_key = %s AND l.token = %s
"""

_EXTEND_LEASE = """
UPDATE {leases} SET ttl_ms = %s, expires_at = clock_timestamp() + make_interval(secs => %s)
WHERE lock_key = %s AND token = %s
  AND (expires_at IS NULL OR expires_at > clock_timestamp())
RETURNING true
"""

_HOLDERS = """
SELECT l.name, l.instance_id, l.holder_pid, l.ttl_ms, extract(epoch FROM l.since),
       extract(epoch FROM l.expires_at - clock_timestamp())
FROM {leases} l
WHERE l.app = %s AND l.holder_pid IS NOT NULL
  AND (l.expires_at IS NULL OR l.expires_at > clock_timestamp())
  AND {alive}(l.holder_pid, l.holder_start)
ORDER BY l.since, l.name
"""


@dataclass(frozen=True)
class LockQueries:
    """Rendered statements for one schema (rendered once: composing per call costs time)."""

    acquire: bytes
    acquire_warm: bytes
    take_over_warm: bytes
    acquire_waiting: bytes
    take_over: bytes
    unlock: bytes
    wake_waiters: bytes
    extend_session: bytes
    promote: bytes
    unlock_promoted: bytes
    release_lease: bytes
    extend_lease: bytes
    release_instance: bytes
    notify_many: bytes
    holders: bytes
    xact_lock: str  # runs on the caller's connection or session (pgcoord.transaction)

    @classmethod
    def for_schema(cls, schema: str) -> LockQueries:
        """Render every statement for ``schema``."""

        def fn(name: str) -> sql.Identifier:
            return sql.Identifier(schema, name)

        def render(query: str | sql.Composable, **parts: sql.Composable) -> bytes:
            composed = sql.SQL(query).format(**parts) if isinstance(query, str) else query
            return composed.as_string(None).encode()

        leases = fn("lock_leases")
        return cls(
            acquire=render(
                _ACQUIRE,
                epoch_live=fn("lock_epoch_live"),
                new_epoch=fn("lock_new_epoch"),
                factor=sql.Literal(1 << TOKEN_EPOCH_SHIFT),
                seq=sql.Literal(sql.Identifier(schema, "lock_token_seq").as_string(None)),
                free=fn("lock_free"),
            ),
            acquire_warm=render(
                _ACQUIRE_WARM,
                seq=sql.Literal(sql.Identifier(schema, "lock_token_seq").as_string(None)),
                free=fn("lock_free"),
            ),
            take_over_warm=render(
                _TAKE_OVER_WARM,
                seq=sql.Literal(sql.Identifier(schema, "lock_token_seq").as_string(None)),
                leases=leases,
            ),
            take_over=render(
                _TAKE_OVER,
                epoch_live=fn("lock_epoch_live"),
                new_epoch=fn("lock_new_epoch"),
                factor=sql.Literal(1 << TOKEN_EPOCH_SHIFT),
                seq=sql.Literal(sql.Identifier(schema, "lock_token_seq").as_string(None)),
                leases=leases,
            ),
            acquire_waiting=render(
                sql.SQL("SELECT token, expires_in, newly_wanted FROM {}(%s, %s, true)").format(
                    fn("lock_try")
                )
            ),
            unlock=render(_UNLOCK, leases=leases),
            wake_waiters=render(sql.SQL("SELECT {}(%s, %s)").format(fn("lock_wake"))),
            extend_session=b"SELECT set_config('idle_session_timeout', %s, false)",
            promote=render(
                sql.SQL("SELECT {}(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)").format(
                    fn("lock_promote")
                )
            ),
            unlock_promoted=render(_UNLOCK_PROMOTED, leases=leases),
            release_lease=render(sql.SQL("SELECT {}(%s, %s, %s)").format(fn("lock_release"))),
            extend_lease=render(_EXTEND_LEASE, leases=leases),
            release_instance=render(
                "DELETE FROM {leases} WHERE instance_id = %s RETURNING name, wanted", leases=leases
            ),
            notify_many=b"SELECT pg_notify(c, '') FROM unnest(%s::text[]) AS c",
            holders=render(_HOLDERS, leases=leases, alive=fn("lock_alive")),
            xact_lock=sql.SQL("SELECT {}(%s)").format(fn("lock_xact")).as_string(None),
        )
