"""Tables of the pub/sub and sync-message services (declared once; Alembic creates them).

``message_log`` holds three kinds of rows, all as the message's JSON envelope in ``text`` (never
``jsonb``: it refuses ``\\u0000``):

* sync messages (``durable``): every sync message is logged so that an instance whose listener was
  disconnected catches up after it reconnects; kept for ``sync_log_retention`` seconds;
* pub/sub payloads too large for NOTIFY's 8000 bytes (spilled; the NOTIFY carries the row id);
* messages published with ``transaction=`` (the transaction NOTIFYs one wake-up carrying its xid,
  receivers read its rows by ``xid``).

The table is logged (not UNLOGGED): sync messages must survive a server crash. ``xid`` is the
writing transaction's ``pg_current_xact_id()`` as ``bigint`` (an ``xid8`` always fits), used both
to find a transaction's rows and, on catch-up, to tell rows committed before a subscription began.

``commit_seq`` numbers durable rows in commit order. Revision 0002 also creates what fills it,
which SQLAlchemy metadata does not describe: the sequence ``message_log_commit_seq`` and a
deferred constraint trigger ``message_log_commit_order`` that, at COMMIT and under one
transaction-scoped advisory lock, sets ``commit_seq = nextval(...)`` on each durable row.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Identity,
    Index,
    MetaData,
    Table,
    Text,
    text,
)

TABLE = "message_log"


def define(metadata: MetaData) -> None:
    """Add this service's tables to ``metadata`` (whose ``schema`` is pgcoord's schema)."""
    Table(
        TABLE,
        metadata,
        Column("id", BigInteger, Identity(always=False), primary_key=True),
        # The Postgres channel (already namespaced by app and service); the envelope carries the
        # user's channel name.
        Column("channel", Text, nullable=False),
        Column("xid", BigInteger, nullable=False),
        Column("durable", Boolean, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
        Column("envelope", Text, nullable=False),
        # Taken at COMMIT by the deferred trigger of revision 0002 (durable rows only; NULL on
        # the others): the catch-up replays in this order, which is commit order.
        Column("commit_seq", BigInteger, nullable=True),
        Column("app", Text(collation="C"), nullable=True),
        Index("message_log_xid_idx", "xid"),
        Index("message_log_app_created_idx", "app", "created_at"),
        Index("message_log_created_idx", "created_at"),
        # Rows churn (inserted, then swept minutes later): vacuum sooner than the default.
        postgresql_with={"autovacuum_vacuum_scale_factor": "0.05"},
    )
