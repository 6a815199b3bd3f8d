"""The queue's SQL, composed once per schema with ``psycopg.sql`` (never string formatting).

Every statement that finishes a try (complete, retry, fail, release, renew) names the job by
``(id, attempt)``: ``attempt`` grows by one at every claim, so a worker whose lease ran out and
whose job was claimed again cannot touch it any more (fencing).
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from pgcoord.errors import InvalidInputError, InvalidTypeError
from pgcoord.schema.queue import FAILED, JOBS, WAITERS

_JOB_COLUMNS = "id, attempt, retried, max_retries, timeout, priority, payload, attempt_base"

#: The ``synchronous_commit`` levels the worker-side writes accept (``queue_synchronous_commit``).
SYNCHRONOUS_COMMIT_LEVELS = ("on", "off", "local", "remote_write", "remote_apply")

# Worker-side writes (claim, complete, retry, fail, release, renew, waiter rows) commit at the
# queue_synchronous_commit level: set_config(..., true) lasts only for the statement's own
# transaction. The default, off, does not wait for the WAL flush: losing such a write in a
# crash or a failover only makes a job run again, which at-least-once allows, and the enqueue
# itself stays fully durable. It takes a claim or completion from ~0.3 ms of fsync wait to
# ~0.07 ms and lets commits overlap; "on" with a synchronous standby makes a finished job stay
# finished through a failover (docs/operations.md, "Failover").
_WORKER_COMMIT = "cfg AS (SELECT set_config('synchronous_commit', {sync_commit}, true) AS v)"


@dataclass(frozen=True)
class Queries:
    """Every statement of the queue for one schema."""

    publish: sql.Composed
    publish_notify: sql.Composed
    publish_many: sql.Composed
    publish_many_notify: sql.Composed
    notify: sql.SQL
    claim: sql.Composed
    complete: sql.Composed
    retry: sql.Composed
    fail: sql.Composed
    release: sql.Composed
    renew: sql.Composed
    list_failed: sql.Composed
    retry_failed: sql.Composed
    purge_failed: sql.Composed
    counts: sql.Composed
    waiter_set: sql.Composed
    waiter_refresh: sql.Composed
    waiter_delete: sql.Composed


def check_synchronous_commit(value: object, what: str = "queue_synchronous_commit") -> str:
    """Validate a ``synchronous_commit`` level: one of :data:`SYNCHRONOUS_COMMIT_LEVELS`."""
    if not isinstance(value, str):
        raise InvalidTypeError(f"{what} must be a str, not {type(value).__name__}")
    if value not in SYNCHRONOUS_COMMIT_LEVELS:
        raise InvalidInputError(
            f"{what} must be one of {', '.join(map(repr, SYNCHRONOUS_COMMIT_LEVELS))} "
            f"(PostgreSQL's synchronous_commit levels); got {value!r}"
        )
    return value


def build(schema: str, *, synchronous_commit: str = "off") -> Queries:
    """Compose the queue's statements for tables in ``schema``; the worker-side writes commit
    at the ``synchronous_commit`` level (validated with :func:`check_synchronous_commit`)."""
    jobs = sql.Identifier(schema, JOBS)
    failed = sql.Identifier(schema, FAILED)
    waiters = sql.Identifier(schema, WAITERS)
    # A literal from a closed list, not a parameter: each statement keeps one fixed text.
    level = sql.Literal(check_synchronous_commit(synchronous_commit))

    def q(text: str) -> sql.Composed:
        return sql.SQL(text).format(jobs=jobs, failed=failed, waiters=waiters, sync_commit=level)

    # Is some worker of this queue possibly asleep, waiting for a NOTIFY? An uncorrelated
    # subquery: evaluated once per statement, one primary-key range probe.
    waiting = (
        "EXISTS (SELECT 1 FROM {waiters} AS w WHERE w.app = %(app)s AND w.channel = %(channel)s "
        "AND w.idle AND w.expires_at > now())"
    )
    insert_one = (
        "INSERT INTO {jobs} (app, channel, priority, run_at, max_retries, timeout, payload) "
        "VALUES (%(app)s, %(channel)s, %(priority)s, now() + make_interval(secs => %(delay)s), "
        "%(max_retries)s, %(timeout)s, %(payload)s) RETURNING id"
    )
    insert_many = (
        "INSERT INTO {jobs} (app, channel, priority, run_at, max_retries, timeout, payload) "
        "SELECT %(app)s, %(channel)s, %(priority)s, now() + make_interval(secs => %(delay)s), "
        "%(max_retries)s, %(timeout)s, p FROM unnest(%(payloads)s::text[]) AS p RETURNING id"
    )
    plain = "{insert}, " + waiting
    # pg_notify sits in a CTE, so it runs at most once per statement however many rows, and
    # only when a worker may be waiting (else the transaction takes no NOTIFY lock at all).
    with_notify = (
        "WITH ins AS ({insert}), w AS (SELECT " + waiting + " AS waiting), "
        "n AS (SELECT pg_notify(%(pg_channel)s, '') FROM w WHERE w.waiting) "
        "SELECT ins.id, w.waiting FROM ins CROSS JOIN w LEFT JOIN n ON true"
    )
    # Claimable means run_at <= now(): new, delayed-and-due, retry-due, or lease expired (a
    # dead or frozen worker's job comes back through this very query; no sweeper needed).
    # A claim that comes back short also says, in the same round trip, in how many seconds
    # the next job of the queue may become claimable, so an idle worker sleeps exactly that
    # long instead of polling (docs/queue.md, "Waking up"). That is the earliest of:
    # - a future run_at (delayed job, retry after backoff, another worker's lease end) of a
    #   job not leased by this worker (ours are renewed while they run);
    # - now() + lease when a claimable row was skipped because it is locked: another worker
    #   is claiming it right now, and its lease will end about then if that worker dies.
    # Computed per distinct priority (a loose index scan: two probes each), because the one
    # claim index leads with priority; a full claim skips it altogether (more work is
    # waiting, the worker claims again at once).
    claim = (
        f"WITH RECURSIVE {_WORKER_COMMIT}, c AS (SELECT id FROM {{jobs}} "
        "WHERE app = %(app)s AND channel = %(channel)s AND run_at <= now() "
        "ORDER BY priority DESC, run_at, id LIMIT %(n)s FOR UPDATE SKIP LOCKED), "
        "u AS (UPDATE {jobs} AS j SET run_at = now() + make_interval(secs => %(lease)s), "
        "attempt = j.attempt + 1, worker = %(me)s FROM c, cfg WHERE j.id = c.id "
        f"RETURNING j.{_JOB_COLUMNS.replace(', ', ', j.')}), "
        "pr(p) AS ((SELECT priority FROM {jobs} WHERE app = %(app)s AND channel = %(channel)s "
        "AND (SELECT count(*) FROM c) < %(n)s ORDER BY priority DESC LIMIT 1) "
        "UNION ALL SELECT (SELECT priority FROM {jobs} WHERE app = %(app)s "
        "AND channel = %(channel)s AND priority < pr.p ORDER BY priority DESC LIMIT 1) "
        "FROM pr WHERE pr.p IS NOT NULL), "
        "nx AS (SELECT extract(epoch FROM min(LEAST("
        "(SELECT f.run_at FROM {jobs} AS f WHERE f.app = %(app)s AND f.channel = %(channel)s "
        "AND f.priority = pr.p AND f.run_at > now() AND f.worker IS DISTINCT FROM %(me)s "
        "ORDER BY f.run_at LIMIT 1), "
        "CASE WHEN EXISTS (SELECT 1 FROM {jobs} AS k WHERE k.app = %(app)s "
        "AND k.channel = %(channel)s AND k.priority = pr.p AND k.run_at <= now() "
        "AND k.id NOT IN (SELECT id FROM c)) "
        "THEN now() + make_interval(secs => %(lease)s) END)) - now())::float8 AS due "
        "FROM pr WHERE pr.p IS NOT NULL) "
        "SELECT u.*, nx.due FROM nx LEFT JOIN u ON true"
    )
    fenced = "unnest(%s::bigint[], %s::int[]) AS d(id, attempt)"
    return Queries(
        publish=q(plain.replace("{insert}", insert_one)),
        publish_notify=q(with_notify.replace("{insert}", insert_one)),
        publish_many=q(plain.replace("{insert}", insert_many)),
        publish_many_notify=q(with_notify.replace("{insert}", insert_many)),
        notify=sql.SQL("SELECT pg_notify(%s, '')"),
        claim=q(claim),
        complete=q(
            f"WITH {_WORKER_COMMIT} DELETE FROM {{jobs}} AS j USING {fenced}, cfg "
            "WHERE j.id = d.id AND j.attempt = d.attempt"
        ),
        retry=q(
            f"WITH {_WORKER_COMMIT} "
            "UPDATE {jobs} AS j SET run_at = now() + make_interval(secs => d.delay), "
            "retried = j.retried + 1, worker = NULL "
            "FROM unnest(%s::bigint[], %s::int[], %s::float8[]) AS d(id, attempt, delay), cfg "
            "WHERE j.id = d.id AND j.attempt = d.attempt"
        ),
        fail=q(
            f"WITH {_WORKER_COMMIT}, "
            "d AS (SELECT * FROM unnest(%s::bigint[], %s::int[], %s::text[], %s::text[]) "
            "AS d(id, attempt, error, tb)), "
            "moved AS (DELETE FROM {jobs} AS j USING d WHERE j.id = d.id AND j.attempt = d.attempt "
            "RETURNING j.id, j.app, j.channel, j.priority, j.attempt, j.retried, j.max_retries, "
            "j.timeout, j.created_at, j.payload) "
            "INSERT INTO {failed} (id, app, channel, priority, attempt, retried, max_retries, "
            "timeout, created_at, error, traceback, payload) "
            "SELECT m.id, m.app, m.channel, m.priority, m.attempt, m.retried, m.max_retries, "
            "m.timeout, m.created_at, d.error, d.tb, m.payload "
            "FROM moved AS m JOIN d ON d.id = m.id, cfg "
            "ON CONFLICT (id) DO UPDATE SET error = EXCLUDED.error, traceback = EXCLUDED.traceback, "
            "attempt = EXCLUDED.attempt, retried = EXCLUDED.retried, failed_at = now(), "
            "payload = EXCLUDED.payload"
        ),
        # Graceful stop: back to the queue at once, without counting a failed try.
        release=q(
            f"WITH {_WORKER_COMMIT} "
            f"UPDATE {{jobs}} AS j SET run_at = now(), worker = NULL FROM {fenced}, cfg "
            "WHERE j.id = d.id AND j.attempt = d.attempt"
        ),
        renew=q(
            f"WITH {_WORKER_COMMIT} "
            "UPDATE {jobs} AS j SET run_at = now() + make_interval(secs => %s) "
            f"FROM {fenced}, cfg WHERE j.id = d.id AND j.attempt = d.attempt RETURNING j.id"
        ),
        list_failed=q(
            "SELECT id, channel, payload, error, traceback, retried, max_retries, priority, "
            "timeout, created_at, failed_at FROM {failed} "
            "WHERE app = %(app)s AND (%(channel)s::text IS NULL OR channel = %(channel)s) "
            "AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) "
            "ORDER BY failed_at, id LIMIT %(limit)s"
        ),
        # A retried dead letter keeps its id and starts over with a fresh retry budget. Its
        # `attempt` goes on from where it failed, so no (id, attempt) fencing token is ever
        # handed out twice: a frozen worker of an earlier life cannot finish the new one.
        retry_failed=q(
            "WITH moved AS (DELETE FROM {failed} WHERE app = %(app)s "
            "AND (%(channel)s::text IS NULL OR channel = %(channel)s) "
            "AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) "
            "RETURNING id, app, channel, priority, attempt, max_retries, timeout, created_at, "
            "payload) "
            "INSERT INTO {jobs} (id, app, channel, priority, run_at, attempt, attempt_base, "
            "max_retries, timeout, created_at, payload) "
            "SELECT id, app, channel, priority, now(), attempt, attempt, max_retries, timeout, "
            "created_at, payload FROM moved RETURNING id, channel"
        ),
        purge_failed=q(
            "DELETE FROM {failed} WHERE app = %(app)s "
            "AND (%(channel)s::text IS NULL OR channel = %(channel)s) "
            "AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) "
            "AND (%(older)s::float8 IS NULL OR failed_at < now() - make_interval(secs => %(older)s)) "
            "RETURNING id"
        ),
        counts=q(
            "SELECT count(*) FILTER (WHERE run_at <= now()), "
            "count(*) FILTER (WHERE worker IS NOT NULL AND run_at > now()), "
            "count(*) FILTER (WHERE run_at > now() AND worker IS NULL) "
            "FROM {jobs} WHERE app = %s AND channel = %s"
        ),
        waiter_set=q(
            f"WITH {_WORKER_COMMIT} "
            "INSERT INTO {waiters} (app, channel, worker, idle, expires_at) "
            "SELECT %s, %s, %s, %s, now() + make_interval(secs => %s) FROM cfg "
            "ON CONFLICT (app, channel, worker) DO UPDATE "
            "SET idle = EXCLUDED.idle, expires_at = EXCLUDED.expires_at"
        ),
        waiter_refresh=q(
            f"WITH {_WORKER_COMMIT} "
            "INSERT INTO {waiters} (app, channel, worker, idle, expires_at) "
            "SELECT %s, c.channel, %s, c.idle, now() + make_interval(secs => %s) "
            "FROM unnest(%s::text[], %s::bool[]) AS c(channel, idle), cfg "
            "ON CONFLICT (app, channel, worker) DO UPDATE SET expires_at = EXCLUDED.expires_at"
        ),
        waiter_delete=q("DELETE FROM {waiters} WHERE app = %s AND channel = %s AND worker = %s"),
    )
