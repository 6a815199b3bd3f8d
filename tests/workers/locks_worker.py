"""Lock worker process for the locks tests: ``python -m tests.workers.locks_worker MODE ...``.

Modes:
- ``serve``: obeys one JSON command per stdin line and answers with one JSON line:
  ``{"op": "acquire", "key": K, "ttl": T}`` -> ``{"acquired": token, "pid": backend pid}``;
  ``{"op": "try", "key": K, "timeout": S}`` -> ``{"tried": token or null}``;
  ``{"op": "release"}`` -> ``{"released": true}``; ``{"op": "extend", "ttl": T}`` ->
  ``{"extended": true}`` or ``{"extend_error": class name}``; ``{"op": "lost"}`` ->
  ``{"lost": bool}``; ``{"op": "wait_lost"}`` waits (10 s at most) for ``lost``, then answers
  the same; ``{"op": "quit"}``.
- ``counter KEY N``: after ``go`` on stdin, N read-modify-write increments of ``counter.value``
  (each in its own transaction) under ``run_exclusive(KEY)``; prints ``{"done": N}``.
- ``tokens KEY N``: after ``go``, N acquisitions of KEY; inside each it appends its token to
  ``token_log`` (so the table's order is the lock order); prints ``{"done": N}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import psycopg

import pgcoord
from tests.support import emit


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve(coord: pgcoord.Coordinator, stdin: asyncio.StreamReader) -> None:
    locks = coord.lock_manager
    held: pgcoord.Lock | None = None
    while line := await stdin.readline():
        cmd: dict[str, Any] = json.loads(line)
        op = cmd["op"]
        if op == "acquire":
            held = await locks.acquire(cmd["key"], ttl=cmd.get("ttl", 30.0))
            emit(acquired=held.token, pid=held.backend_pid)
        elif op == "try":
            try:
                held = await locks.try_acquire(cmd["key"], timeout=cmd.get("timeout", 0.0))
                emit(tried=held.token)
            except pgcoord.LockAcquireError:
                emit(tried=None)
        elif op == "release":
            assert held is not None
            await held.release()
            emit(released=True)
        elif op == "extend":
            assert held is not None
            try:
                await held.extend(cmd.get("ttl", 30.0))
                emit(extended=True)
            except pgcoord.PgcoordError as exc:
                emit(extend_error=type(exc).__name__)
        elif op == "lost":
            assert held is not None
            emit(lost=held.lost)
        elif op == "wait_lost":  # the API promises `lost` within a second: allow far more
            assert held is not None
            deadline = asyncio.get_running_loop().time() + cmd.get("timeout", 10.0)
            while not held.lost and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            emit(lost=held.lost)
        elif op == "quit":
            return


async def counter(coord: pgcoord.Coordinator, key: str, n: int, dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:

        async def increment() -> None:
            # Deliberately racy without the lock: read, then write back value + 1.
            cur = await conn.execute("SELECT value FROM counter WHERE id = 1")
            row = await cur.fetchone()
            assert row is not None
            await conn.execute("UPDATE counter SET value = %s WHERE id = 1", (row[0] + 1,))
            await conn.commit()

        for _ in range(n):
            await coord.lock_manager.run_exclusive(key, increment)


async def tokens(coord: pgcoord.Coordinator, key: str, n: int, dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(n):
            async with coord.lock_manager.lock(key) as lock:
                await conn.execute(
                    "INSERT INTO token_log (worker, token) VALUES (%s, %s)",
                    (os.getpid(), lock.token),
                )


async def main(mode: str, *args: str) -> None:
    dsn = os.environ["PGCOORD_DSN"]
    async with pgcoord.Coordinator(app="locktest", heartbeat=1.0) as coord:
        stdin = await _stdin_lines()
        emit(ready=True, instance_id=coord.instance_id)
        if mode == "serve":
            await serve(coord, stdin)
            return
        await stdin.readline()  # "go": start together with the other workers
        key, n = args[0], int(args[1])
        if mode == "counter":
            await counter(coord, key, n, dsn)
        elif mode == "tokens":
            await tokens(coord, key, n, dsn)
        emit(done=n)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], *sys.argv[2:]))
