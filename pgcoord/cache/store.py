"""What a cache store does: keep encoded values (text) with optional expiry, per namespace."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Store(Protocol):
    """A backend of :class:`~pgcoord.cache.Cache`; values arrive already encoded as text."""

    async def get(self, key: str) -> str | None:
        """The live value of ``key``, or None."""
        ...

    async def get_with_ttl(self, key: str) -> tuple[str, float | None] | None:
        """The live value and its seconds left (None: never expires), or None when missing."""
        ...

    async def mget(self, keys: Sequence[str]) -> dict[str, str]:
        """The live values of those ``keys`` that exist."""
        ...

    async def set(self, key: str, text: str, ttl: float | None) -> None:
        """Store ``text`` under ``key`` for ``ttl`` seconds (None: no expiry)."""
        ...

    async def mset(self, items: Sequence[tuple[str, str]], ttl: float | None) -> None:
        """Store every (key, text) pair (keys are distinct)."""
        ...

    async def mdel(self, keys: Sequence[str]) -> None:
        """Remove ``keys`` (missing ones are ignored)."""
        ...

    async def reset(self) -> None:
        """Remove every key of this namespace."""
        ...

    async def ttl(self, key: str) -> float | None:
        """Seconds left; None when missing or never expiring."""
        ...

    async def keys(self, pattern: str | None) -> list[str]:
        """Live keys matching the glob ``pattern`` (all when None), sorted."""
        ...

    async def incr(self, key: str, amount: int, ttl: float | None) -> int:
        """Add ``amount`` to the integer at ``key`` (0 when missing) and return the result."""
        ...
