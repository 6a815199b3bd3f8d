"""The Postgres store: one namespace of the UNLOGGED ``cache_entries`` table.

Each operation is one autocommit statement on a pool connection (one round trip). Each write
also answers whether another instance near-caches the namespace (see ``registration.py``), so
the cache knows whether to NOTIFY, in the same round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pgcoord.cache.patterns import glob_to_like
from pgcoord.cache.queries import Queries
from pgcoord.cache.registration import LEASE, marker_ns
from pgcoord.errors import DatabaseError, InvalidInputError
from pgcoord.runtime import Runtime


class PostgresStore:
    """Entries of namespace ``ns`` (``"<app>:<prefix>"``) in the cache table."""

    def __init__(self, runtime: Runtime, queries: Queries, ns: str) -> None:
        self._rt = runtime
        self._q = queries
        self.ns = ns
        # What every write's "does another instance near-cache this?" probe needs.
        self._probe = {"near": marker_ns(ns), "me": runtime.instance_id, "lease": LEASE}

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

    async def _write(self, query: bytes, params: dict[str, Any]) -> bool:
        """Run a write; True when other instances' near caches must be told."""
        row = await self._one(query, {**params, **self._probe})
        return bool(row and row[-1])

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

    async def set(self, key: str, text: str, ttl: float | None) -> bool:
        """See :class:`~pgcoord.cache.store.Store`."""
        return await self._write(
            self._q.set, {"ns": self.ns, "key": key, "value": text, "ttl": ttl}
        )

    async def mset(self, items: Sequence[tuple[str, str]], ttl: float | None) -> bool:
        """See :class:`~pgcoord.cache.store.Store`."""
        # Sorted keys: concurrent msets lock rows in the same order and cannot deadlock.
        ordered = sorted(items)
        return await self._write(
            self._q.mset,
            {
                "ns": self.ns,
                "ttl": ttl,
                "keys": [k for k, _ in ordered],
                "values": [v for _, v in ordered],
            },
        )

    async def mdel(self, keys: Sequence[str]) -> bool:
        """See :class:`~pgcoord.cache.store.Store`."""
        return await self._write(self._q.mdel, {"ns": self.ns, "keys": sorted(keys)})

    async def reset(self) -> bool:
        """See :class:`~pgcoord.cache.store.Store`."""
        return await self._write(self._q.reset, {"ns": self.ns})

    async def ttl(self, key: str) -> float | None:
        """See :class:`~pgcoord.cache.store.Store`."""
        row = await self._one(self._q.ttl, (self.ns, key))
        return None if row is None or row[0] is None else max(0.0, float(row[0]))

    async def keys(self, pattern: str | None) -> list[str]:
        """See :class:`~pgcoord.cache.store.Store`."""
        like = "%" if pattern is None else glob_to_like(pattern)
        return [row[0] for row in await self._rows(self._q.keys, (self.ns, like))]

    async def incr_notify(self, key: str, amount: int, ttl: float | None) -> tuple[int, bool]:
        """See :class:`~pgcoord.cache.store.Store`; an existing live key keeps its expiry."""
        params = {"ns": self.ns, "key": key, "amount": amount, "ttl": ttl, **self._probe}
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
        return int(row[0]), bool(row[1])
