"""The harness itself: fresh databases are isolated and migrated."""

from __future__ import annotations

import psycopg

import pgcoord


async def test_each_test_gets_a_migrated_database(coord: pgcoord.Coordinator, dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT version_num FROM pgcoord.pgcoord_alembic_version").fetchone()
    assert row is not None
    assert row[0] == pgcoord.migrate.head_revision()
    assert coord.running
