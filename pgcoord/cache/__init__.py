"""The CacheManager service (being built)."""

from __future__ import annotations

from typing import Any

from pgcoord.runtime import Service


class CacheManager(Service):
    """CacheManager: see DESIGN.md for its API."""

    @property
    def default_cache(self) -> Any:
        """The cache named after the app (``coord.cache``)."""
        raise NotImplementedError


__all__ = ["CacheManager"]
