"""The cache's SQL, composed once per schema (identifiers through ``psycopg.sql`` only).

Every read filters on ``expires_at > now()``: an expired row is never returned, judged by the
database clock, whatever the sweeper has or has not deleted yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from pgcoord.schema.cache import TABLE

_LIVE = "(expires_at IS NULL OR expires_at > now())"


@dataclass(frozen=True)
class Queries:
    """Ready-to-execute statements (bytes, so psycopg's per-query cache and auto-prepare apply)."""

    get: bytes
    get_with_ttl: bytes
    mget: bytes
    set: bytes
    mset: bytes
    mdel: bytes
    reset: bytes
    flush_app: bytes
    ttl: bytes
    keys: bytes
    incr: bytes
    sweep: bytes
    count: bytes
    evict: bytes


def build(schema: str) -> Queries:
    """The statements for the cache table in ``schema``."""
    table = sql.Identifier(schema, TABLE)

    def q(text: str) -> bytes:
        return sql.SQL(text).format(t=table, live=sql.SQL(_LIVE)).as_bytes(None)

    upsert_tail = (
        " ON CONFLICT (ns, key) DO UPDATE SET value = EXCLUDED.value,"
        " expires_at = EXCLUDED.expires_at, written_at = EXCLUDED.written_at"
    )
    return Queries(
        get=q("SELECT value FROM {t} WHERE ns = %s AND key = %s AND {live}"),
        get_with_ttl=q(
            "SELECT value, extract(epoch FROM expires_at - now())::float8"
            " FROM {t} WHERE ns = %s AND key = %s AND {live}"
        ),
        mget=q("SELECT key, value FROM {t} WHERE ns = %s AND key = ANY(%s::text[]) AND {live}"),
        # make_interval(secs => NULL) is NULL, so ttl=None stores "never expires".
        set=q(
            "INSERT INTO {t} (ns, key, value, expires_at, written_at)"
            " VALUES (%s, %s, %s, now() + make_interval(secs => %s::float8), now())" + upsert_tail
        ),
        mset=q(
            "INSERT INTO {t} (ns, key, value, expires_at, written_at)"
            " SELECT %s, u.k, u.v, now() + make_interval(secs => %s::float8), now()"
            " FROM unnest(%s::text[], %s::text[]) AS u(k, v)" + upsert_tail
        ),
        mdel=q("DELETE FROM {t} WHERE ns = %s AND key = ANY(%s::text[])"),
        reset=q("DELETE FROM {t} WHERE ns = %s"),
        # ns is "<app>:<prefix>" in the C collation, so an app's rows are one range.
        flush_app=q("DELETE FROM {t} WHERE ns >= %s AND ns < %s"),
        ttl=q(
            "SELECT extract(epoch FROM expires_at - now())::float8"
            " FROM {t} WHERE ns = %s AND key = %s AND {live}"
        ),
        keys=q("SELECT key FROM {t} WHERE ns = %s AND key LIKE %s AND {live} ORDER BY key"),
        # One statement: the row lock taken by ON CONFLICT makes concurrent increments queue
        # up on the row, so none is lost. An expired row counts as missing (restarts at 0 and
        # takes the new ttl); a live one keeps its expiry.
        incr=q(
            "INSERT INTO {t} AS e (ns, key, value, expires_at, written_at)"
            " VALUES (%(ns)s, %(key)s, %(amount)s::bigint::text,"
            " now() + make_interval(secs => %(ttl)s::float8), now())"
            " ON CONFLICT (ns, key) DO UPDATE SET"
            " value = (CASE WHEN e.expires_at IS NOT NULL AND e.expires_at <= now() THEN 0"
            " ELSE e.value::bigint END + %(amount)s::bigint)::text,"
            " expires_at = CASE WHEN e.expires_at IS NOT NULL AND e.expires_at <= now()"
            " THEN EXCLUDED.expires_at ELSE e.expires_at END,"
            " written_at = now()"
            " RETURNING value::bigint"
        ),
        # Bounded batch. The outer expires_at test is re-checked on a row that was rewritten
        # after the inner SELECT saw it, so a fresh value written meanwhile is never deleted.
        sweep=q(
            "DELETE FROM {t} WHERE (ns, key) IN ("
            "SELECT ns, key FROM {t} WHERE expires_at <= now() LIMIT %s)"
            " AND expires_at <= now()"
        ),
        count=q("SELECT count(*) FROM {t} WHERE ns = %s"),
        # Eviction order: expired rows first, then the oldest-written.
        evict=q(
            "DELETE FROM {t} WHERE ns = %(ns)s AND key IN ("
            "SELECT key FROM {t} WHERE ns = %(ns)s"
            " ORDER BY (expires_at IS NOT NULL AND expires_at <= now()) DESC, written_at"
            " LIMIT %(n)s)"
        ),
    )
