"""Tables of the cache service (declared here once; the Alembic revision creates them).

``cache_entries`` is UNLOGGED: writes skip the WAL (about twice as fast), at the price that the
table is emptied after a server crash and is empty on a promoted standby. A cache may lose
entries; nothing else in pgcoord lives here.

``ns`` is ``"<app>:<prefix>"``; ``ns`` and ``key`` use the "C" collation so that the primary key
serves both equality look-ups and ``LIKE 'abc%'`` pattern scans, and so that an app's
namespaces form one contiguous range (``'<app>:' <= ns < '<app>;'``).
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Index, MetaData, PrimaryKeyConstraint, Table, Text, text

TABLE = "cache_entries"


def define(metadata: MetaData) -> None:
    """Add this service's tables to ``metadata`` (whose ``schema`` is pgcoord's schema)."""
    Table(
        TABLE,
        metadata,
        Column("ns", Text(collation="C"), nullable=False),
        Column("key", Text(collation="C"), nullable=False),
        Column("value", Text, nullable=False),
        # NULL: never expires. Judged against the database clock (now()), never the app's.
        Column("expires_at", DateTime(timezone=True), nullable=True),
        # Last write; the size bound evicts the oldest-written entries first.
        Column("written_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
        PrimaryKeyConstraint("ns", "key", name="cache_entries_pkey"),
        # Only entries with a ttl are ever swept, so only they are indexed for the sweeper.
        Index(
            "cache_entries_expires_idx",
            "expires_at",
            postgresql_where=text("expires_at IS NOT NULL"),
        ),
        prefixes=["UNLOGGED"],
        # Short-lived rows churn: vacuum this table sooner than the server-wide default.
        postgresql_with={"autovacuum_vacuum_scale_factor": "0.05"},
    )
