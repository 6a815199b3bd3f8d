-- Every statement pub/sub and sync messages send, by name (loaded by pgcoord.sqlfile).
-- {log} is the schema-qualified message_log table, composed with psycopg.sql.

-- name: notify
-- The plain publish: one NOTIFY, no table write, so its transaction writes no WAL.
-- Params: channel, envelope.
SELECT pg_notify(%s, %s)

-- name: insert_and_notify
-- Log an envelope and NOTIFY a {"p": id} pointer to its row (sync messages, large messages,
-- and every pub/sub message under pubsub_via_table). Params: app, channel, durable, envelope.
-- One statement, so one transaction: the NOTIFY is sent if and only if the row is committed.
-- The row names its app, whose sweeper alone deletes it (by that app's retention).
WITH r AS (
    INSERT INTO {log} (app, channel, xid, durable, envelope)
    VALUES (%s, %s, pg_current_xact_id()::text::bigint, %s, %s)
    RETURNING id, channel
)
SELECT pg_notify(r.channel, '{{"p":' || r.id || '}}') FROM r

-- name: insert_in_transaction
-- Log an envelope in the caller's transaction and NOTIFY the app's wake channel.
-- Params: app, channel, durable, envelope, wake channel. The wake payload is the transaction's
-- xid, identical for every publish in the transaction, and Postgres folds identical
-- notifications of one transaction into one: a transaction NOTIFYs once however many
-- messages it publishes.
WITH r AS (
    INSERT INTO {log} (app, channel, xid, durable, envelope)
    VALUES (%s, %s, pg_current_xact_id()::text::bigint, %s, %s)
    RETURNING xid
)
SELECT pg_notify(%s, r.xid::text) FROM r

-- name: by_id
-- The envelopes a batch of {"p": id} pointers names, read back by every receiver. Params: ids
-- (bigint[]), sync retention (s), pub/sub retention (s), the receiver's start snapshot. One
-- statement per batch of pointers however many arrived (a forged flood costs a few reads).
-- A pointer anyone could have NOTIFYed (see docs/security.md) finds only a row committed
-- after the receiver started (not visible in the snapshot it took before its first LISTEN)
-- and still within its retention, so never an old message replayed after receivers forgot
-- its id. The window cannot hide a real row: pointers are sent by insert_and_notify, whose
-- row is written by its own one-statement transaction, so created_at is its commit time
-- (transactional rows travel by xid, below). The receiver drops a row of another channel
-- than the pointer's. commit_seq: NULL except on sync messages.
SELECT id, channel, envelope, commit_seq FROM {log}
WHERE id = ANY(%s::bigint[])
  AND created_at > now() - make_interval(secs => CASE WHEN durable THEN %s ELSE %s END)
  AND NOT pg_visible_in_snapshot(xid::text::xid8, %s::pg_snapshot)

-- name: by_xid
-- A batch of committed transactions' messages on the given channels, in publish order within
-- each transaction (the wake-up names only the xid). Params: xids (bigint[]), channels
-- (text[]), the receiver's start snapshot. No created_at bound: created_at is the
-- transaction's start, so a transaction open longer than the retention would hide its own
-- rows. A replayed xid is bounded instead by the start snapshot (rows committed before the
-- receiver started are not for it), by the seen ids (kept longer than the sweeper keeps rows)
-- and by the sweeper, which deletes rows by created_at, i.e. soon after a long transaction
-- commits.
SELECT xid, channel, envelope, commit_seq FROM {log}
WHERE xid = ANY(%s::bigint[]) AND channel = ANY(%s)
  AND NOT pg_visible_in_snapshot(xid::text::xid8, %s::pg_snapshot)
ORDER BY id

-- name: after_seq
-- A sync channel's messages committed after commit_seq, in commit order, for a subscription
-- whose in-memory backlog overflowed and that now re-reads what it let go. Params: channel,
-- commit_seq, limit. No created_at bound: it would hide the rows of a transaction open longer
-- than the retention, which the subscription let go live; the sweeper bounds the rows anyway.
SELECT channel, envelope, commit_seq FROM {log}
WHERE channel = %s AND durable AND commit_seq > %s
ORDER BY commit_seq
LIMIT %s

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
SELECT l.channel, l.envelope, l.commit_seq
FROM {log} AS l
JOIN unnest(%s::text[], %s::text[]) AS s(channel, snap) ON l.channel = s.channel
WHERE l.durable
  AND l.created_at > now() - make_interval(secs => %s)
  AND NOT pg_visible_in_snapshot(l.xid::text::xid8, s.snap::pg_snapshot)
ORDER BY l.commit_seq, l.id

-- name: catch_up_after
-- The sync messages of the given channels committed after commit_seq: what a receiver reads
-- instead of the pointers it let go when a flood of notifications overflowed its pending
-- batch. Params as catch_up, then the highest commit_seq already handed over.
SELECT l.channel, l.envelope, l.commit_seq
FROM {log} AS l
JOIN unnest(%s::text[], %s::text[]) AS s(channel, snap) ON l.channel = s.channel
WHERE l.durable
  AND l.created_at > now() - make_interval(secs => %s)
  AND NOT pg_visible_in_snapshot(l.xid::text::xid8, s.snap::pg_snapshot)
  AND l.commit_seq > %s
ORDER BY l.commit_seq, l.id

-- name: sweep
-- Delete up to a batch of this app's expired rows, if no other instance of the app is
-- sweeping right now. Params: advisory key, app, the shorter retention (s), durable retention
-- (s), spill retention (s), batch size. One statement is one transaction, which holds the
-- try-lock. Only the app's own rows: another app of the schema keeps its rows for its own
-- retention. Rows without an app (logged before the app column existed) are anyone's, as
-- they always were. The app and the first created_at bound let the scan use the
-- (app, created_at) index.
WITH gate AS (SELECT pg_try_advisory_xact_lock(%s) AS ok),
doomed AS (
    SELECT id FROM {log}
    WHERE (SELECT ok FROM gate)
      AND (app = %s OR app IS NULL)
      AND created_at < now() - make_interval(secs => %s)
      AND (
        (durable AND created_at < now() - make_interval(secs => %s))
        OR (NOT durable AND created_at < now() - make_interval(secs => %s))
      )
    LIMIT %s
)
DELETE FROM {log} WHERE id = ANY(ARRAY(SELECT id FROM doomed))
