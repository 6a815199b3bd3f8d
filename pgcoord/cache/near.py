"""The near cache: an in-process layer in front of Postgres (pure, no I/O; clock injectable).

Entries live at most ``local_ttl`` seconds (and never past the database expiry seen when they
were read), so even a lost invalidation cannot keep a stale value alive longer than that.

Racing reads: a read that started before an invalidation of its key (or before a full clear) may
return the old value from the database after the invalidation was applied. Such a read must not
populate the layer, so in-flight reads are tracked per key: a key invalidated while a read of it
is in flight is marked stale, and no read that overlapped the invalidation stores its result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from pgcoord.cache.serializer import IMMUTABLE

#: Returned by :meth:`NearCache.get` when the key is not held (``None`` is a valid value).
MISSING: Any = object()

# entry: (deadline on the monotonic clock, stored text, decoded value or MISSING when mutable)
_Entry = tuple[float, str, Any]


class NearCache:
    """Bounded in-process entries with per-entry deadlines and race-safe population."""

    def __init__(
        self,
        local_ttl: float,
        max_entries: int,
        loads: Callable[[str], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local_ttl = local_ttl
        self.max_entries = max_entries
        self._loads = loads
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._reads: dict[str, int] = {}
        self._stale: set[str] = set()
        self._generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any:
        """The value held for ``key``, or :data:`MISSING`. Mutable values are fresh copies."""
        entry = self._entries.get(key)
        if entry is None:
            return MISSING
        deadline, text, value = entry
        if self._clock() >= deadline:
            del self._entries[key]
            return MISSING
        # A caller mutating a returned dict/list must not change what others get next.
        return self._loads(text) if value is MISSING else value

    def begin_read(self, key: str) -> int:
        """Note a database read of ``key`` starting; pass the token to :meth:`end_read`."""
        self._reads[key] = self._reads.get(key, 0) + 1
        return self._generation

    def end_read(
        self,
        key: str,
        token: int,
        text: str | None,
        value: Any = MISSING,
        ttl_left: float | None = None,
    ) -> None:
        """Finish a read; store its result unless an invalidation overlapped it.

        ``text`` None means the key was missing (misses are not cached). ``ttl_left`` is the
        database entry's remaining lifetime (None: it never expires).
        """
        count = self._reads.get(key, 0) - 1
        stale = key in self._stale
        if count > 0:
            self._reads[key] = count
        else:
            self._reads.pop(key, None)
            self._stale.discard(key)
        if text is None or stale or token != self._generation:
            return
        lifetime = self.local_ttl if ttl_left is None else min(self.local_ttl, ttl_left)
        if lifetime <= 0:
            return
        if key not in self._entries and len(self._entries) >= self.max_entries:
            # Oldest-inserted first: dicts keep insertion order, so this is O(1).
            del self._entries[next(iter(self._entries))]
        immutable = value if isinstance(value, IMMUTABLE) else MISSING
        self._entries[key] = (self._clock() + lifetime, text, immutable)

    def invalidate(self, keys: Iterable[str]) -> None:
        """Drop ``keys``; reads of them now in flight will not store what they fetched."""
        for key in keys:
            self._entries.pop(key, None)
            if key in self._reads:
                self._stale.add(key)

    def clear(self) -> None:
        """Drop everything; no read now in flight will store its result."""
        self._entries.clear()
        self._generation += 1
