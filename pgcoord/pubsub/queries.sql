-- Every statement pub/sub and sync messages send, by name (loaded by pgcoord.sqlfile).
-- {log} is the schema-qualified message_log table, composed with psycopg.sql.

-- name: notify
-- The plain publish: one NOTIFY, no table write, so its transaction writes no WAL.
-- Params: channel, envelope.
SELECT pg_notify(%s, %s)

-- name: insert_and_notify
-- Log an envelope and NOTIFY it (inline when it fits, else as a {"p": id} pointer).
-- Params: channel, durable, envelope, inline. One statement, so one transaction:
-- the NOTIFY is sent if and only if the row is committed.
WITH r AS (
    INSERT INTO {log} (channel, xid, durable, envelope)
    VALUES (%s, pg_current_xact_id()::text::bigint, %s, %s)
    RETURNING id, channel, envelope
)
SELECT pg_notify(r.channel, CASE WHEN %s THEN r.envelope ELSE '{{"p":' || r.id || '}}' END)
FROM r

-- name: insert_in_transaction
-- Log an envelope in the caller's transaction and NOTIFY the app's wake channel.
-- Params: channel, durable, envelope, wake channel. The wake payload is the transaction's
-- xid, identical for every publish in the transaction, and Postgres folds identical
-- notifications of one transaction into one: a transaction NOTIFYs once however many
-- messages it publishes.
WITH r AS (
    INSERT INTO {log} (channel, xid, durable, envelope)
    VALUES (%s, pg_current_xact_id()::text::bigint, %s, %s)
    RETURNING xid
)
SELECT pg_notify(%s, r.xid::text) FROM r

-- name: by_id
-- A spilled envelope, read back when its NOTIFY carried only a pointer. Params: id.
SELECT channel, envelope FROM {log} WHERE id = %s

-- name: by_xid
-- One committed transaction's messages on the given channels, in publish order (the wake-up
-- names only the xid). Params: xid, channels (text[]).
SELECT channel, envelope FROM {log} WHERE xid = %s AND channel = ANY(%s) ORDER BY id

-- name: snapshot
-- The snapshot taken when a channel's LISTEN became active: catch_up skips the rows visible
-- in it (committed before this instance listened).
SELECT pg_current_snapshot()::text

-- name: catch_up
-- Sync messages of the given channels that a reconnecting listener may have missed.
-- Params: channels (text[]), snapshots (text[], the snapshot statement's result taken when
-- each channel's LISTEN became active), window (seconds). Rows visible in a channel's
-- snapshot committed before this instance listened: not for it. Ordered by commit_seq
-- (taken at COMMIT, see migration 0002), i.e. in commit order like live NOTIFY delivery,
-- never by id, which is taken at INSERT. commit_seq is unique; id only makes the order
-- total should a row ever lack one.
SELECT l.channel, l.envelope
FROM {log} AS l
JOIN unnest(%s::text[], %s::text[]) AS s(channel, snap) ON l.channel = s.channel
WHERE l.durable
  AND l.created_at > now() - make_interval(secs => %s)
  AND NOT pg_visible_in_snapshot(l.xid::text::xid8, s.snap::pg_snapshot)
ORDER BY l.commit_seq, l.id

-- name: sweep
-- Delete up to a batch of expired rows, if no other instance is sweeping right now.
-- Params: advisory key, the shorter retention (s), durable retention (s), spill retention
-- (s), batch size. One statement is one transaction, which holds the try-lock. The first
-- created_at bound lets the scan use the created_at index.
WITH gate AS (SELECT pg_try_advisory_xact_lock(%s) AS ok),
doomed AS (
    SELECT id FROM {log}
    WHERE (SELECT ok FROM gate)
      AND created_at < now() - make_interval(secs => %s)
      AND (
        (durable AND created_at < now() - make_interval(secs => %s))
        OR (NOT durable AND created_at < now() - make_interval(secs => %s))
      )
    LIMIT %s
)
DELETE FROM {log} WHERE id = ANY(ARRAY(SELECT id FROM doomed))
