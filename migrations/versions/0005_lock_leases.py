"""locks: lease rows, so a held lock costs no connection.

Revision ID: 0005_lock_leases
Revises: 0004_cache

A lock is first held as a session advisory lock on a borrowed work connection (the cheap,
read-only path); a hold that lasts past a few tens of milliseconds is *promoted* to a row of the
UNLOGGED table ``lock_leases`` and the connection goes back to the pool. The row names its
holder by the holding process's LISTEN session (backend pid + start), so a dead holder is
replaced at once, and its lease ends at ``expires_at`` on the server's clock. Waiters never
block on the server: they mark the row ``wanted`` and a release that finds it marked sends one
NOTIFY. ``lock_holders`` and the functions of the connection-per-lock design are dropped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

import pgcoord.schema

revision = "0005_lock_leases"
down_revision = "0004_cache"
branch_labels = None
depends_on = None

#: Tokens are ``epoch * 2**40 + sequence value`` (see pgcoord.locks.lease.TOKEN_EPOCH_SHIFT).
_EPOCH_FACTOR = 1 << 40


def _functions(s: str) -> list[str]:
    """The server-side functions, with every object schema-qualified by ``s`` (quoted).

    They are plpgsql on purpose: in READ COMMITTED every statement of a volatile function takes
    a fresh snapshot, so a check made right after taking (or dropping) the advisory lock sees
    every row committed before that moment. A single SQL statement would read a snapshot taken
    before the lock was taken, and miss a lease promoted just before.
    """
    alive = f"""
CREATE FUNCTION {s}.lock_alive(p_pid integer, p_start timestamptz) RETURNS boolean
LANGUAGE sql STABLE AS $fn$
    -- The holder is the process whose LISTEN session is (pid, backend_start). backend_start is
    -- hidden from roles without pg_read_all_stats for other roles' sessions: then the pid alone.
    SELECT p_pid IS NOT NULL AND EXISTS (
        SELECT 1 FROM pg_stat_get_activity(p_pid) a
        WHERE a.backend_start IS NULL OR a.backend_start = p_start)
$fn$"""
    live = f"""
CREATE FUNCTION {s}.lock_live(p_key bigint, OUT live boolean, OUT expires_in double precision)
LANGUAGE plpgsql AS $fn$
DECLARE
    v record;
BEGIN
    -- Whether a live holder's lease row holds p_key, and how long its lease has left (NULL:
    -- no lease). A plain lookup first, liveness only for a row found: a single query joining
    -- pg_stat_get_activity costs more to plan than the raw advisory lock takes to run.
    SELECT l.holder_pid, l.holder_start, l.expires_at INTO v
    FROM {s}.lock_leases l WHERE l.lock_key = p_key AND l.holder_pid IS NOT NULL;
    live := FOUND AND (v.expires_at IS NULL OR v.expires_at > clock_timestamp())
            AND {s}.lock_alive(v.holder_pid, v.holder_start);
    IF live THEN
        expires_in := date_part('epoch', v.expires_at - clock_timestamp());
    END IF;
END
$fn$"""
    try_ = f"""
CREATE FUNCTION {s}.lock_try(
    p_key bigint, p_ttl_ms integer, p_want boolean,
    OUT token bigint, OUT expires_in double precision, OUT newly_wanted boolean
) LANGUAGE plpgsql AS $fn$
DECLARE
    v_epoch bigint;
    v_live boolean;
BEGIN
    newly_wanted := false;
    IF pg_try_advisory_lock(p_key) THEN
        SELECT l.live, l.expires_in INTO v_live, expires_in FROM {s}.lock_live(p_key) l;
        IF NOT v_live THEN
            -- Held on this session. The lease: the server ends the session (which frees the
            -- lock) once it idles p_ttl_ms; the client promotes or releases long before.
            PERFORM set_config('idle_session_timeout', CAST(p_ttl_ms AS text), false);
            SELECT epoch INTO v_epoch FROM {s}.lock_epoch_live WHERE id = 1;
            IF v_epoch IS NULL THEN
                v_epoch := {s}.lock_new_epoch();
            END IF;
            token := v_epoch * {_EPOCH_FACTOR} + nextval('{s}.lock_token_seq');
            expires_in := NULL;
            RETURN;
        END IF;
        -- A promoted lease holds it: let go of the advisory lock again.
        PERFORM pg_advisory_unlock(p_key);
    END IF;
    IF p_want THEN
        -- Ask the holder's release to wake us. A release that ran between our try and this
        -- commit cannot have seen the mark, so the client tries once more when newly_wanted.
        INSERT INTO {s}.lock_leases AS l (lock_key, wanted) VALUES (p_key, true)
        ON CONFLICT (lock_key) DO UPDATE SET wanted = true WHERE NOT l.wanted;
        newly_wanted := FOUND;
    END IF;
END
$fn$"""
    promote = f"""
CREATE FUNCTION {s}.lock_promote(
    p_key bigint, p_token bigint, p_app text, p_name text, p_instance text,
    p_pid integer, p_start timestamptz, p_ttl_ms integer, p_left_ms integer,
    p_held_for double precision
) RETURNS boolean LANGUAGE plpgsql AS $fn$
BEGIN
    -- A lease naming a LISTEN session that is already gone would be free for anyone at once.
    IF NOT {s}.lock_alive(p_pid, p_start) THEN
        RETURN false;
    END IF;
    INSERT INTO {s}.lock_leases AS l (lock_key, app, name, instance_id, holder_pid,
        holder_start, token, ttl_ms, since, expires_at, wanted)
    VALUES (p_key, p_app, p_name, p_instance, p_pid, p_start, p_token, p_ttl_ms,
        clock_timestamp() - make_interval(secs => p_held_for),
        clock_timestamp() + make_interval(secs => p_left_ms / 1000.0), false)
    ON CONFLICT (lock_key) DO UPDATE SET
        app = excluded.app, name = excluded.name, instance_id = excluded.instance_id,
        holder_pid = excluded.holder_pid, holder_start = excluded.holder_start,
        token = excluded.token, ttl_ms = excluded.ttl_ms, since = excluded.since,
        expires_at = excluded.expires_at;  -- a waiter's mark stays
    RETURN true;
END
$fn$"""
    release = f"""
CREATE FUNCTION {s}.lock_release(p_key bigint, p_token bigint, p_channel text)
RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
    v_wanted boolean;
BEGIN
    DELETE FROM {s}.lock_leases WHERE lock_key = p_key AND token = p_token
    RETURNING wanted INTO v_wanted;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF v_wanted THEN
        PERFORM pg_notify(p_channel, '');
    END IF;
    RETURN true;
END
$fn$"""
    xact = f"""
CREATE FUNCTION {s}.lock_xact(p_key bigint) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    v_pause double precision := 0.001;
BEGIN
    -- A transaction with one snapshot cannot see a lease row promoted after it began, so it
    -- could be granted beside a holder: refuse it (a retryable error) before taking anything.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgcoord xact_lock needs a READ COMMITTED transaction (it must see session locks promoted after the transaction began); this one is %', current_setting('transaction_isolation')
            USING ERRCODE = 'serialization_failure';
    END IF;
    -- Excludes other xact locks and session locks still on their advisory lock ...
    PERFORM pg_advisory_xact_lock(p_key);
    -- ... then waits out a promoted lease (new session locks cannot start meanwhile: their
    -- advisory try fails). pg_stat_clear_snapshot: the holder's liveness is otherwise read
    -- from the backend list as it was at the first look, and a dead holder would seem alive.
    LOOP
        PERFORM pg_stat_clear_snapshot();
        EXIT WHEN NOT ({s}.lock_live(p_key)).live;
        PERFORM pg_sleep(v_pause);
        v_pause := least(v_pause * 2, 0.05);
    END LOOP;
END
$fn$"""
    free = f"""
CREATE FUNCTION {s}.lock_free(p_key bigint) RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
    v record;
BEGIN
    -- The hot acquisition's check (the caller's statement draws the token when this is true).
    -- Queries kept trivial to plan: this runs as often as the raw advisory lock does.
    IF NOT pg_try_advisory_lock(p_key) THEN
        RETURN false;
    END IF;
    SELECT l.holder_pid, l.holder_start, l.expires_at INTO v
    FROM {s}.lock_leases l WHERE l.lock_key = p_key AND l.holder_pid IS NOT NULL;
    IF FOUND AND (v.expires_at IS NULL OR v.expires_at > clock_timestamp())
       AND {s}.lock_alive(v.holder_pid, v.holder_start) THEN
        PERFORM pg_advisory_unlock(p_key);
        RETURN false;
    END IF;
    RETURN true;
END
$fn$"""
    wake = f"""
CREATE FUNCTION {s}.lock_wake(p_key bigint, p_channel text) RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    v_wanted boolean;
BEGIN
    -- Called after the advisory unlock, so this statement's fresh snapshot sees a waiter's
    -- mark committed before the unlock; a waiter marking after it finds the lock free on the
    -- second try it makes after a new mark.
    DELETE FROM {s}.lock_leases WHERE lock_key = p_key AND holder_pid IS NULL
    RETURNING wanted INTO v_wanted;
    IF v_wanted THEN
        PERFORM pg_notify(p_channel, '');
    END IF;
    RETURN COALESCE(v_wanted, false);
END
$fn$"""
    return [alive, live, free, wake, try_, promote, release, xact]


_DROPS = [
    "DROP FUNCTION {s}.lock_xact(bigint)",
    "DROP FUNCTION {s}.lock_release(bigint, bigint, text)",
    "DROP FUNCTION {s}.lock_promote(bigint, bigint, text, text, text, integer, timestamptz,"
    " integer, integer, double precision)",
    "DROP FUNCTION {s}.lock_wake(bigint, text)",
    "DROP FUNCTION {s}.lock_free(bigint)",
    "DROP FUNCTION {s}.lock_try(bigint, integer, boolean)",
    "DROP FUNCTION {s}.lock_live(bigint)",
    "DROP FUNCTION {s}.lock_alive(integer, timestamptz)",
]


def upgrade() -> None:
    """Create ``lock_leases`` and the lease functions; drop the connection-per-lock objects."""
    schema = pgcoord.schema.migration_schema()
    s = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP FUNCTION {s}.lock_extend(integer, double precision)")
    op.execute(f"DROP FUNCTION {s}.lock_acquire(bigint, integer, integer, text)")
    op.drop_table("lock_holders", schema=schema)
    op.create_table(
        "lock_leases",
        sa.Column("lock_key", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("app", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("instance_id", sa.Text(), nullable=True),
        sa.Column("holder_pid", sa.Integer(), nullable=True),
        sa.Column("holder_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("token", sa.BigInteger(), nullable=True),
        sa.Column("ttl_ms", sa.Integer(), nullable=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("wanted", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("lock_key"),
        prefixes=["UNLOGGED"],
        schema=schema,
    )
    for statement in _functions(s):
        op.execute(statement)


def downgrade() -> None:
    """Back to the connection-per-lock objects of 0001."""
    schema = pgcoord.schema.migration_schema()
    s = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    for statement in _DROPS:
        op.execute(statement.format(s=s))
    op.drop_table("lock_leases", schema=schema)
    op.create_table(
        "lock_holders",
        sa.Column("pid", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("lock_key", sa.BigInteger(), nullable=False),
        sa.Column("app", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("instance_id", sa.Text(), nullable=False),
        sa.Column("ttl_ms", sa.Integer(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("pid"),
        prefixes=["UNLOGGED"],
        schema=schema,
    )
    path = Path(__file__).with_name("0001_locks.py")
    spec = importlib.util.spec_from_file_location("pgcoord_migration_0001", path)
    assert spec is not None and spec.loader is not None
    first = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(first)
    # 0001 creates lock_new_epoch too, which this revision kept: recreate only the other two.
    for statement in first._functions(s)[1:]:
        op.execute(statement)
