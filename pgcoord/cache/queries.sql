-- Every statement the cache sends. {entries} is the schema's UNLOGGED cache_entries table.
--
-- Every read filters on (expires_at IS NULL OR expires_at > now()): an expired row is never
-- returned, judged by the database clock, whatever the sweeper has or has not deleted yet.
-- Writes are upserts on (ns, key), one autocommit statement each (one round trip).
-- ns is "<app>:<prefix>"; the table's text columns use the C collation.

-- name: get
-- The live value of one key.
SELECT value FROM {entries}
WHERE ns = %s AND key = %s AND (expires_at IS NULL OR expires_at > now())

-- name: get_with_ttl
-- The live value of one key and its seconds left (NULL: never expires), in one round trip.
SELECT value, extract(epoch FROM expires_at - now())::float8
FROM {entries}
WHERE ns = %s AND key = %s AND (expires_at IS NULL OR expires_at > now())

-- name: mget
-- The live values of many keys, one array parameter (one statement whatever the count).
SELECT key, value FROM {entries}
WHERE ns = %s AND key = ANY(%s::text[]) AND (expires_at IS NULL OR expires_at > now())

-- name: set
-- Store one value. make_interval(secs => NULL) is NULL, so ttl=None stores "never expires".
-- The one row answered says whether another instance near-caches this namespace (the same
-- EXISTS ends every write; registrations are described at the end of this file): the writer
-- then NOTIFYs an invalidation, and otherwise sends nothing more.
WITH written AS (
    INSERT INTO {entries} (ns, key, value, expires_at, written_at)
    VALUES (%(ns)s, %(key)s, %(value)s, now() + make_interval(secs => %(ttl)s::float8), now())
    ON CONFLICT (ns, key) DO UPDATE SET
        value = EXCLUDED.value,
        expires_at = EXCLUDED.expires_at,
        written_at = EXCLUDED.written_at
)
SELECT EXISTS (
    SELECT 1 FROM {entries}
    WHERE ns = %(near)s AND key <> %(me)s
      AND written_at > now() - make_interval(secs => %(lease)s::float8)
)

-- name: mset
-- Store many values with one ttl from two parallel arrays (keys, values), as `set` does one.
WITH written AS (
    INSERT INTO {entries} (ns, key, value, expires_at, written_at)
    SELECT %(ns)s, u.k, u.v, now() + make_interval(secs => %(ttl)s::float8), now()
    FROM unnest(%(keys)s::text[], %(values)s::text[]) AS u(k, v)
    ON CONFLICT (ns, key) DO UPDATE SET
        value = EXCLUDED.value,
        expires_at = EXCLUDED.expires_at,
        written_at = EXCLUDED.written_at
)
SELECT EXISTS (
    SELECT 1 FROM {entries}
    WHERE ns = %(near)s AND key <> %(me)s
      AND written_at > now() - make_interval(secs => %(lease)s::float8)
)

-- name: mdel
-- Delete many keys of one namespace (expired or not); answers as `set` does.
WITH deleted AS (
    DELETE FROM {entries} WHERE ns = %(ns)s AND key = ANY(%(keys)s::text[])
)
SELECT EXISTS (
    SELECT 1 FROM {entries}
    WHERE ns = %(near)s AND key <> %(me)s
      AND written_at > now() - make_interval(secs => %(lease)s::float8)
)

-- name: reset
-- Empty one namespace (one cache prefix); answers as `set` does.
WITH deleted AS (
    DELETE FROM {entries} WHERE ns = %(ns)s
)
SELECT EXISTS (
    SELECT 1 FROM {entries}
    WHERE ns = %(near)s AND key <> %(me)s
      AND written_at > now() - make_interval(secs => %(lease)s::float8)
)

-- name: flush_app
-- Empty every namespace of one app: ns is "<app>:<prefix>" in the C collation and ':' < ';',
-- so the bounds ("<app>:", "<app>;") are exactly the app's rows, one index range.
DELETE FROM {entries} WHERE ns >= %s AND ns < %s

-- name: ttl
-- Seconds left of a live key (NULL: never expires; no row: missing or expired).
SELECT extract(epoch FROM expires_at - now())::float8
FROM {entries}
WHERE ns = %s AND key = %s AND (expires_at IS NULL OR expires_at > now())

-- name: keys
-- The live keys of a namespace matching a LIKE pattern (translated from a glob), sorted.
SELECT key FROM {entries}
WHERE ns = %s AND key LIKE %s AND (expires_at IS NULL OR expires_at > now())
ORDER BY key

-- name: incr
-- Add to an integer value, in one statement: the row lock taken by ON CONFLICT makes
-- concurrent increments queue up on the row, so none is lost. An expired row counts as
-- missing (restarts at 0 and takes the new ttl); a live one keeps its expiry. Answers the new
-- value and, as `set` does, whether to NOTIFY.
WITH written AS (
    INSERT INTO {entries} AS e (ns, key, value, expires_at, written_at)
    VALUES (
        %(ns)s, %(key)s, %(amount)s::bigint::text,
        now() + make_interval(secs => %(ttl)s::float8), now()
    )
    ON CONFLICT (ns, key) DO UPDATE SET
        value = (
            CASE WHEN e.expires_at IS NOT NULL AND e.expires_at <= now() THEN 0
            ELSE e.value::bigint END + %(amount)s::bigint
        )::text,
        expires_at = CASE WHEN e.expires_at IS NOT NULL AND e.expires_at <= now()
            THEN EXCLUDED.expires_at ELSE e.expires_at END,
        written_at = now()
    RETURNING value::bigint AS value
)
SELECT (SELECT value FROM written), EXISTS (
    SELECT 1 FROM {entries}
    WHERE ns = %(near)s AND key <> %(me)s
      AND written_at > now() - make_interval(secs => %(lease)s::float8)
)

-- name: sweep
-- Delete one bounded batch of expired rows (of every app: they are garbage to all). The outer
-- expires_at test is re-checked on a row that was rewritten after the inner SELECT saw it, so a
-- fresh value written meanwhile is never deleted.
DELETE FROM {entries}
WHERE (ns, key) IN (SELECT ns, key FROM {entries} WHERE expires_at <= now() LIMIT %s)
  AND expires_at <= now()

-- name: count
-- Rows of one namespace, expired or not (what the size bound counts).
SELECT count(*) FROM {entries} WHERE ns = %s

-- name: evict
-- Delete up to %(n)s rows of a namespace over its size bound: expired rows first, then the
-- oldest-written.
DELETE FROM {entries}
WHERE ns = %(ns)s AND key IN (
    SELECT key FROM {entries}
    WHERE ns = %(ns)s
    ORDER BY (expires_at IS NOT NULL AND expires_at <= now()) DESC, written_at
    LIMIT %(n)s
)

-- name: try_xact_lock
-- Take the sweep's (or an eviction's) advisory lock if free. Transaction-scoped, never
-- session-level: the lock ends with the caller's transaction whatever interrupts it (an error,
-- or cancellation at stop between the server granting it and us reading the answer). A session
-- lock would then go back to a shared pool still held, and every instance's sweep would be
-- skipped while that connection lives.
SELECT pg_try_advisory_xact_lock(%s)

-- name: wrap_try_lock
-- Take a wrap key's cluster-wide lock if free, on wrap's one dedicated connection. Session-level
-- (held while the leader's fn runs, across its transactions) and only ever a try: the connection
-- is shared by every key this process computes, so it must never block waiting for a holder.
SELECT pg_try_advisory_lock(%s)

-- name: wrap_unlock
-- Release a wrap key's session lock (closing the connection releases every one of them too).
SELECT pg_advisory_unlock(%s)

-- name: notify
-- Send invalidation payloads on the cache channel, many in one statement (one round trip). Run
-- in its own transaction after the write committed, never inside it: a transaction that both
-- writes and NOTIFYs holds the server-wide notify lock through its WAL flush (measured: 2.4x
-- fewer commits/s with 8 writers), while a NOTIFY-only transaction writes no WAL.
SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p

-- name: near_writers
-- Near-cache registrations (this block and the four below). An instance with a near cache on
-- namespace "<app>:<prefix>" keeps a row (ns "<app>;near:<prefix>", key its instance id) in
-- this same table: ';' sorts right after ':', so these rows lie outside every app's range of
-- cache namespaces (flush_app and a cache's keys/reset/size bound never see them), and no cache
-- prefix can produce that ns. written_at is the registration's heartbeat: writers count a row
-- younger than the lease (the lease parameter of every write above). expires_at is only the
-- sweeper's clean-up horizon for rows a crashed instance left behind, a day ahead, moved only
-- when less than half of it is left (so a renewal rewrites written_at alone).
--
-- This block: the transactions (virtual transaction ids) holding ROW EXCLUSIVE on this table
-- now, run right after near_register committed. Every INSERT/DELETE takes that lock before
-- its statement's snapshot and keeps it to commit, so a write missing from this answer started
-- after the registration was visible and sees it; the registering instance waits for the ones
-- listed (near_writers_left) before serving. Nobody waits for a lock: a table lock here would
-- queue behind VACUUM/ANALYZE (SHARE UPDATE EXCLUSIVE) and every write behind it. Relation
-- OIDs are per database, hence the database test; pid is NULL for a prepared transaction.
SELECT DISTINCT l.virtualtransaction
FROM pg_locks l
WHERE l.locktype = 'relation' AND l.mode = 'RowExclusiveLock' AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.relation = (
      SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = %(schema)s AND c.relname = %(table)s
  )
  AND l.pid IS DISTINCT FROM pg_backend_pid()

-- name: near_writers_left
-- Which of the transactions near_writers listed are still open: a transaction holds locks
-- (its own virtual transaction id's, at least) until it ends, and a virtual transaction id is
-- never reused, also when a new session takes the same backend slot.
SELECT DISTINCT virtualtransaction FROM pg_locks WHERE virtualtransaction = ANY(%s::text[])

-- name: near_register
-- Insert or refresh this instance's registration rows (one per namespace it near-caches).
INSERT INTO {entries} (ns, key, value, expires_at, written_at)
SELECT n, %(me)s, 'true', now() + interval '1 day', now()
FROM unnest(%(ns)s::text[]) AS n
ON CONFLICT (ns, key) DO UPDATE SET
    written_at = EXCLUDED.written_at,
    expires_at = EXCLUDED.expires_at

-- name: near_renew
-- The heartbeat of this instance's live registrations; answers the namespaces renewed. Only a
-- row younger than %(fresh)s (the lease minus a margin) is renewed: a writer starting while
-- this statement runs still sees the old written_at, and would skip its NOTIFY if that were
-- about to lapse. An older row (or none: swept, or the UNLOGGED table emptied by a crash) is
-- registered again (near_register, near_writers) and that near cache's entries dropped.
UPDATE {entries} SET
    written_at = now(),
    expires_at = CASE WHEN expires_at < now() + interval '12 hours'
        THEN now() + interval '1 day' ELSE expires_at END
WHERE ns = ANY(%(ns)s::text[]) AND key = %(me)s
  AND written_at > now() - make_interval(secs => %(fresh)s::float8)
RETURNING ns

-- name: near_unregister
-- Remove this instance's registrations (at stop), so writers stop NOTIFYing for it.
DELETE FROM {entries} WHERE ns = ANY(%(ns)s::text[]) AND key = %(me)s
