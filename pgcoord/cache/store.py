"""What a cache store does: keep encoded values (text) with optional expiry, per namespace."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Store(Protocol):
    """A backend of :class:`~pgcoord.cache.Cache`; values arrive already encoded as text.

    Every write answers whether near caches of *other* instances must be told (a NOTIFY): only
    the Postgres store can have those, and only when one of them registered the namespace.
    """

    async def get(self, key: str) -> str | None:
        """The live value of ``key``, or None."""
        ...

    async def get_with_ttl(self, key: str) -> tuple[str, float | None] | None:
        """The live value and its seconds left (None: never expires), or None when missing."""
        ...

    async def mget(self, keys: Sequence[str]) -> dict[str, str]:
        """The live values of those ``keys`` that exist."""
        ...

    async def set(self, key: str, text: str, ttl: float | None) -> bool:
        """Store ``text`` under ``key`` for ``ttl`` seconds (None: no expiry)."""
        ...

    async def mset(self, items: Sequence[tuple[str, str]], ttl: float | None) -> bool:
        """Store every (key, text) pair (keys are distinct)."""
        ...

    async def mdel(self, keys: Sequence[str]) -> bool:
        """Remove ``keys`` (missing ones are ignored)."""
        ...

    async def reset(self) -> bool:
        """Remove every key of this namespace."""
        ...

    async def ttl(self, key: str) -> float | None:
        """Seconds left; None when missing or never expiring."""
        ...

    async def keys(self, pattern: str | None) -> list[str]:
        """Live keys matching the glob ``pattern`` (all when None), sorted."""
        ...

    async def incr_notify(self, key: str, amount: int, ttl: float | None) -> tuple[int, bool]:
        """Add ``amount`` to the integer at ``key`` (0 when missing); return the result (and
        whether to tell other instances, as every write does)."""
        ...
