-- Every statement the locks service sends (see the 0005 revision for the functions).
--
-- A lock starts as a session advisory lock on a borrowed work connection and, once held for
-- PROMOTE_AFTER, becomes a row of {leases} (the schema's lock_leases). Each {lock_*}
-- placeholder is the schema's table or function of that name; {seq} is the lock_token_seq name
-- as a text literal (nextval's argument) and {factor} is 2 ** lease.TOKEN_EPOCH_SHIFT, the
-- epoch's place in a token.

-- name: acquire
-- The hot acquisition, one statement: lock_free() takes the advisory lock and checks (with a
-- snapshot taken after it) that no promoted lease holds the key; only then does the outer
-- projection draw the token and arm the session's lease. The epoch is the live one (a crash
-- empties lock_epoch_live and resets the sequence together; lock_new_epoch() starts the next).
-- The subquery (fenced by OFFSET 0) runs lock_free() once; both columns read its result.
SELECT CASE WHEN g.free THEN
         COALESCE((SELECT epoch FROM {lock_epoch_live} WHERE id = 1), {lock_new_epoch}()) * {factor}
         + nextval({seq}) END,
       CASE WHEN g.free THEN set_config('idle_session_timeout', %s, false) END
FROM (SELECT {lock_free}(%s) AS free OFFSET 0) g

-- name: acquire_warm
-- The same on a session that already knows the epoch (the client adds it): the epoch a session
-- saw stays valid for its whole life, since only crash recovery resets the sequence and a crash
-- ends every session.
SELECT CASE WHEN g.free THEN nextval({seq}) END,
       CASE WHEN g.free THEN set_config('idle_session_timeout', %s, false) END
FROM (SELECT {lock_free}(%s) AS free OFFSET 0) g

-- name: take_over
-- A task of this process takes the lock over from the previous holder's session without it
-- being let go: a new token, its own lease, and whether another instance waits (fairness).
SELECT COALESCE((SELECT epoch FROM {lock_epoch_live} WHERE id = 1), {lock_new_epoch}()) * {factor}
       + nextval({seq}),
       set_config('idle_session_timeout', %s, false),
       EXISTS (SELECT 1 FROM {leases} WHERE lock_key = %s AND wanted)

-- name: take_over_warm
-- take_over on a session that already knows the epoch (as acquire_warm).
SELECT nextval({seq}), set_config('idle_session_timeout', %s, false),
       EXISTS (SELECT 1 FROM {leases} WHERE lock_key = %s AND wanted)

-- name: acquire_waiting
-- The slow path, for a key that was busy: lock_try() takes the key if it is free (a token, the
-- lease armed), else marks it wanted (newly_wanted: this call set the mark) and says when the
-- promoted lease holding it ends.
SELECT token, expires_in, newly_wanted FROM {lock_try}(%s, %s, true)

-- name: unlock
-- Unlock on the session, disarm its lease, and say whether a waiter marked the key (then the
-- caller sends wake_waiters). One plain statement: its snapshot predates the unlock, so a mark
-- committed in the microseconds between is missed; the waiter covers that by trying once more
-- shortly after marking (see LockManager._take).
SELECT pg_advisory_unlock(%s), set_config('idle_session_timeout', '0', false),
       EXISTS (SELECT 1 FROM {leases} WHERE lock_key = %s AND holder_pid IS NULL AND wanted)

-- name: wake_waiters
-- Clear the key's waiter mark and NOTIFY its channel, sent only when unlock saw a mark.
SELECT {lock_wake}(%s, %s)

-- name: extend_session
-- Extend a session lock's lease: the session's idle_session_timeout is the lease (ms, text).
SELECT set_config('idle_session_timeout', %s, false)

-- name: promote
-- Turn a session lock into a lease row (committed on its own, before unlock_promoted).
SELECT {lock_promote}(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)

-- name: unlock_promoted
-- Sent right after promote in the same pipeline: lets go of the advisory lock only when the
-- lease row with this token is there (committed by the previous statement), so the key is
-- never free in between, and a refused promotion keeps the session lock.
SELECT pg_advisory_unlock(l.lock_key), set_config('idle_session_timeout', '0', false)
FROM {leases} l WHERE l.lock_key = %s AND l.token = %s

-- name: release_lease
-- Release a promoted lock: delete its lease row if the token still holds it, waking waiters.
SELECT {lock_release}(%s, %s, %s)

-- name: extend_lease
-- Extend a promoted lock's lease, only while it has not ended (RETURNING: the row was ours).
UPDATE {leases} SET ttl_ms = %s, expires_at = clock_timestamp() + make_interval(secs => %s)
WHERE lock_key = %s AND token = %s
  AND (expires_at IS NULL OR expires_at > clock_timestamp())
RETURNING true

-- name: release_instance
-- At stop, free every lease row of this instance at once (rather than leaving the others to
-- wait for the ttl), returning which keys had waiters to notify.
DELETE FROM {leases} WHERE instance_id = %s RETURNING name, wanted

-- name: sweep
-- Delete the rows that hold nothing any more, which nothing else would ever delete for a key
-- nobody takes again: a promoted lease whose holder's LISTEN session is gone (its process
-- died) or whose lease ended (a frozen or cut-off holder, which already counts it lost), and a
-- waiter's mark on a key no session or transaction holds (its holder died before it could
-- wake anyone). Any app's: such a row changes nothing for anyone. A mark on a key that becomes
-- held just after this look costs its waiter at most one lock_recheck. The advisory locks of
-- this database are read once (pg_locks shows a bigint key split in classid, the high 32 bits,
-- and objid, the low ones, with objsubid 1).
WITH held AS MATERIALIZED (
    SELECT (k.classid::bigint << 32) | k.objid::bigint AS lock_key
    FROM pg_locks k
    WHERE k.locktype = 'advisory' AND k.objsubid = 1
      AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
)
DELETE FROM {leases} l
WHERE CASE WHEN l.holder_pid IS NOT NULL
           THEN (l.expires_at IS NOT NULL AND l.expires_at <= clock_timestamp())
                OR NOT {lock_alive}(l.holder_pid, l.holder_start)
           ELSE l.lock_key NOT IN (SELECT h.lock_key FROM held h)
      END

-- name: notify_many
-- Wake the waiters of many channels in one statement (one array parameter).
SELECT pg_notify(c, '') FROM unnest(%s::text[]) AS c

-- name: holders
-- Every live promoted lease of the app: a holder that is alive and whose lease has not ended
-- (lock_alive checks the holder's pid and backend start, so a reused pid does not count).
SELECT l.name, l.instance_id, l.holder_pid, l.ttl_ms, extract(epoch FROM l.since),
       extract(epoch FROM l.expires_at - clock_timestamp())
FROM {leases} l
WHERE l.app = %s AND l.holder_pid IS NOT NULL
  AND (l.expires_at IS NULL OR l.expires_at > clock_timestamp())
  AND {lock_alive}(l.holder_pid, l.holder_start)
ORDER BY l.since, l.name

-- name: xact_lock
-- Take the key's lock inside the caller's transaction: lock_xact() takes the transaction
-- advisory lock and waits out a promoted lease. Runs on the caller's connection or session
-- (pgcoord.transaction), so LockQueries keeps it as text.
SELECT {lock_xact}(%s)
