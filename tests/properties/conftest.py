"""Fixtures of the property tests: one database and one Coordinator per test module.

Hypothesis runs each property many times in one test; a fresh database and Coordinator per
example would cost seconds each, so a module shares them (module-scoped, on the module's event
loop: every test module sets ``pytestmark = pytest.mark.asyncio(loop_scope="module")``). Each
property therefore compares what it can see before and after a call instead of assuming empty
tables.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import pytest_asyncio

import pgcoord
from tests.support import PgServer, unique_name

if TYPE_CHECKING:
    from tests.faults.bouncer import Bouncer


@pytest.fixture(scope="module")
def module_dsn(pg: PgServer, template_db: str, bouncer: Bouncer | None) -> Iterator[str]:
    """A fresh database with pgcoord's schema at head for this test module, dropped after it."""
    name = unique_name("pgct_prop")
    direct = pg.create_database(name, template=template_db)
    yield bouncer.dsn_for(name) if bouncer is not None else direct
    pg.drop_database(name)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_coord(module_dsn: str) -> AsyncIterator[pgcoord.Coordinator]:
    """One started Coordinator (app ``main``) on the module's database."""
    coord = pgcoord.Coordinator(module_dsn, heartbeat=1.0)
    await coord.start()
    yield coord
    await coord.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def db(module_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection of the test's own, to look at pgcoord's tables directly."""
    conn = await psycopg.AsyncConnection.connect(module_dsn, autocommit=True)
    yield conn
    await conn.close()
