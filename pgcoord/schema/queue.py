"""Tables of the event queue (declared here once; the Alembic revision creates them).

``queue_jobs`` is the hot table: a job lives in it from enqueue until it completes or fails for
good, so it stays as small as the backlog. One column, ``run_at``, says when a job may next be
claimed: the enqueue time plus ``delay``, the retry time after a failure, or, while a worker
holds the job, the end of that worker's lease. A job is claimable exactly when
``run_at <= now()``, so one index serves claims, delays, retries and the rescue of jobs whose
worker died (their lease simply runs out), and no sweeper is needed.

``queue_failed`` holds dead letters: jobs whose last try failed, with the error and traceback;
kept until purged, or for ``queue_failed_retention`` seconds when an app sets one.

``queue_keys`` remembers, for ``queue_idempotency_window``, the job each ``idempotency_key`` of a
publish created, so a publish retried after an ambiguous failure returns that job instead of
creating a second one (logged: it must survive a crash like the jobs it guards).

``queue_waiters`` has one row per subscribed worker saying whether it may be asleep waiting for
a NOTIFY (``idle``); producers read it inside their INSERT and skip the wake-up NOTIFY when
every worker of the queue is busy claiming anyway. Rows of killed instances expire and are
deleted by the live instances of their app.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    text,
)

JOBS = "queue_jobs"
FAILED = "queue_failed"
WAITERS = "queue_waiters"
KEYS = "queue_keys"

#: Storage parameters of the hot table. Every job is inserted, updated (claim) and deleted, so
#: dead tuples pile up fast: vacuum after ~1,000 of them regardless of table size, without
#: cost-based throttling, so index scans for claims never wade through a long dead prefix.
#: fillfactor leaves room on each page for the claim's new row version.
JOBS_STORAGE = {
    "fillfactor": "70",
    "autovacuum_vacuum_scale_factor": "0.0",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_vacuum_insert_scale_factor": "0.0",
    "autovacuum_vacuum_insert_threshold": "10000",
    "autovacuum_analyze_scale_factor": "0.0",
    "autovacuum_analyze_threshold": "5000",
    "autovacuum_vacuum_cost_delay": "0",
}


def define(metadata: MetaData) -> None:
    """Add this service's tables to ``metadata`` (whose ``schema`` is pgcoord's schema)."""
    jobs = Table(
        JOBS,
        metadata,
        Column("id", BigInteger, Identity(always=False), primary_key=True),
        Column("app", Text(collation="C"), nullable=False),
        Column("channel", Text(collation="C"), nullable=False),
        Column("priority", Integer, nullable=False, server_default=text("0")),
        # Claimable when run_at <= now(); while claimed it is the lease's end.
        Column("run_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        # Fencing token: +1 on every claim; completion/failure must present the current one.
        Column("attempt", Integer, nullable=False, server_default=text("0")),
        Column("retried", Integer, nullable=False, server_default=text("0")),
        # `attempt` when the job last came back from the dead letters (0 if never): the claims
        # before it do not count as interruptions of this life (see queue_max_interruptions).
        Column("attempt_base", Integer, nullable=False, server_default=text("0")),
        Column("max_retries", Integer, nullable=False, server_default=text("0")),
        Column("timeout", Float(precision=53), nullable=False),
        Column("worker", Text, nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("payload", Text, nullable=False),
        postgresql_with=JOBS_STORAGE,
    )
    Index(
        "queue_jobs_claim",
        jobs.c.app,
        jobs.c.channel,
        jobs.c.priority.desc(),
        jobs.c.run_at,
        jobs.c.id,
    )
    failed = Table(
        FAILED,
        metadata,
        Column("id", BigInteger, primary_key=True, autoincrement=False),
        Column("app", Text(collation="C"), nullable=False),
        Column("channel", Text(collation="C"), nullable=False),
        Column("priority", Integer, nullable=False),
        # The fencing token at failure, restored on retry: (id, attempt) never repeats.
        Column("attempt", Integer, nullable=False),
        Column("retried", Integer, nullable=False),
        Column("max_retries", Integer, nullable=False),
        Column("timeout", Float(precision=53), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("failed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("error", Text, nullable=False),
        Column("traceback", Text, nullable=False),
        Column("payload", Text, nullable=False),
    )
    Index("queue_failed_app_channel", failed.c.app, failed.c.channel, failed.c.failed_at)
    # Each app's retention sweep (queue_failed_retention): its oldest dead letters first.
    Index("queue_failed_app_age", failed.c.app, failed.c.failed_at)
    Table(
        WAITERS,
        metadata,
        Column("app", Text(collation="C"), primary_key=True),
        Column("channel", Text(collation="C"), primary_key=True),
        Column("worker", Text(collation="C"), primary_key=True),
        Column("idle", Boolean, nullable=False),
        # A dead worker's row stops counting once this passes (refreshed every lease/3).
        Column("expires_at", DateTime(timezone=True), nullable=False),
    )
    keys = Table(
        KEYS,
        metadata,
        Column("app", Text(collation="C"), primary_key=True),
        Column("channel", Text(collation="C"), primary_key=True),
        Column("key", Text(collation="C"), primary_key=True),
        Column("job_id", BigInteger, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )
    Index("queue_keys_created", keys.c.app, keys.c.created_at)
