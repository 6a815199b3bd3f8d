"""Cache worker process for the cluster tests: ``python -m tests.workers.cache_worker MODE ...``.

Modes:
- ``wrap KEY N``: after "go" on stdin, N concurrent ``wrap(KEY)`` calls whose fn counts its runs
  in the cache key ``calls`` and sleeps; prints ``{"results": [...]}``.
- ``freeze KEY``: leads ``wrap(KEY)`` with a fn that prints ``computing`` and never finishes.
- ``incr KEY N``: after "go", N concurrent ``incr(KEY)``; prints ``{"done": N}``.
- ``near``: a cache ``near`` with ``local_ttl=60``; obeys stdin commands ``{"get": key}``,
  ``{"set": [key, value]}``, ``{"listener": true}``, ``{"quit": true}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pgcoord
from tests.support import emit


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def main(mode: str, *args: str) -> None:
    async with pgcoord.Coordinator(app="clu", heartbeat=1.0) as coord:
        stdin = await _stdin_lines()
        if mode == "wrap":
            key, n = args[0], int(args[1])
            cache = coord.cache

            async def fn() -> str:
                await cache.incr("calls")
                await asyncio.sleep(0.5)
                return f"computed by {os.getpid()}"

            emit(ready=True)
            await stdin.readline()
            results = await asyncio.gather(
                *(cache.wrap(key, fn, ttl=60) for _ in range(n)), return_exceptions=True
            )
            emit(results=[r if isinstance(r, str) else repr(r) for r in results])
        elif mode == "freeze":
            # The leader of wrap(KEY) announces it is computing; the test then SIGSTOPs it.
            async def slow() -> str:
                emit(computing=True)
                await asyncio.sleep(600)
                return "never"

            emit(ready=True)
            await coord.cache.wrap(args[0], slow)
        elif mode == "incr":
            key, n = args[0], int(args[1])
            emit(ready=True)
            await stdin.readline()
            await asyncio.gather(*(coord.cache.incr(key) for _ in range(n)))
            emit(done=n)
        elif mode == "near":
            cache = coord.cache_manager.create_cache("near", local_ttl=60)
            emit(ready=True)
            while line := await stdin.readline():
                cmd: dict[str, Any] = json.loads(line)
                if "get" in cmd:
                    emit(value=await cache.get(cmd["get"]))
                elif "set" in cmd:
                    await cache.set(cmd["set"][0], cmd["set"][1])
                    emit(ok=True)
                elif "listener" in cmd:
                    listener = coord.listener
                    emit(
                        pid=listener.backend_pid,
                        connected=listener.connected,
                        reconnects=listener.reconnects,
                    )
                elif "quit" in cmd:
                    break
        # make sure the last line is out before the coordinator stops
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], *sys.argv[2:]))
