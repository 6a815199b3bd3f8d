"""Bad input: a clear typed error, and nothing written."""

from __future__ import annotations

import math
from typing import Any

import psycopg
import pytest

import pgcoord


def _rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pgcoord.cache_entries").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (object(), TypeError),
        ({1: "int key"}, TypeError),
        ((1, 2), TypeError),
        ({"nested": {"set"}}, TypeError),
        (math.nan, ValueError),
        (b"bytes", TypeError),
    ],
)
async def test_non_json_values_are_refused_before_writing(
    coord: pgcoord.Coordinator, dsn: str, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await coord.cache.set("k", value)
    with pytest.raises(error):
        await coord.cache.mset({"ok": 1, "bad": value})
    with pytest.raises(error):
        await coord.cache.wrap("w", lambda: value)
    assert _rows(dsn) == 0


@pytest.mark.parametrize(
    ("key", "error"), [("", ValueError), (1, TypeError), (None, TypeError), ("x" * 256, ValueError)]
)
async def test_bad_keys(
    coord: pgcoord.Coordinator, dsn: str, key: Any, error: type[Exception]
) -> None:
    cache = coord.cache
    for call in (
        lambda: cache.get(key),
        lambda: cache.set(key, 1),
        lambda: cache.delete(key),
        lambda: cache.mget("ok", key),
        lambda: cache.mset([("ok", 1), (key, 1)]),
        lambda: cache.mdel(key),
        lambda: cache.ttl(key),
        lambda: cache.incr(key),
        lambda: cache.wrap(key, lambda: 1),
    ):
        with pytest.raises(error):
            await call()
    assert _rows(dsn) == 0


@pytest.mark.parametrize("ttl", [0, -1, math.nan])
async def test_bad_ttls(coord: pgcoord.Coordinator, dsn: str, ttl: float) -> None:
    cache = coord.cache
    with pytest.raises(ValueError):
        await cache.set("k", 1, ttl=ttl)
    with pytest.raises(ValueError):
        await cache.mset({"k": 1}, ttl=ttl)
    with pytest.raises(ValueError):
        await cache.incr("k", ttl=ttl)
    with pytest.raises(ValueError):
        coord.cache_manager.create_cache("c", ttl=ttl)
    with pytest.raises(ValueError):
        coord.cache_manager.create_cache("c", local_ttl=ttl)
    assert _rows(dsn) == 0


async def test_other_bad_arguments(coord: pgcoord.Coordinator) -> None:
    manager = coord.cache_manager
    with pytest.raises(ValueError, match="store"):
        manager.create_cache("c", store="redis")
    with pytest.raises(ValueError):
        manager.create_cache("", store="memory")
    with pytest.raises(TypeError):
        manager.create_cache("c", serializer=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        manager.create_cache("c", store="memory", local_ttl=1)
    with pytest.raises(TypeError):
        await coord.cache.wrap("k", "not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await coord.cache.incr("k", "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await coord.cache.keys(1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await coord.cache.mset([("a", 1, 2)])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        await coord.cache.ttl(b"k")  # type: ignore[arg-type]


def test_bad_options_are_refused_at_construction() -> None:
    with pytest.raises(ValueError):
        pgcoord.Coordinator("postgresql://127.0.0.1:1/x", cache_sweep_interval=0)
    with pytest.raises(ValueError):
        pgcoord.Coordinator("postgresql://127.0.0.1:1/x", cache_max_entries=0)


async def test_not_running_is_a_clear_error() -> None:
    coord = pgcoord.Coordinator("postgresql://127.0.0.1:1/x")
    with pytest.raises(pgcoord.NotRunningError):
        await coord.cache.get("k")
