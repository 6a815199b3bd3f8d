"""The libpq fast path the hot lock statements take (``pgcoord._prepared``), on a real server."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from pgcoord import _prepared
from pgcoord._deadline import sever
from pgcoord._prepared import BINARY_FORMAT, TEXT_FORMAT, Statement

ADD = Statement("test_add", b"SELECT %s::int8 + 1, %s::text", (_prepared.INT8, _prepared.TEXT))
FORMATS = (BINARY_FORMAT, TEXT_FORMAT)


async def _add(conn: psycopg.AsyncConnection[object], n: int) -> int:
    result = await _prepared.run(conn, ADD, (_prepared.int8(n), b"x"), FORMATS)
    value = _prepared.read_int8(result.get_value(0, 0))
    assert value is not None
    return value


async def _prepared_names(conn: psycopg.AsyncConnection[object]) -> list[str]:
    cur = await conn.execute("SELECT name FROM pg_prepared_statements ORDER BY name")
    return [row[0] for row in await cur.fetchall()]


async def test_a_statement_is_prepared_once_per_session_and_answers(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        assert [await _add(conn, n) for n in (1, 41, -3)] == [2, 42, -2]
        names = await _prepared_names(conn)
        assert names.count(ADD.name.decode()) == 1
        # psycopg's own path on the same session is unaffected.
        cur = await conn.execute("SELECT %s::int + 1", (1,))
        assert await cur.fetchone() == (2,)


async def test_a_session_that_lost_its_prepared_statements_prepares_again(dsn: str) -> None:
    # A host that runs DISCARD ALL / DEALLOCATE ALL on a lent connection: the next run must
    # not fail with "prepared statement does not exist".
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        assert await _add(conn, 1) == 2
        await conn.execute("DISCARD ALL")
        assert await _add(conn, 2) == 3
        await conn.execute("DEALLOCATE ALL")
        assert await _add(conn, 3) == 4


async def test_a_server_error_is_psycopgs_typed_error_and_the_session_stays_usable(
    dsn: str,
) -> None:
    divide = Statement("test_divide", b"SELECT 1 / %s::int8", (_prepared.INT8,))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            await _prepared.run(conn, divide, (_prepared.int8(0),), (BINARY_FORMAT,))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert await _add(conn, 5) == 6


async def test_a_statement_that_does_not_prepare_raises_and_is_not_remembered(dsn: str) -> None:
    broken = Statement("test_broken", b"SELECT * FROM no_such_table WHERE k = %s", (20,))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(2):
            with pytest.raises(psycopg.errors.UndefinedTable):
                await _prepared.run(conn, broken, (_prepared.int8(1),), (BINARY_FORMAT,))
        await conn.execute("CREATE TEMP TABLE no_such_table (k int8)")
        result = await _prepared.run(conn, broken, (_prepared.int8(1),), (BINARY_FORMAT,))
        assert result.ntuples == 0


async def test_a_connection_cut_mid_statement_raises_an_operational_error(dsn: str) -> None:
    sleep = Statement("test_sleep", b"SELECT pg_sleep(%s::int8)", (_prepared.INT8,))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await _add(conn, 1)
        running = asyncio.ensure_future(
            _prepared.run(conn, sleep, (_prepared.int8(30),), (BINARY_FORMAT,))
        )
        await asyncio.sleep(0.2)
        # How pgcoord's deadlines end a stalled statement: its socket is shut down.
        sever(conn)
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(running, 10)


def test_statement_names_follow_the_text_so_two_schemas_never_share_one() -> None:
    one = Statement("lock_unlock", b'SELECT "a".f(%s)', (_prepared.INT8,))
    other = Statement("lock_unlock", b'SELECT "b".f(%s)', (_prepared.INT8,))
    assert one.name != other.name
    assert one.name == Statement("lock_unlock", b'SELECT "a".f(%s)', (20,)).name
    assert one.text == b'SELECT "a".f($1)'
    with pytest.raises(ValueError, match="1 parameters in the text, 2 types"):
        Statement("x", b"SELECT %s", (20, 20))


async def test_a_statement_prepared_on_the_session_under_its_name_already_is_used(
    dsn: str,
) -> None:
    # Another path of the process prepared it first (a name stands for one text).
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(b"PREPARE " + ADD.name + b" (int8, text) AS " + ADD.text)
        assert await _add(conn, 9) == 10
