-- The queue's SQL: every statement pgcoord.queue sends, by name (loaded by pgcoord.sqlfile and
-- rendered once per schema to bytes by pgcoord/queue/queries.py and pgcoord/queue/keys.py).
--
-- Placeholders: {jobs}, {failed}, {waiters}, {keys} are the schema's tables; {jobs_name} is
-- the jobs table's qualified name as a string literal; {sync_commit} is the
-- queue_synchronous_commit level as a literal from a closed list (queries.check_synchronous_commit),
-- not a parameter, so each statement keeps one fixed text.
--
-- Fencing: every statement that finishes a try (complete, retry, fail, release, renew) names
-- the job by (id, attempt). attempt grows by one at every claim, so a worker whose lease ran
-- out and whose job was claimed again cannot touch it any more.
--
-- Worker-side writes (claim, complete, retry, fail, release, renew, waiter rows) commit at the
-- queue_synchronous_commit level, through the CTE
--     cfg AS (SELECT set_config('synchronous_commit', {sync_commit}, true) AS v)
-- joined into the statement: set_config(..., true) lasts only for the statement's own
-- transaction. The default, off, does not wait for the WAL flush: losing such a write in a
-- crash or a failover only makes a job run again, which at-least-once allows, and the enqueue
-- itself stays fully durable. It takes a claim or completion from ~0.3 ms of fsync wait to
-- ~0.07 ms and lets commits overlap; "on" with a synchronous standby makes a finished job stay
-- finished through a failover (docs/operations.md, "Failover").
--
-- "Is some worker of this queue possibly asleep, waiting for a NOTIFY?" is the uncorrelated
-- subquery EXISTS (SELECT 1 FROM {waiters} ... w.idle AND w.expires_at > now()) repeated in
-- the publish statements: evaluated once per statement, one primary-key range probe.

-- name: publish
-- Enqueue one job (no NOTIFY: the caller sends it after commit, paced by queue_notify_gap);
-- also says whether a worker may be waiting for one.
INSERT INTO {jobs} (app, channel, priority, run_at, max_retries, timeout, payload)
VALUES (%(app)s, %(channel)s, %(priority)s, now() + make_interval(secs => %(delay)s),
    %(max_retries)s, %(timeout)s, %(payload)s) RETURNING id,
EXISTS (SELECT 1 FROM {waiters} AS w WHERE w.app = %(app)s AND w.channel = %(channel)s
    AND w.idle AND w.expires_at > now())

-- name: publish_notify
-- Enqueue one job and wake a waiting worker in the same statement (and transaction).
-- pg_notify sits in a CTE, so it runs at most once per statement however many rows, and only
-- when a worker may be waiting (else the transaction takes no NOTIFY lock at all).
WITH ins AS (INSERT INTO {jobs} (app, channel, priority, run_at, max_retries, timeout, payload)
    VALUES (%(app)s, %(channel)s, %(priority)s, now() + make_interval(secs => %(delay)s),
        %(max_retries)s, %(timeout)s, %(payload)s) RETURNING id),
w AS (SELECT EXISTS (SELECT 1 FROM {waiters} AS w WHERE w.app = %(app)s
    AND w.channel = %(channel)s AND w.idle AND w.expires_at > now()) AS waiting),
n AS (SELECT pg_notify(%(pg_channel)s, '') FROM w WHERE w.waiting)
SELECT ins.id, w.waiting FROM ins CROSS JOIN w LEFT JOIN n ON true

-- name: publish_many
-- Enqueue one job per payload of an array in one statement (no NOTIFY, as publish).
INSERT INTO {jobs} (app, channel, priority, run_at, max_retries, timeout, payload)
SELECT %(app)s, %(channel)s, %(priority)s, now() + make_interval(secs => %(delay)s),
    %(max_retries)s, %(timeout)s, p FROM unnest(%(payloads)s::text[]) AS p RETURNING id,
EXISTS (SELECT 1 FROM {waiters} AS w WHERE w.app = %(app)s AND w.channel = %(channel)s
    AND w.idle AND w.expires_at > now())

-- name: publish_many_notify
-- Enqueue an array of payloads and wake a waiting worker, in one statement: the CTE runs
-- pg_notify once however many rows, and only when a worker may be waiting.
WITH ins AS (INSERT INTO {jobs} (app, channel, priority, run_at, max_retries, timeout, payload)
    SELECT %(app)s, %(channel)s, %(priority)s, now() + make_interval(secs => %(delay)s),
        %(max_retries)s, %(timeout)s, p FROM unnest(%(payloads)s::text[]) AS p RETURNING id),
w AS (SELECT EXISTS (SELECT 1 FROM {waiters} AS w WHERE w.app = %(app)s
    AND w.channel = %(channel)s AND w.idle AND w.expires_at > now()) AS waiting),
n AS (SELECT pg_notify(%(pg_channel)s, '') FROM w WHERE w.waiting)
SELECT ins.id, w.waiting FROM ins CROSS JOIN w LEFT JOIN n ON true

-- name: notify
-- Wake the workers of one queue (its pg channel is the parameter); an empty payload, since a
-- woken worker just claims.
SELECT pg_notify(%s, '')

-- name: claim
-- Claim up to %(n)s jobs of a queue for %(lease)s seconds, at the worker commit level.
-- Claimable means run_at <= now(): new, delayed-and-due, retry-due, or lease expired (a dead
-- or frozen worker's job comes back through this very query; no sweeper needed).
-- A claim that comes back short also says, in the same round trip, in how many seconds the
-- next job of the queue may become claimable, so an idle worker sleeps exactly that long
-- instead of polling (docs/queue.md, "Waking up"). That is the earliest of:
-- - a future run_at (delayed job, retry after backoff, another worker's lease end) of a job
--   not leased by this worker (ours are renewed while they run);
-- - now() + lease when a claimable row was skipped because it is locked: another worker is
--   claiming it right now, and its lease will end about then if that worker dies.
-- Computed per distinct priority (pr: a loose index scan, two probes each), because the one
-- claim index leads with priority; a full claim skips it altogether (more work is waiting,
-- the worker claims again at once).
WITH RECURSIVE cfg AS (SELECT set_config('synchronous_commit', {sync_commit}, true) AS v),
c AS (SELECT id FROM {jobs}
    WHERE app = %(app)s AND channel = %(channel)s AND run_at <= now()
    ORDER BY priority DESC, run_at, id LIMIT %(n)s FOR UPDATE SKIP LOCKED),
u AS (UPDATE {jobs} AS j SET run_at = now() + make_interval(secs => %(lease)s),
    attempt = j.attempt + 1, worker = %(me)s FROM c, cfg WHERE j.id = c.id
    RETURNING j.id, j.attempt, j.retried, j.max_retries, j.timeout, j.priority, j.payload,
        j.attempt_base),
pr(p) AS ((SELECT priority FROM {jobs} WHERE app = %(app)s AND channel = %(channel)s
        AND (SELECT count(*) FROM c) < %(n)s ORDER BY priority DESC LIMIT 1)
    UNION ALL SELECT (SELECT priority FROM {jobs} WHERE app = %(app)s
        AND channel = %(channel)s AND priority < pr.p ORDER BY priority DESC LIMIT 1)
    FROM pr WHERE pr.p IS NOT NULL),
nx AS (SELECT extract(epoch FROM min(LEAST(
    (SELECT f.run_at FROM {jobs} AS f WHERE f.app = %(app)s AND f.channel = %(channel)s
        AND f.priority = pr.p AND f.run_at > now() AND f.worker IS DISTINCT FROM %(me)s
        ORDER BY f.run_at LIMIT 1),
    CASE WHEN EXISTS (SELECT 1 FROM {jobs} AS k WHERE k.app = %(app)s
        AND k.channel = %(channel)s AND k.priority = pr.p AND k.run_at <= now()
        AND k.id NOT IN (SELECT id FROM c))
    THEN now() + make_interval(secs => %(lease)s) END)) - now())::float8 AS due
    FROM pr WHERE pr.p IS NOT NULL)
SELECT u.*, nx.due FROM nx LEFT JOIN u ON true

-- name: complete
-- Delete finished jobs, many per statement (ids and attempts as two arrays), fenced by
-- (id, attempt), at the worker commit level.
WITH cfg AS (SELECT set_config('synchronous_commit', {sync_commit}, true) AS v)
DELETE FROM {jobs} AS j USING unnest(%s::bigint[], %s::int[]) AS d(id, attempt), cfg
WHERE j.id = d.id AND j.attempt = d.attempt

-- name: retry
-- Put failed tries back after their backoff delay (seconds per job), counting the retry;
-- fenced by (id, attempt), at the worker commit level.
WITH cfg AS (SELECT set_config('synchronous_commit', {sync_commit}, true) AS v)
UPDATE {jobs} AS j SET run_at = now() + make_interval(secs => d.delay),
    retried = j.retried + 1, worker = NULL
FROM unnest(%s::bigint[], %s::int[], %s::float8[]) AS d(id, attempt, delay), cfg
WHERE j.id = d.id AND j.attempt = d.attempt

-- name: fail
-- Move jobs out of retries into the dead letters with their error and traceback, in one
-- statement (the DELETE and the INSERT commit together); fenced by (id, attempt), at the
-- worker commit level. A job failed before (then retried from the dead letters) overwrites
-- its old dead letter.
WITH cfg AS (SELECT set_config('synchronous_commit', {sync_commit}, true) AS v),
d AS (SELECT * FROM unnest(%s::bigint[], %s::int[], %s::text[], %s::text[])
    AS d(id, attempt, error, tb)),
moved AS (DELETE FROM {jobs} AS j USING d WHERE j.id = d.id AND j.attempt = d.attempt
    RETURNING j.id, j.app, j.channel, j.priority, j.attempt, j.retried, j.max_retries,
        j.timeout, j.created_at, j.payload)
INSERT INTO {failed} (id, app, channel, priority, attempt, retried, max_retries,
    timeout, created_at, error, traceback, payload)
SELECT m.id, m.app, m.channel, m.priority, m.attempt, m.retried, m.max_retries,
    m.timeout, m.created_at, d.error, d.tb, m.payload
FROM moved AS m JOIN d ON d.id = m.id, cfg
ON CONFLICT (id) DO UPDATE SET error = EXCLUDED.error, traceback = EXCLUDED.traceback,
    attempt = EXCLUDED.attempt, retried = EXCLUDED.retried, failed_at = now(),
    payload = EXCLUDED.payload

-- name: release
-- Graceful stop: back to the queue at once, without counting a failed try; fenced by
-- (id, attempt), at the worker commit level.
WITH cfg AS (SELECT set_config('synchronous_commit', {sync_commit}, true) AS v)
UPDATE {jobs} AS j SET run_at = now(), worker = NULL
FROM unnest(%s::bigint[], %s::int[]) AS d(id, attempt), cfg
WHERE j.id = d.id AND j.attempt = d.attempt

-- name: renew
-- Extend the leases of running jobs by %s seconds; returns the ids still held, so a worker
-- learns which jobs it lost (fenced by (id, attempt)), at the worker commit level.
WITH cfg AS (SELECT set_config('synchronous_commit', {sync_commit}, true) AS v)
UPDATE {jobs} AS j SET run_at = now() + make_interval(secs => %s)
FROM unnest(%s::bigint[], %s::int[]) AS d(id, attempt), cfg
WHERE j.id = d.id AND j.attempt = d.attempt RETURNING j.id

-- name: list_failed
-- Dead letters of an app, optionally of one channel and/or some ids (a NULL filter matches
-- all), oldest failure first.
SELECT id, channel, payload, error, traceback, retried, max_retries, priority,
    timeout, created_at, failed_at FROM {failed}
WHERE app = %(app)s AND (%(channel)s::text IS NULL OR channel = %(channel)s)
    AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
ORDER BY failed_at, id LIMIT %(limit)s

-- name: retry_failed
-- Move dead letters back into the queue, due now, in one statement. A retried dead letter
-- keeps its id and starts over with a fresh retry budget. Its attempt goes on from where it
-- failed, so no (id, attempt) fencing token is ever handed out twice: a frozen worker of an
-- earlier life cannot finish the new one.
WITH moved AS (DELETE FROM {failed} WHERE app = %(app)s
    AND (%(channel)s::text IS NULL OR channel = %(channel)s)
    AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
    RETURNING id, app, channel, priority, attempt, max_retries, timeout, created_at,
        payload)
INSERT INTO {jobs} (id, app, channel, priority, run_at, attempt, attempt_base,
    max_retries, timeout, created_at, payload)
SELECT id, app, channel, priority, now(), attempt, attempt, max_retries, timeout,
    created_at, payload FROM moved RETURNING id, channel

-- name: purge_failed
-- Delete dead letters for good (same filters as list_failed, plus an optional minimum age in
-- seconds); returns the deleted ids.
DELETE FROM {failed} WHERE app = %(app)s
    AND (%(channel)s::text IS NULL OR channel = %(channel)s)
    AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
    AND (%(older)s::float8 IS NULL OR failed_at < now() - make_interval(secs => %(older)s))
RETURNING id

-- name: counts
-- One queue's jobs by state: claimable now, leased (running), and waiting (delayed or
-- backing off), in one scan.
SELECT count(*) FILTER (WHERE run_at <= now()),
    count(*) FILTER (WHERE worker IS NOT NULL AND run_at > now()),
    count(*) FILTER (WHERE run_at > now() AND worker IS NULL)
FROM {jobs} WHERE app = %s AND channel = %s

-- name: waiter_set
-- Register (or update) this instance's worker of a queue as idle or busy, with an expiry,
-- so publishers know whether a NOTIFY is needed; at the worker commit level.
WITH cfg AS (SELECT set_config('synchronous_commit', {sync_commit}, true) AS v)
INSERT INTO {waiters} (app, channel, worker, idle, expires_at)
SELECT %s, %s, %s, %s, now() + make_interval(secs => %s) FROM cfg
ON CONFLICT (app, channel, worker) DO UPDATE
SET idle = EXCLUDED.idle, expires_at = EXCLUDED.expires_at

-- name: waiter_refresh
-- Push back the expiry of all of this instance's worker registrations in one statement
-- (channels and idle states as two arrays); at the worker commit level.
WITH cfg AS (SELECT set_config('synchronous_commit', {sync_commit}, true) AS v)
INSERT INTO {waiters} (app, channel, worker, idle, expires_at)
SELECT %s, c.channel, %s, c.idle, now() + make_interval(secs => %s)
FROM unnest(%s::text[], %s::bool[]) AS c(channel, idle), cfg
ON CONFLICT (app, channel, worker) DO UPDATE SET expires_at = EXCLUDED.expires_at

-- name: waiter_delete
-- Drop a stopping worker's registration, so publishers stop notifying it.
DELETE FROM {waiters} WHERE app = %s AND channel = %s AND worker = %s

-- name: waiter_sweep
-- Delete one app's registrations that expired more than a margin (seconds) ago. A live worker
-- refreshes its row long before it expires (and writes it back at its next refresh if it was
-- deleted meanwhile), so these are the rows of killed instances: every enqueue's EXISTS
-- would scan them forever. Any live instance of the app runs this now and then; the primary
-- key's leading app column bounds the scan to the app's own registrations.
DELETE FROM {waiters} WHERE app = %s AND expires_at < now() - make_interval(secs => %s)

-- name: failed_sweep
-- Delete a batch of one app's dead letters older than its queue_failed_retention
-- (seconds), the oldest first and at most a batch of them, through the queue_failed_app_age
-- index. One app's retention,
-- for that app's dead letters only: apps sharing a schema never shorten each other's.
DELETE FROM {failed} WHERE id IN (SELECT id FROM {failed}
    WHERE app = %s AND failed_at < now() - make_interval(secs => %s) ORDER BY failed_at
    LIMIT %s)

-- name: vacuum
-- Vacuum the jobs table from the workers (autovacuum may be off or too slow for the churn of
-- claims and completions); SKIP_LOCKED lets one vacuum run while the others skip.
VACUUM (SKIP_LOCKED) {jobs}

-- name: key_publish
-- Idempotent publish (pgcoord/queue/keys.py): draw the job's id, record it under the key and
-- insert the job, all in one statement: either both rows commit or neither. Two publishes
-- racing on one key meet at the key's unique index; the second waits for the first to commit,
-- then inserts nothing (id NULL) and finds the first one's job with key_existing.
WITH nid AS (SELECT nextval(pg_get_serial_sequence({jobs_name}, 'id')) AS id),
k AS (INSERT INTO {keys} (app, channel, key, job_id)
    SELECT %(app)s, %(channel)s, %(key)s, nid.id FROM nid
    ON CONFLICT (app, channel, key) DO NOTHING RETURNING job_id),
ins AS (INSERT INTO {jobs} (id, app, channel, priority, run_at, max_retries, timeout,
        payload) SELECT k.job_id, %(app)s, %(channel)s, %(priority)s,
        now() + make_interval(secs => %(delay)s), %(max_retries)s, %(timeout)s, %(payload)s
    FROM k RETURNING id),
w AS (SELECT EXISTS (SELECT 1 FROM {waiters} AS w WHERE w.app = %(app)s
    AND w.channel = %(channel)s AND w.idle AND w.expires_at > now()) AS waiting)
SELECT ins.id, w.waiting FROM w LEFT JOIN ins ON true

-- name: key_publish_notify
-- key_publish with the wake-up NOTIFY in the same statement (it rides in the caller's
-- transaction): sent only when a job was inserted and a worker may be waiting.
WITH nid AS (SELECT nextval(pg_get_serial_sequence({jobs_name}, 'id')) AS id),
k AS (INSERT INTO {keys} (app, channel, key, job_id)
    SELECT %(app)s, %(channel)s, %(key)s, nid.id FROM nid
    ON CONFLICT (app, channel, key) DO NOTHING RETURNING job_id),
ins AS (INSERT INTO {jobs} (id, app, channel, priority, run_at, max_retries, timeout,
        payload) SELECT k.job_id, %(app)s, %(channel)s, %(priority)s,
        now() + make_interval(secs => %(delay)s), %(max_retries)s, %(timeout)s, %(payload)s
    FROM k RETURNING id),
w AS (SELECT EXISTS (SELECT 1 FROM {waiters} AS w WHERE w.app = %(app)s
    AND w.channel = %(channel)s AND w.idle AND w.expires_at > now()) AS waiting),
n AS (SELECT pg_notify(%(pg_channel)s, '') FROM w, ins WHERE w.waiting)
SELECT ins.id, w.waiting FROM w LEFT JOIN ins ON true LEFT JOIN n ON true

-- name: key_existing
-- The job an idempotency key was first used for (a fresh statement, so a fresh snapshot:
-- sees the racing publish that committed before ours gave up).
SELECT job_id FROM {keys}
WHERE app = %(app)s AND channel = %(channel)s AND key = %(key)s

-- name: key_sweep
-- Delete a batch of one app's keys older than its window. One app's window, for that app's
-- keys only: apps sharing a schema never shorten each other's promises.
DELETE FROM {keys} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {keys}
    WHERE app = %s AND created_at < now() - make_interval(secs => %s) LIMIT %s))
