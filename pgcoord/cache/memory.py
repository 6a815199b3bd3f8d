"""The memory store: the cache API inside one process (single-instance use and tests).

Bounded: beyond ``max_entries`` the least recently used entry is evicted. Expired entries are
dropped when touched, and before any eviction of a live entry.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import orjson

from pgcoord.cache.patterns import glob_to_regex
from pgcoord.errors import InvalidInputError

_Entry = tuple[str, float | None]  # (text, deadline on the monotonic clock or None)


class MemoryStore:
    """An LRU dictionary of encoded values with deadlines (see the module docstring)."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, _Entry] = OrderedDict()

    def _live(self, key: str) -> _Entry | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] is not None and self._clock() >= entry[1]:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry

    def _put(self, key: str, text: str, ttl: float | None) -> None:
        deadline = None if ttl is None else self._clock() + ttl
        self._data[key] = (text, deadline)
        self._data.move_to_end(key)
        if len(self._data) > self.max_entries:
            self._purge_expired()
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def _purge_expired(self) -> None:
        now = self._clock()
        for key in [k for k, (_, d) in self._data.items() if d is not None and now >= d]:
            del self._data[key]

    async def get(self, key: str) -> str | None:
        """See :class:`~pgcoord.cache.store.Store`."""
        entry = self._live(key)
        return None if entry is None else entry[0]

    async def get_with_ttl(self, key: str) -> tuple[str, float | None] | None:
        """See :class:`~pgcoord.cache.store.Store`."""
        entry = self._live(key)
        if entry is None:
            return None
        return entry[0], None if entry[1] is None else entry[1] - self._clock()

    async def mget(self, keys: Sequence[str]) -> dict[str, str]:
        """See :class:`~pgcoord.cache.store.Store`."""
        found: dict[str, str] = {}
        for key in keys:
            entry = self._live(key)
            if entry is not None:
                found[key] = entry[0]
        return found

    # Writes answer False: no other instance can see this process's memory.

    async def set(self, key: str, text: str, ttl: float | None) -> bool:
        """See :class:`~pgcoord.cache.store.Store`."""
        self._put(key, text, ttl)
        return False

    async def mset(self, items: Sequence[tuple[str, str]], ttl: float | None) -> bool:
        """See :class:`~pgcoord.cache.store.Store`."""
        for key, text in items:
            self._put(key, text, ttl)
        return False

    async def mdel(self, keys: Sequence[str]) -> bool:
        """See :class:`~pgcoord.cache.store.Store`."""
        for key in keys:
            self._data.pop(key, None)
        return False

    async def reset(self) -> bool:
        """See :class:`~pgcoord.cache.store.Store`."""
        self._data.clear()
        return False

    async def ttl(self, key: str) -> float | None:
        """See :class:`~pgcoord.cache.store.Store`."""
        entry = self._live(key)
        if entry is None or entry[1] is None:
            return None
        return max(0.0, entry[1] - self._clock())

    async def keys(self, pattern: str | None) -> list[str]:
        """See :class:`~pgcoord.cache.store.Store`."""
        self._purge_expired()
        if pattern is None:
            return sorted(self._data)
        regex = glob_to_regex(pattern)
        return sorted(k for k in self._data if regex.fullmatch(k))

    async def incr(self, key: str, amount: int, ttl: float | None) -> int:
        """See :class:`~pgcoord.cache.store.Store`; an existing key keeps its expiry."""
        entry = self._live(key)
        if entry is None:
            self._put(key, str(amount), ttl)
            return amount
        current = orjson.loads(entry[0])
        if isinstance(current, bool) or not isinstance(current, int):
            raise InvalidInputError(f"the value at cache key {key!r} is not an integer")
        result = current + amount
        if not -(2**63) <= result < 2**63:
            # The same limit as the Postgres store's bigint, so both stores behave alike.
            raise InvalidInputError(f"incrementing cache key {key!r} overflows 64 bits")
        self._data[key] = (str(result), entry[1])
        return result

    async def incr_notify(self, key: str, amount: int, ttl: float | None) -> tuple[int, bool]:
        """See :class:`~pgcoord.cache.store.Store` (:meth:`incr`, and nobody to tell)."""
        return await self.incr(key, amount, ttl), False
