"""The Postgres store: one namespace of the UNLOGGED ``cache_entries`` table.

Each operation is one autocommit statement on a pool connection (one round trip).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pgcoord.cache.patterns import glob_to_like
from pgcoord.cache.queries import Queries
from pgcoord.errors import DatabaseError, InvalidInputError
from pgcoord.runtime import Runtime


class PostgresStore:
    """Entries of namespace ``ns`` (``"<app>:<prefix>"``) in the cache table."""

    def __init__(self, runtime: Runtime, queries: Queries, ns: str) -> None:
        self._rt = runtime
        self._q = queries
        self.ns = ns

    async def _run(self, query: bytes, params: Any, fetch: int) -> Any:
        """Run one statement; ``fetch``: 0 nothing, 1 one row (or None), 2 all rows."""
        async with self._rt.connection("cache statement") as conn:
            cur = await conn.execute(query, params)
            if fetch == 1:
                return await cur.fetchone()
            if fetch == 2:
                return await cur.fetchall()
            return None

    async def _one(self, query: bytes, params: Any) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = await self._run(query, params, 1)
        return row

    async def _rows(self, query: bytes, params: Any) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self._run(query, params, 2)
        return rows

    async def _one_write(self, query: bytes, params: Any) -> None:
        await self._run(query, params, 0)

    async def get(self, key: str) -> str | None:
        """See :class:`~pgcoord.cache.store.Store`."""
        row = await self._one(self._q.get, (self.ns, key))
        return None if row is None else row[0]

    async def get_with_ttl(self, key: str) -> tuple[str, float | None] | None:
        """See :class:`~pgcoord.cache.store.Store`."""
        row = await self._one(self._q.get_with_ttl, (self.ns, key))
        return None if row is None else (row[0], row[1])

    async def mget(self, keys: Sequence[str]) -> dict[str, str]:
        """See :class:`~pgcoord.cache.store.Store`."""
        rows = await self._rows(self._q.mget, (self.ns, list(keys)))
        return {key: value for key, value in rows}

    async def set(self, key: str, text: str, ttl: float | None) -> None:
        """See :class:`~pgcoord.cache.store.Store`."""
        await self._one_write(self._q.set, (self.ns, key, text, ttl))

    async def mset(self, items: Sequence[tuple[str, str]], ttl: float | None) -> None:
        """See :class:`~pgcoord.cache.store.Store`."""
        # Sorted keys: concurrent msets lock rows in the same order and cannot deadlock.
        ordered = sorted(items)
        await self._one_write(
            self._q.mset, (self.ns, ttl, [k for k, _ in ordered], [v for _, v in ordered])
        )

    async def mdel(self, keys: Sequence[str]) -> None:
        """See :class:`~pgcoord.cache.store.Store`."""
        await self._one_write(self._q.mdel, (self.ns, sorted(keys)))

    async def reset(self) -> None:
        """See :class:`~pgcoord.cache.store.Store`."""
        await self._one_write(self._q.reset, (self.ns,))

    async def ttl(self, key: str) -> float | None:
        """See :class:`~pgcoord.cache.store.Store`."""
        row = await self._one(self._q.ttl, (self.ns, key))
        return None if row is None or row[0] is None else max(0.0, float(row[0]))

    async def keys(self, pattern: str | None) -> list[str]:
        """See :class:`~pgcoord.cache.store.Store`."""
        like = "%" if pattern is None else glob_to_like(pattern)
        return [row[0] for row in await self._rows(self._q.keys, (self.ns, like))]

    async def incr(self, key: str, amount: int, ttl: float | None) -> int:
        """See :class:`~pgcoord.cache.store.Store`; an existing live key keeps its expiry."""
        params = {"ns": self.ns, "key": key, "amount": amount, "ttl": ttl}
        try:
            row = await self._one(self._q.incr, params)
        except DatabaseError as exc:
            # 22P02: the stored text is not an integer; 22003: the sum overflows bigint.
            if exc.sqlstate in ("22P02", "22003"):
                raise InvalidInputError(
                    f"the value at cache key {key!r} is not an integer that fits 64 bits"
                ) from exc
            raise
        assert row is not None
        return int(row[0])
