"""locks tables, token sequence and functions.

Revision ID: 0001_locks
Revises: None
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import pgcoord.schema

revision = "0001_locks"
down_revision = None
branch_labels = None
depends_on = None

#: Tokens are ``epoch * 2**40 + sequence value`` (see pgcoord.locks.lease.TOKEN_EPOCH_SHIFT).
_EPOCH_FACTOR = 1 << 40


def _functions(s: str) -> list[str]:
    """The server-side functions, with every object schema-qualified by ``s`` (quoted)."""
    # One function call per acquisition keeps the uncontended path at one round trip: take the
    # advisory lock, arm the lease (idle_session_timeout), issue the fencing token, record the
    # holder. The token is drawn only after the lock is granted, so it orders holders.
    new_epoch = f"""
CREATE FUNCTION {s}.lock_new_epoch() RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    v_epoch bigint;
BEGIN
    -- The new epoch must be on disk before any token uses it, whatever the session's setting.
    PERFORM set_config('synchronous_commit', 'on', true);
    LOCK TABLE {s}.lock_epoch_live IN EXCLUSIVE MODE;
    SELECT epoch INTO v_epoch FROM {s}.lock_epoch_live WHERE id = 1;
    IF v_epoch IS NULL THEN
        UPDATE {s}.lock_epochs SET epoch = epoch + 1 WHERE id = 1 RETURNING epoch INTO v_epoch;
        INSERT INTO {s}.lock_epoch_live (id, epoch) VALUES (1, v_epoch);
    END IF;
    RETURN v_epoch;
END
$fn$"""
    acquire = f"""
CREATE FUNCTION {s}.lock_acquire(
    p_key bigint, p_wait_ms integer, p_ttl_ms integer, p_name text,
    OUT token bigint, OUT waited double precision
) LANGUAGE plpgsql AS $fn$
DECLARE
    v_epoch bigint;
BEGIN
    -- p_wait_ms: -1 waits as long as it takes, 0 only tries, > 0 waits at most that long.
    IF p_wait_ms = 0 THEN
        IF NOT pg_try_advisory_lock(p_key) THEN
            RETURN;  -- token NULL: not had
        END IF;
    ELSE
        IF p_wait_ms > 0 THEN
            PERFORM set_config('lock_timeout', CAST(p_wait_ms AS text), true);
        END IF;
        PERFORM pg_advisory_lock(p_key);
    END IF;
    -- The lease: the server ends this session (freeing the lock) once it idles p_ttl_ms.
    PERFORM set_config('idle_session_timeout', CAST(p_ttl_ms AS text), false);
    SELECT epoch INTO v_epoch FROM {s}.lock_epoch_live WHERE id = 1;
    IF v_epoch IS NULL THEN
        v_epoch := {s}.lock_new_epoch();
    END IF;
    token := v_epoch * {_EPOCH_FACTOR} + nextval('{s}.lock_token_seq');
    -- How long this statement ran until the lock was granted: the lease starts when the
    -- statement ends, so the client counts its deadline from (sent + waited), never earlier.
    waited := date_part('epoch', clock_timestamp() - statement_timestamp());
    -- Which key, instance and lease this session serves: written only when that changed
    -- since its last acquisition (the client passes p_name NULL otherwise), so re-taking a
    -- hot key writes nothing. App and instance are this session's settings.
    IF p_name IS NOT NULL THEN
        INSERT INTO {s}.lock_holders AS h (pid, lock_key, app, name, instance_id, ttl_ms, since)
        VALUES (pg_backend_pid(), p_key, current_setting('pgcoord.app'), p_name,
                current_setting('pgcoord.instance_id'), p_ttl_ms, NULL)
        ON CONFLICT (pid) DO UPDATE SET
            lock_key = excluded.lock_key, app = excluded.app, name = excluded.name,
            instance_id = excluded.instance_id, ttl_ms = excluded.ttl_ms, since = NULL;
    END IF;
END
$fn$"""
    extend = f"""
CREATE FUNCTION {s}.lock_extend(p_ttl_ms integer, p_held_for double precision)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    -- Any statement restarts the idle timer; this one also sets the new lease length.
    PERFORM set_config('idle_session_timeout', CAST(p_ttl_ms AS text), false);
    -- Until now holders() took the start of the holding from the session's state_change
    -- (the end of the acquiring statement); this statement moves that, so record the start.
    UPDATE {s}.lock_holders
    SET ttl_ms = p_ttl_ms,
        since = COALESCE(since, clock_timestamp() - make_interval(secs => p_held_for))
    WHERE pid = pg_backend_pid();
END
$fn$"""
    return [new_epoch, acquire, extend]


def upgrade() -> None:
    """Create the epoch tables, the holders table, the token sequence and the lock functions."""
    schema = pgcoord.schema.migration_schema()
    op.create_table(
        "lock_epochs",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name="lock_epochs_one_row"),
        sa.PrimaryKeyConstraint("id"),
        schema=schema,
    )
    op.create_table(
        "lock_epoch_live",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name="lock_epoch_live_one_row"),
        sa.PrimaryKeyConstraint("id"),
        prefixes=["UNLOGGED"],
        schema=schema,
    )
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
    s = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"INSERT INTO {s}.lock_epochs (id, epoch) VALUES (1, 0)")
    # UNLOGGED: no WAL per token; crash recovery resets it, and the epoch covers that.
    op.execute(f"CREATE UNLOGGED SEQUENCE {s}.lock_token_seq")
    for statement in _functions(s):
        op.execute(statement)


def downgrade() -> None:
    """Drop everything :func:`upgrade` created."""
    schema = pgcoord.schema.migration_schema()
    s = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP FUNCTION {s}.lock_extend(integer, double precision)")
    op.execute(f"DROP FUNCTION {s}.lock_acquire(bigint, integer, integer, text)")
    op.execute(f"DROP FUNCTION {s}.lock_new_epoch()")
    op.execute(f"DROP SEQUENCE {s}.lock_token_seq")
    op.drop_table("lock_holders", schema=schema)
    op.drop_table("lock_epoch_live", schema=schema)
    op.drop_table("lock_epochs", schema=schema)
