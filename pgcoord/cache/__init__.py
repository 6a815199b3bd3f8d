"""The cache service: named caches on an UNLOGGED Postgres table (or in memory), with TTLs,
a batched sweeper, single-flight ``wrap`` across the cluster and an opt-in near cache.

See ``docs/cache.md`` for guarantees and trade-offs.
"""

from __future__ import annotations

from pgcoord.cache.cache import Cache
from pgcoord.cache.manager import CacheManager
from pgcoord.cache.serializer import CacheSerializer, JsonCacheSerializer

__all__ = ["Cache", "CacheManager", "CacheSerializer", "JsonCacheSerializer"]
