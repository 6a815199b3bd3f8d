"""Fixtures: a real PostgreSQL (never a mock), a fresh database per test, coordinators."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

import pgcoord
from pgcoord import migrate
from tests.support import PgServer, migrations_fingerprint, server_from_env, unique_name


@pytest.fixture(scope="session")
def pg() -> PgServer:
    """The server under test ($PGCOORD_TEST_DSN, else the embedded server)."""
    return server_from_env()


@pytest.fixture(scope="session")
def template_db(pg: PgServer) -> Iterator[str]:
    """A database migrated to head once per session; each test clones it (fast, isolated)."""
    name = unique_name(f"pgct_tmpl_{migrations_fingerprint()}")
    dsn = pg.create_database(name)
    migrate.upgrade(dsn, "pgcoord")
    yield name
    pg.drop_database(name)


@pytest.fixture
def dsn(pg: PgServer, template_db: str) -> Iterator[str]:
    """DSN of a fresh database with pgcoord's schema at head, dropped after the test."""
    name = unique_name("pgct")
    yield pg.create_database(name, template=template_db)
    pg.drop_database(name)


@pytest.fixture
def empty_dsn(pg: PgServer) -> Iterator[str]:
    """DSN of a fresh, empty database (no pgcoord schema), dropped after the test."""
    name = unique_name("pgct_empty")
    yield pg.create_database(name)
    pg.drop_database(name)


CoordFactory = Callable[..., Awaitable[pgcoord.Coordinator]]


@pytest.fixture
async def make_coord(dsn: str) -> AsyncIterator[CoordFactory]:
    """Start coordinators on the test database: ``await make_coord(app="x", **options)``.

    Every coordinator made is stopped at the end of the test.
    """
    made: list[pgcoord.Coordinator] = []

    async def factory(**kwargs: Any) -> pgcoord.Coordinator:
        kwargs.setdefault("heartbeat", 1.0)
        coord = pgcoord.Coordinator(kwargs.pop("dsn", dsn), **kwargs)
        made.append(coord)
        await coord.start()
        return coord

    yield factory
    for coord in reversed(made):
        await coord.stop()


@pytest.fixture
async def coord(make_coord: CoordFactory) -> pgcoord.Coordinator:
    """One started Coordinator on the test database."""
    return await make_coord()
