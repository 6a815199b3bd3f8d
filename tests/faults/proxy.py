"""A TCP proxy on loopback that can stop forwarding without closing: a hung middlebox.

``StallProxy(upstream_host, upstream_port)`` runs its own event loop in a thread (so a test
whose loop is blocked, or a child process, still sees it behave). ``stall()`` stops moving
bytes in both directions on every connection, open or new (new ones are accepted and then
never answered), exactly what a stalled network or a frozen NAT entry looks like: nothing is
closed, nothing arrives. ``stall(up=False)`` holds only the server's answers: statements
still reach the server and commit, their results never come back (an ambiguous failure).
``resume()`` moves the held bytes on; ``sever()`` closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

_CHUNK = 65536


class StallProxy:
    """Forwards 127.0.0.1:``port`` to the upstream server (TCP, or a Unix-socket directory
    given as the host) until told to stall."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None  # client -> server (and new connections)
        self._answering: asyncio.Event | None = None  # server -> client
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._open())

    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _open(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._answering = asyncio.Event()
        self._answering.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self._writers.add(writer)
        await self._flowing.wait()  # a stalled path does not even reach the server
        try:
            host, port = self.upstream
            if host.startswith("/"):  # a Unix-socket server (the embedded one)
                up_reader, up_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
            else:
                up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        assert self._answering is not None
        await asyncio.gather(
            self._pump(reader, up_writer, self._flowing),
            self._pump(up_reader, writer, self._answering),
            return_exceptions=True,
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gate: asyncio.Event
    ) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await gate.wait()  # held while stalled, moved on at resume
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self._writers.discard(writer)

    def stall(self, *, up: bool = True) -> None:
        """Stop forwarding the server's answers and, with ``up``, what clients send (then
        new connections are never answered either). Open connections stay open."""
        assert self._flowing is not None and self._answering is not None
        self._loop.call_soon_threadsafe(self._answering.clear)
        if up:
            self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        """Forward again, held bytes first."""
        assert self._flowing is not None and self._answering is not None
        self._loop.call_soon_threadsafe(self._flowing.set)
        self._loop.call_soon_threadsafe(self._answering.set)

    def sever(self) -> None:
        """Close every proxied connection (as a middlebox reset would)."""

        async def close_all() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._call(close_all())

    def close(self) -> None:
        """Stop listening, drop every connection and end the thread."""

        async def shut() -> None:
            assert self._server is not None and self._flowing is not None
            assert self._answering is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            self._flowing.set()
            self._answering.set()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(shut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@contextlib.contextmanager
def stall_proxy(dsn: str) -> Iterator[tuple[StallProxy, str]]:
    """A proxy in front of ``dsn``'s server, and the same DSN pointed at the proxy."""
    import psycopg.conninfo

    params = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(params.get("host") or "127.0.0.1")
    proxy = StallProxy(host, int(params.get("port") or 5432))
    try:
        params.update(host="127.0.0.1", port=str(proxy.port))
        yield proxy, psycopg.conninfo.make_conninfo("", **params)
    finally:
        proxy.close()
