"""``Cache``: one named cache (a key namespace) on a store, with optional near cache."""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

from pgcoord.cache.near import MISSING, NearCache
from pgcoord.cache.serializer import CacheSerializer, check_size
from pgcoord.cache.store import Store
from pgcoord.errors import InvalidInputError, InvalidTypeError
from pgcoord.validation import (
    check_callable,
    check_int,
    check_key,
    check_optional_positive,
    storable,
)


def check_ttl(value: object, what: str = "ttl") -> float | None:
    """A ttl argument: None (not given), or seconds > 0; ``math.inf`` is returned as-is and
    means "never expires" (the caller turns it into no expiry; the server never sees it)."""
    return check_optional_positive(value, what)


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async callback and return its result."""
    result = fn(*args)
    if inspect.isawaitable(result):
        return await result
    return result


class CacheHost(Protocol):
    """What a :class:`Cache` needs from the manager that made it (``CacheManager`` implements
    it with a port object), so a cache reaches none of the manager's internals."""

    def near_usable(self, ns: str) -> bool:
        """May near caches of ``ns`` serve now (LISTEN up, no reconnect unseen, this instance's
        registration of ``ns`` confirmed)? No I/O: the fast path of every near-cache read."""

    async def near_ready(self, ns: str) -> bool:
        """Like :meth:`near_usable`, but first registers ``ns`` when that is what is missing."""

    async def invalidate(self, ns: str, keys: list[str], remote: bool) -> None:
        """Drop ``keys`` of namespace ``ns`` from this process's near caches and, when
        ``remote``, from every other instance's."""

    async def invalidate_ns(self, ns: str, remote: bool) -> None:
        """Drop namespace ``ns`` from this process's near caches and, when ``remote``, from
        every other instance's."""

    async def single_flight(
        self, cache: Cache, key: str, fn: Callable[[], Any], ttl: float | None
    ) -> Any:
        """Compute ``key`` once across the cluster (``wrap``)."""


class Cache:
    """A named cache; made by :meth:`CacheManager.create_cache`. Every DB method is a coroutine.

    Keys are non-empty ``str`` of at most 255 characters, stored under this cache's ``prefix``
    (two caches with different prefixes never see each other's keys). Values are JSON data by
    default (see ``serializer``). ``ttl`` arguments are seconds (> 0); ``None`` falls back to
    the cache's default ``ttl``, and with neither the entry never expires; ``math.inf`` means
    "never expires" whatever the default.

    Every write drops the key from the near caches of its prefix, in this process at once and
    in other instances by NOTIFY, whether or not this cache has a near cache itself.
    """

    def __init__(
        self,
        manager: CacheHost,
        *,
        name: str,
        prefix: str,
        ns: str,
        store_kind: str,
        store: Store,
        ttl: float | None,
        serializer: CacheSerializer,
        max_value_bytes: int,
        max_entries: int | None,
        near: NearCache | None,
    ) -> None:
        self._manager = manager
        self.name = name
        self.prefix = prefix
        self.ns = ns
        self.store_kind = store_kind
        self.default_ttl = ttl
        self.serializer = serializer
        self.max_value_bytes = max_value_bytes
        self.max_entries = max_entries
        self._store = store
        self._near = near

    def __repr__(self) -> str:
        return f"<pgcoord.Cache {self.name!r} prefix={self.prefix!r} store={self.store_kind}>"

    @property
    def local_ttl(self) -> float | None:
        """The near cache's entry lifetime (None: no near cache)."""
        return None if self._near is None else self._near.local_ttl

    # -- helpers ---------------------------------------------------------------------------

    def _ttl(self, ttl: object) -> float | None:
        checked = check_ttl(ttl)
        if checked is None:
            return self.default_ttl
        return None if math.isinf(checked) else checked

    def _encode(self, key: str, value: Any) -> str:
        text = self.serializer.dumps(value)
        if not isinstance(text, str):
            raise InvalidTypeError(
                f"the cache serializer's dumps() returned {type(text).__name__}, not str"
            )
        if storable(text) != text:
            # Postgres text holds neither NUL nor surrogate code units (psycopg would raise a
            # raw UnicodeEncodeError or DataError mid-write). Refused on the memory store too,
            # so both stores accept the same values.
            raise InvalidInputError(
                f"the cache serializer's dumps() returned text for key {key!r} holding NUL or a "
                "surrogate code unit, which Postgres text cannot store; make it escape them "
                "(json.dumps does with the default ensure_ascii=True)"
            )
        check_size(text, self.max_value_bytes, key)
        return text

    async def _lookup(self, key: str) -> Any:
        """The decoded value or MISSING; the near cache first when it may serve."""
        near = self._near
        if near is None or not (
            self._manager.near_usable(self.ns) or await self._manager.near_ready(self.ns)
        ):
            text = await self._store.get(key)
            return MISSING if text is None else self.serializer.loads(text)
        value = near.get(key)
        if value is not MISSING:
            return value
        token = near.begin_read(key)
        found: tuple[str, float | None] | None = None
        decoded: Any = MISSING
        try:
            found = await self._store.get_with_ttl(key)
            if found is not None:
                decoded = self.serializer.loads(found[0])
        finally:
            if found is None:
                near.end_read(key, token, None)
            else:
                near.end_read(key, token, found[0], decoded, found[1])
        return decoded

    async def _changed(self, keys: Iterable[str], remote: bool) -> None:
        """After a write: drop this process's copies of ``keys`` (any cache of the prefix may
        hold them) and, when the write found another instance near-caching the prefix, tell it.
        """
        await self._manager.invalidate(self.ns, list(keys), remote)

    # -- the API ---------------------------------------------------------------------------

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored at ``key``, or ``default`` when missing or expired."""
        check_key(key)
        value = await self._lookup(key)
        return default if value is MISSING else value

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` at ``key`` for ``ttl`` seconds (default: the cache's ttl)."""
        check_key(key)
        await self._put(key, value, self._ttl(ttl))

    async def _put(self, key: str, value: Any, seconds: float | None) -> None:
        """Store a value for ``seconds`` as resolved by :meth:`_ttl` (None: never expires)."""
        text = self._encode(key, value)
        remote = await self._store.set(key, text, seconds)
        await self._changed((key,), remote)

    async def delete(self, key: str) -> None:
        """Remove ``key`` (no error when it is missing)."""
        check_key(key)
        remote = await self._store.mdel((key,))
        await self._changed((key,), remote)

    async def mget(self, *keys: str) -> list[Any]:
        """The values of ``keys`` in order (None for each missing key)."""
        for key in keys:
            check_key(key)
        if not keys:
            return []
        near = self._near
        local: dict[str, Any] = {}
        if near is not None and (
            self._manager.near_usable(self.ns) or await self._manager.near_ready(self.ns)
        ):
            # Near-cache hits are served locally; the rest come in one statement and are not
            # stored in the near cache (only get() populates it, with its race rules).
            for key in keys:
                value = near.get(key)
                if value is not MISSING:
                    local[key] = value
        wanted = [key for key in dict.fromkeys(keys) if key not in local]
        found = await self._store.mget(wanted) if wanted else {}
        loads = self.serializer.loads
        return [
            local[key] if key in local else loads(found[key]) if key in found else None
            for key in keys
        ]

    async def mset(
        self, pairs: Mapping[str, Any] | Iterable[tuple[str, Any]], ttl: float | None = None
    ) -> None:
        """Store several values at once (one statement); a later duplicate key wins."""
        seconds = self._ttl(ttl)
        items = pairs.items() if isinstance(pairs, Mapping) else pairs
        encoded: dict[str, str] = {}
        for item in items:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise InvalidTypeError("mset takes a mapping or an iterable of (key, value) pairs")
            key = check_key(item[0])
            encoded[key] = self._encode(key, item[1])
        if not encoded:
            return
        remote = await self._store.mset(list(encoded.items()), seconds)
        await self._changed(encoded, remote)

    async def mdel(self, *keys: str) -> None:
        """Remove several keys at once."""
        for key in keys:
            check_key(key)
        if not keys:
            return
        unique = list(dict.fromkeys(keys))
        remote = await self._store.mdel(unique)
        await self._changed(unique, remote)

    async def reset(self) -> None:
        """Remove every key of this cache (its prefix) — and nothing of any other cache."""
        remote = await self._store.reset()
        await self._manager.invalidate_ns(self.ns, remote)

    async def ttl(self, key: str) -> float | None:
        """Seconds ``key`` has left; None when it is missing or never expires."""
        check_key(key)
        return await self._store.ttl(key)

    async def keys(self, pattern: str | None = None) -> list[str]:
        """Live keys (without the prefix), sorted; ``pattern`` is a glob with ``*`` and ``?``."""
        if pattern is not None and not isinstance(pattern, str):
            raise InvalidTypeError(f"pattern must be a str or None, not {type(pattern).__name__}")
        if pattern is not None and storable(pattern) != pattern:
            # No stored key holds NUL or a surrogate (check_key refuses them), and Postgres
            # could not even take such a pattern: refuse it like such a key.
            raise InvalidInputError(
                f"pattern {pattern!a} holds NUL or a surrogate code unit, which no key can hold"
            )
        return await self._store.keys(pattern)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Atomically add ``amount`` to the integer at ``key`` (missing: 0); return the result.

        ``ttl`` (else the cache's default) applies when the key is created (or had expired);
        an existing key keeps its expiry, as a fixed-window counter needs.
        """
        check_key(key)
        check_int(amount, "amount")
        if not -(2**63) <= amount < 2**63:
            # Both stores keep 64-bit integers (Postgres bigint): refuse before any I/O, so the
            # memory store cannot accept an amount the Postgres store would refuse.
            raise InvalidInputError(f"amount {amount} does not fit 64 bits")
        seconds = self._ttl(ttl)
        result, remote = await self._store.incr_notify(key, amount, seconds)
        await self._changed((key,), remote)
        return result

    async def wrap(
        self,
        key: str,
        fn: Callable[[], Any] | Callable[[], Awaitable[Any]],
        ttl: float | None = None,
    ) -> Any:
        """The value at ``key``; when missing, ``fn()`` computes it once across the cluster.

        Concurrent callers (in this process and in every other instance) of a cold key wait for
        one computation and all get its value. If ``fn`` raises, the error reaches the callers
        waiting on that computation and nothing is cached. A stored ``None`` is a hit. A waiter
        in another instance computes the value itself after ``cache_wrap_timeout`` seconds
        (default 30), so a frozen leader cannot hang the cluster.
        """
        check_key(key)
        check_callable(fn, "fn")
        seconds = self._ttl(ttl)
        value = await self._lookup(key)
        if value is not MISSING:
            return value
        return await self._manager.single_flight(self, key, fn, seconds)

    async def _compute(self, key: str, fn: Callable[[], Any], ttl: float | None) -> Any:
        """Run ``fn`` and store its value (the caller holds the key's single-flight rights)."""
        value = await call(fn)
        await self._put(key, value, ttl)
        return value

    async def wrap_with_condition(
        self,
        key: str,
        fn: Callable[[], Any] | Callable[[], Awaitable[Any]],
        *,
        use_cache: bool = True,
        is_cacheable: Callable[[Any], Any] | None = None,
        ttl: float | None = None,
    ) -> Any:
        """The model platform's conditional wrap.

        ``use_cache=False``: just ``fn()``. Otherwise a cached *truthy* value is returned (a
        falsy one — None, False, 0, "", [], {} — counts as a miss); on a miss ``fn()`` runs and
        its result is stored when ``is_cacheable(result)`` is truthy or, with no predicate,
        when the result itself is truthy. Python truthiness decides (so ``[]``/``{}`` are falsy,
        unlike in JavaScript). Not single-flight: use :meth:`wrap` for that.
        """
        check_key(key)
        check_callable(fn, "fn")
        if is_cacheable is not None:
            check_callable(is_cacheable, "is_cacheable")
        seconds = self._ttl(ttl)
        if not use_cache:
            return await call(fn)
        value = await self._lookup(key)
        if value is not MISSING and value:
            return value
        result = await call(fn)
        cacheable = result if is_cacheable is None else await call(is_cacheable, result)
        if cacheable:
            await self._put(key, result, seconds)
        return result
