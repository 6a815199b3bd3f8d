"""messages tables.

Revision ID: 0002_messages
Revises: 0001_locks
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import pgcoord.schema
from pgcoord.names import advisory_key

revision = "0002_messages"
down_revision = "0001_locks"
branch_labels = None
depends_on = None


def _literal(value: str) -> str:
    # A SQL string literal; only ever applied to names built from the validated schema.
    return "'" + value.replace("'", "''") + "'"


def _commit_order(schema: str) -> list[str]:
    """DDL giving every durable ``message_log`` row a ``commit_seq`` taken at COMMIT.

    The trigger is deferred, so it runs while its transaction commits; it takes one
    transaction-scoped advisory lock (a single key, so transactions logging on several channels
    never deadlock) that is released only after the commit is durable and visible. The next
    logging transaction therefore draws its number strictly after the previous one committed:
    ``commit_seq`` order is commit order. The sequence keeps the default CACHE 1: per-session
    caches would hand out numbers out of call order.
    """
    s = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    # app "" never collides with a Coordinator's keys: app names are non-empty.
    key = advisory_key(schema, "", "pubsub", "commit-order")
    seq = _literal(f"{s}.message_log_commit_seq")
    return [
        f"CREATE SEQUENCE {s}.message_log_commit_seq OWNED BY {s}.message_log.commit_seq",
        f"""CREATE FUNCTION {s}.message_log_commit_order() RETURNS trigger
LANGUAGE plpgsql AS $body$
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock({key});
    UPDATE {s}.message_log SET commit_seq = pg_catalog.nextval({seq}::regclass)
        WHERE id = NEW.id;
    RETURN NULL;
END
$body$""",
        f"CREATE CONSTRAINT TRIGGER message_log_commit_order AFTER INSERT ON {s}.message_log"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.durable)"
        f" EXECUTE FUNCTION {s}.message_log_commit_order()",
    ]


def upgrade() -> None:
    """Create ``message_log`` (sync-message log, spilled and transactional payloads)."""
    schema = pgcoord.schema.migration_schema()
    op.create_table(
        "message_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("xid", sa.BigInteger(), nullable=False),
        sa.Column("durable", sa.Boolean(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("commit_seq", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        postgresql_with={"autovacuum_vacuum_scale_factor": "0.05"},
        schema=schema,
    )
    op.create_index("message_log_xid_idx", "message_log", ["xid"], schema=schema)
    op.create_index("message_log_created_idx", "message_log", ["created_at"], schema=schema)
    for statement in _commit_order(schema):
        op.execute(statement)


def downgrade() -> None:
    """Drop everything :func:`upgrade` created."""
    schema = pgcoord.schema.migration_schema()
    s = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP TRIGGER message_log_commit_order ON {s}.message_log")
    op.execute(f"DROP FUNCTION {s}.message_log_commit_order()")
    op.execute(f"DROP SEQUENCE {s}.message_log_commit_seq")
    op.drop_index("message_log_created_idx", table_name="message_log", schema=schema)
    op.drop_index("message_log_xid_idx", table_name="message_log", schema=schema)
    op.drop_table("message_log", schema=schema)
