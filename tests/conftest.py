"""Fixtures: a real PostgreSQL (never a mock), a fresh database per test, coordinators."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

import pgcoord
from pgcoord import migrate
from tests.support import (
    CoordFactory,
    PgServer,
    bouncer_mode,
    migrations_fingerprint,
    server_from_env,
    unique_name,
)

if TYPE_CHECKING:
    from tests.faults.bouncer import Bouncer

#: Server connections the session-wide test bouncer opens per test database: more than any one
#: test's instances budget together, and under the server's max_connections (100).
_TEST_BOUNCER_POOL = 80


@pytest.fixture(scope="session")
def pg() -> PgServer:
    """The server under test ($PGCOORD_TEST_DSN, else the embedded server)."""
    return server_from_env()


#: Tests that cannot pass through a bouncer by their nature, and why (``$PGCOORD_TEST_BOUNCER``).
_NOT_THROUGH_A_BOUNCER = {
    "tests/queue/test_idle.py::test_an_idle_subscribed_instance_holds_two_connections_and_sends_nothing": (
        "it counts the database's server backends, and a bouncer keeps its server connections "
        "open after pgcoord's pool closes the client ones"
    ),
    "tests/locks/test_api.py::test_terminated_session_frees_the_lock_and_the_holder_sees_lost": (
        "it terminates Lock.backend_pid, which for a lock on its session is the pid the "
        "connection was told at login: a bouncer's own cancel key, not a server process"
    ),
    "tests/locks/test_processes.py::test_terminated_holder_session_frees_the_lock_and_the_holder_sees_lost": (
        "it terminates the holder's Lock.backend_pid, a bouncer's cancel key (see test_api)"
    ),
    "tests/locks/test_hardening.py::test_a_killed_holders_lease_rows_do_not_stay": (
        "a killed client's server session goes back to the bouncer's pool, so the holder's "
        "listener backend (pid + start) stays alive and its rows go only when the lease ends"
    ),
    "tests/pubsub/test_processes.py::test_overlapping_transactions_committed_while_disconnected_are_caught_up_in_commit_order": (
        "it forbids new server connections while its client connections have run no query "
        "yet: behind a bouncer a client gets its server session at its first query, so they wait"
    ),
}


#: Why the tests marked ``restart`` are skipped through a bouncer.
_RESTART_THROUGH_A_BOUNCER = (
    "it restarts the server, and PgBouncer then refuses new clients with 'server login has "
    "been failing' (SQLSTATE 08P01) for server_login_retry, which pgcoord reports as a "
    "DatabaseError rather than a lost connection, so its restart paths do not retry it"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``$PGCOORD_TEST_BOUNCER``, skip the tests listed in ``_NOT_THROUGH_A_BOUNCER`` and
    those marked ``restart``."""
    if bouncer_mode() is None:
        return
    for item in items:
        reason = _NOT_THROUGH_A_BOUNCER.get(item.nodeid)
        if reason is None and item.get_closest_marker("restart") is not None:
            reason = _RESTART_THROUGH_A_BOUNCER
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"through a bouncer: {reason}"))


@pytest.fixture(scope="session")
def bouncer(pg: PgServer) -> Iterator[Bouncer | None]:
    """With ``$PGCOORD_TEST_BOUNCER=session``, the PgBouncer every test DSN goes through (one for
    the whole session, stopped at its end); else None and the DSNs point at the server."""
    if bouncer_mode() is None:
        yield None
        return
    from tests.faults.bouncer import running_bouncer

    with running_bouncer(pg, "session", default_pool_size=_TEST_BOUNCER_POOL) as running:
        yield running


@pytest.fixture(scope="session")
def template_db(pg: PgServer) -> Iterator[str]:
    """A database migrated to head once per session; each test clones it (fast, isolated)."""
    name = unique_name(f"pgct_tmpl_{migrations_fingerprint()}")
    dsn = pg.create_database(name)
    migrate.upgrade(dsn, "pgcoord")
    yield name
    pg.drop_database(name)


@pytest.fixture
def dsn(pg: PgServer, template_db: str, bouncer: Bouncer | None) -> Iterator[str]:
    """DSN of a fresh database with pgcoord's schema at head, dropped after the test
    (through the session's bouncer when there is one)."""
    name = unique_name("pgct")
    direct = pg.create_database(name, template=template_db)
    yield bouncer.dsn_for(name) if bouncer is not None else direct
    pg.drop_database(name)


@pytest.fixture
def empty_dsn(pg: PgServer, bouncer: Bouncer | None) -> Iterator[str]:
    """DSN of a fresh, empty database (no pgcoord schema), dropped after the test
    (through the session's bouncer when there is one)."""
    name = unique_name("pgct_empty")
    direct = pg.create_database(name)
    yield bouncer.dsn_for(name) if bouncer is not None else direct
    pg.drop_database(name)


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
