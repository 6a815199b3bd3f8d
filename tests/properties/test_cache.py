"""Properties of the cache over generated input, on the postgres store, the memory store and a
postgres store with a near cache.

The property of every call: a typed error (InvalidInputError / InvalidTypeError) raised before
anything is written (the cache's listing and the whole ``cache_entries`` table unchanged), or
success with an exact round trip (the value read back has the same types all the way down).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

import pgcoord
from pgcoord.cache.cache import Cache
from tests.properties import strategies as gen
from tests.properties.strategies import assert_same, outcome

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]

STORES = ["postgres", "memory", "near"]
_MISSING = object()
#: An entry written with a shorter ttl may have expired before it is read back.
_SHORT_TTL = 60.0


#: Known defects (the lead removes an entry once its fix lands; strict: a fixed one fails).
def per_store(*examples: tuple[str, tuple[Any, ...], dict[str, str]]) -> list[Any]:
    """``pytest.param(store, *args)`` for each store; an entry of the dict marks that store's
    case as a known failure (strict xfail, with the dict's reason)."""
    params = []
    for name, args, fails in examples:
        for store in STORES:
            reason = fails.get(store)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(store, *args, id=f"{name}-{store}", marks=marks))
    return params


def failing(reason: str, stores: list[str] | None = None) -> dict[str, str]:
    """The stores (default: every one) on which an example fails today, and why."""
    return dict.fromkeys(STORES if stores is None else stores, reason)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def caches(module_coord: pgcoord.Coordinator) -> dict[str, Cache]:
    """One cache per store kind, each with its own prefix."""
    manager = module_coord.cache_manager
    return {
        "postgres": manager.create_cache("prop_pg"),
        "memory": manager.create_cache("prop_mem", store="memory"),
        "near": manager.create_cache("prop_near", local_ttl=600.0),
    }


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """The table's rows (with their expiry) and the cache's listing, as of ``taken_at``.

    Two snapshots compare equal when they hold the same rows, leaving out rows that had
    expired before the earlier of the two was taken: the cache counts those as absent, and any
    instance's sweeper may delete them at any moment (an earlier example's short-lived rows).
    """

    rows: list[tuple[Any, ...]]
    listing: list[tuple[str, str]]
    taken_at: datetime.datetime

    def _live(self, since: datetime.datetime) -> list[tuple[Any, ...]]:
        return [row for row in self.rows if row[3] is None or row[3] > since]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Snapshot):
            return NotImplemented
        since = min(self.taken_at, other.taken_at)
        return (self._live(since), self.listing) == (other._live(since), other.listing)

    def __hash__(self) -> int:
        raise TypeError("snapshots are compared, not hashed")


async def _state(cache: Cache, db: psycopg.AsyncConnection[Any]) -> _Snapshot:
    """What a refused call must leave unchanged: the whole table, and the cache's listing."""
    [(taken_at,)] = await gen.table(db, "SELECT clock_timestamp()")
    listed = await cache.keys()
    values = await cache.mget(*listed)
    everything = await gen.table(
        db,
        # Near-cache registrations are left out: one may commit in the background (the first
        # read of a near cache starts it) between two snapshots.
        "SELECT ns, key, value, expires_at FROM pgcoord.cache_entries"
        " WHERE ns NOT LIKE '%;near:%' ORDER BY ns, key",
    )
    return _Snapshot(everything, list(zip(listed, map(ascii, values), strict=True)), taken_at)


def _effective_ttl(cache: Cache, ttl: Any) -> float | None:
    return cache.default_ttl if ttl is None else float(ttl)


async def _check_read_back(cache: Cache, key: str, want: Any, ttl: float | None) -> None:
    got = await cache.get(key, _MISSING)
    if got is _MISSING and ttl is not None and ttl < _SHORT_TTL:
        return  # expired already: a short ttl is allowed to
    assert got is not _MISSING, f"set({key!a}) succeeded but get() finds nothing"
    assert_same(got, want)
    [many] = await cache.mget(key)
    if many is not None or ttl is None or ttl >= _SHORT_TTL:
        assert_same(many, want, "mget value")
    left = await cache.ttl(key)
    if ttl is None or math.isinf(ttl):
        assert left is None, f"ttl={ttl!r}: ttl() should be None (never expires), got {left!r}"
    elif left is not None:
        assert isinstance(left, float)
        assert 0 < left <= ttl + 1.0, f"ttl={ttl!r} but ttl() says {left!r} s left"


# -- set / get ---------------------------------------------------------------------------------


async def check_set(
    cache: Cache, db: psycopg.AsyncConnection[Any], key: Any, value: Any, ttl: Any
) -> None:
    """set(key, value, ttl): refused before writing, or read back exactly."""
    await cache.reset()
    before = await _state(cache, db)
    done, _ = await outcome(cache.set(key, value, ttl=ttl))
    if not done:
        assert await _state(cache, db) == before, "a refused set() wrote something"
        return
    await _check_read_back(cache, key, value, _effective_ttl(cache, ttl))


@pytest.mark.parametrize("store", STORES)
@gen.DB_SETTINGS
@given(key=gen.names, value=gen.values, ttl=st.one_of(st.none(), gen.numbers_or_junk))
async def test_set_round_trips_or_refuses_before_writing(
    caches: dict[str, Cache],
    db: psycopg.AsyncConnection[Any],
    store: str,
    key: Any,
    value: Any,
    ttl: Any,
) -> None:
    await check_set(caches[store], db, key, value, ttl)


_SET_EXAMPLES = per_store(
    ("true-stays-a-bool", ("k", True, None), {}),
    ("nested-types", ("k", {"a": [1, 1.0, -0.0, None, "x"]}, None), {}),
    ("nul-and-lone-surrogate-value", ("k", "\x00\ud800e\u0301", None), {}),
    ("odd-dict-key", ("k", {"\x00\udfff": 1}, None), {}),
    ("split-pair-value", ("k", "\ud83d\ude00", None), {}),
    ("int-past-64-bits", ("k", 2**64, None), {}),
    ("nan-value", ("k", math.nan, None), {}),
    ("too-deep", ("k", gen.deeply_nested(250), None), {}),
    ("nul-key", ("a\x00b", 1, None), {}),
    ("surrogate-key", ("\ud800", 1, None), {}),
    ("255-key", ("x" * 255, 1, None), {}),
    ("256-key", ("x" * 256, 1, None), {}),
    ("huge-int-ttl", ("k", 1, 10**400), {}),
    ("1e300-ttl", ("k", 1, 1e300), {}),
    ("bool-ttl", ("k", 1, True), {}),
    ("negative-zero-ttl", ("k", 1, -0.0), {}),
    ("inf-ttl", ("k", 1, math.inf), {}),  # issue 11 defect 10: inf means no expiry
)


@pytest.mark.parametrize(("store", "key", "value", "ttl"), _SET_EXAMPLES)
async def test_set_examples(
    caches: dict[str, Cache],
    db: psycopg.AsyncConnection[Any],
    store: str,
    key: Any,
    value: Any,
    ttl: Any,
) -> None:
    await check_set(caches[store], db, key, value, ttl)


# -- mset / mget -------------------------------------------------------------------------------


async def check_mset(
    cache: Cache,
    db: psycopg.AsyncConnection[Any],
    pairs: list[tuple[Any, Any]],
    as_mapping: bool,
    ttl: Any,
) -> None:
    """mset(pairs, ttl): all or nothing; a later duplicate key wins."""
    await cache.reset()
    await cache.set("untouched", "before")
    before = await _state(cache, db)
    argument: Any = pairs
    if as_mapping:
        try:
            argument = dict(pairs)
        except TypeError:
            argument = pairs  # an unhashable key: keep the pair form
    done, _ = await outcome(cache.mset(argument, ttl=ttl))
    if not done:
        assert await _state(cache, db) == before, "a refused mset() wrote something (half-written)"
        return
    want = dict(argument.items() if isinstance(argument, dict) else argument)
    seconds = _effective_ttl(cache, ttl)
    for key, value in want.items():
        await _check_read_back(cache, key, value, seconds)
    if "untouched" not in want:
        assert await cache.get("untouched") == "before"


@pytest.mark.parametrize("store", STORES)
@gen.DB_SETTINGS
@given(
    pairs=st.lists(st.tuples(gen.names, gen.values), max_size=4),
    as_mapping=st.booleans(),
    ttl=st.one_of(st.none(), gen.numbers_or_junk),
)
async def test_mset_is_all_or_nothing(
    caches: dict[str, Cache],
    db: psycopg.AsyncConnection[Any],
    store: str,
    pairs: list[tuple[Any, Any]],
    as_mapping: bool,
    ttl: Any,
) -> None:
    await check_mset(caches[store], db, pairs, as_mapping, ttl)


@pytest.mark.parametrize(
    ("store", "pairs", "ttl"),
    per_store(
        ("second-key-nul", ([("a", 1), ("b\x00", 2)], None), {}),
        ("second-value-not-json", ([("a", 1), ("b", {1, 2})], None), {}),
        ("duplicate-key-last-wins", ([("a", 1), ("a", True)], None), {}),
        ("second-key-surrogate", ([("a", 1), ("\ud800", 2)], None), {}),
        ("huge-ttl", ([("a", 1)], 10**400), {}),
        ("inf-ttl", ([("a", 1)], math.inf), {}),
    ),
)
async def test_mset_examples(
    caches: dict[str, Cache],
    db: psycopg.AsyncConnection[Any],
    store: str,
    pairs: list[tuple[Any, Any]],
    ttl: Any,
) -> None:
    await check_mset(caches[store], db, pairs, False, ttl)


# -- delete / mdel / get / mget / ttl / has with any key -------------------------------------


async def check_reads_and_deletes(
    cache: Cache, db: psycopg.AsyncConnection[Any], keys: list[Any]
) -> None:
    """get/mget/ttl/delete/mdel with any keys: a typed error with nothing removed, or the keys
    gone and every other key kept."""
    await cache.reset()
    await cache.mset({"keep0": 0, "keep1": [1]})
    for key in keys:
        if isinstance(key, str):
            await outcome(cache.set(key, "present"))  # may be refused: that is checked elsewhere
    before = await _state(cache, db)
    for read in (cache.get, cache.ttl):
        for key in keys:
            await outcome(read(key))
    await outcome(cache.mget(*keys))
    assert await _state(cache, db) == before, "a read changed the cache"
    done, _ = await outcome(cache.mdel(*keys))
    if not done:
        assert await _state(cache, db) == before, "a refused mdel() removed something"
    else:
        for key in keys:
            assert await cache.get(key, _MISSING) is _MISSING, f"mdel left {key!a}"
    for key in keys:
        done, _ = await outcome(cache.delete(key))
        if done:
            assert await cache.get(key, _MISSING) is _MISSING
    assert await cache.mget("keep0", "keep1") == [0, [1]], "deleting other keys removed these"


@pytest.mark.parametrize("store", STORES)
@gen.DB_SETTINGS
@given(keys=st.lists(gen.names, max_size=3))
async def test_reads_and_deletes_with_any_key(
    caches: dict[str, Cache], db: psycopg.AsyncConnection[Any], store: str, keys: list[Any]
) -> None:
    await check_reads_and_deletes(caches[store], db, keys)


# -- keys(pattern) -------------------------------------------------------------------------------


async def check_keys(cache: Cache, store: str, pattern: Any) -> None:
    """keys(pattern) with any pattern: a typed error, or exactly the live keys the glob
    (``*`` any run, ``?`` one character, everything else literal) matches, sorted."""
    await cache.reset()
    stored = ["a*b", "a?b", "a%b", "a_b", "ab", "x\\y", "é\U0001f600", "\U0001f600"]
    await cache.mset(dict.fromkeys(stored, 1))
    done, listed = await outcome(cache.keys(pattern))
    if not done:
        return
    assert isinstance(listed, list)
    assert all(isinstance(k, str) for k in listed)
    assert listed == sorted(listed), f"keys() not sorted: {listed!a}"
    if pattern is None:
        assert listed == sorted(stored)
    elif "\\" not in pattern:  # how a backslash reads in a glob is not in the contract
        glob = re.compile(
            "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
            re.DOTALL,
        )
        want = sorted(k for k in stored if glob.fullmatch(k))
        assert listed == want, f"keys({pattern!a}) listed {listed!a}, expected {want!a}"


@pytest.mark.parametrize("store", STORES)
@gen.DB_SETTINGS
@given(pattern=st.one_of(st.none(), gen.names))
async def test_keys_with_any_pattern(caches: dict[str, Cache], store: str, pattern: Any) -> None:
    await check_keys(caches[store], store, pattern)


@pytest.mark.parametrize(
    ("store", "pattern"),
    per_store(
        ("nul", ("\x00",), {}),
        ("surrogate", ("a\ud800*",), {}),
        ("like-metacharacters", ("a%b",), {}),
        ("underscore", ("a_b",), {}),
        ("backslash", ("x\\y",), {}),
        ("star", ("a*",), {}),
    ),
)
async def test_keys_examples(caches: dict[str, Cache], store: str, pattern: Any) -> None:
    await check_keys(caches[store], store, pattern)


# -- incr ----------------------------------------------------------------------------------------


async def check_incr(
    cache: Cache, db: psycopg.AsyncConnection[Any], prior: Any, amount: Any, ttl: Any
) -> None:
    """incr(key, amount, ttl) on a missing key or any prior value: the exact int sum when the
    prior value is an int and the sum fits 64 bits, else a typed error and nothing changed."""
    await cache.reset()
    if prior is not _MISSING:
        stored, _ = await outcome(cache.set("n", prior))
        prior = prior if stored else _MISSING
    before = await _state(cache, db)
    done, result = await outcome(cache.incr("n", amount, ttl=ttl))
    base = 0 if prior is _MISSING else prior
    fits = (
        all(
            isinstance(n, int) and not isinstance(n, bool) and -(2**63) <= n < 2**63
            for n in (base, amount)
        )
        and -(2**63) <= base + amount < 2**63
    )
    if not done:
        assert await _state(cache, db) == before, "a refused incr() wrote something"
        if fits and ttl is None:
            raise AssertionError(f"incr({amount!a}) on {prior!a} refused: {result}")
        return
    # A prior value past 64 bits may be refused even when the sum fits (the postgres store
    # reads it as a bigint), but whatever succeeds must be an exact sum that fits 64 bits.
    exact = (
        not isinstance(amount, bool)
        and isinstance(amount, int)
        and not isinstance(base, bool)
        and isinstance(base, int)
        and -(2**63) <= base + amount < 2**63
    )
    assert exact, f"incr({amount!a}) on {prior!a} succeeded with {result!a}"
    assert_same(result, base + amount, "incr result")
    got = await cache.get("n", _MISSING)
    seconds = _effective_ttl(cache, ttl) if prior is _MISSING else None
    if got is _MISSING and seconds is not None and seconds < _SHORT_TTL:
        return
    assert_same(got, base + amount, "incremented value")


@pytest.mark.parametrize("store", STORES)
@gen.DB_SETTINGS
@given(
    prior=st.one_of(st.just(_MISSING), st.integers(), gen.values),
    amount=gen.numbers_or_junk,
    ttl=st.one_of(st.none(), st.none(), gen.numbers_or_junk),
)
async def test_incr_sums_exactly_or_refuses(
    caches: dict[str, Cache],
    db: psycopg.AsyncConnection[Any],
    store: str,
    prior: Any,
    amount: Any,
    ttl: Any,
) -> None:
    await check_incr(caches[store], db, prior, amount, ttl)


@pytest.mark.parametrize(
    ("store", "prior", "amount"),
    per_store(
        ("missing-key-amount-past-int64", (_MISSING, 2**63), {}),
        ("missing-key-huge-amount", (_MISSING, 10**400), {}),
        ("overflow", (2**63 - 1, 1), {}),
        ("prior-past-int64-sum-fits", (2**63, -1), {}),
        ("prior-bool", (True, 1), {}),
        ("prior-float", (1.0, 1), {}),
        ("prior-str", ("1", 1), {}),
        ("bool-amount", (1, True), {}),
        ("float-amount", (1, 1.0), {}),
    ),
)
async def test_incr_examples(
    caches: dict[str, Cache], db: psycopg.AsyncConnection[Any], store: str, prior: Any, amount: Any
) -> None:
    await check_incr(caches[store], db, prior, amount, None)


# -- wrap / wrap_with_condition -----------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
@gen.DB_SETTINGS
@given(key=gen.names, value=gen.values, ttl=st.one_of(st.none(), gen.numbers_or_junk))
async def test_wrap_returns_and_caches_exactly_or_refuses(
    caches: dict[str, Cache],
    db: psycopg.AsyncConnection[Any],
    store: str,
    key: Any,
    value: Any,
    ttl: Any,
) -> None:
    cache = caches[store]
    await cache.reset()
    before = await _state(cache, db)
    calls: list[None] = []

    def compute() -> Any:
        calls.append(None)
        return value

    done, result = await outcome(cache.wrap(key, compute, ttl=ttl))
    if not done:
        assert await _state(cache, db) == before, "a refused wrap() cached something"
        return
    assert len(calls) == 1
    assert_same(result, value, "wrap result")
    await _check_read_back(cache, key, value, _effective_ttl(cache, ttl))
    done, again = await outcome(cache.wrap(key, compute, ttl=ttl))
    assert done
    assert_same(again, value, "second wrap result")


@pytest.mark.parametrize("store", STORES)
@gen.DB_SETTINGS
@given(key=gen.names, value=gen.values, use_cache=st.booleans())
async def test_wrap_with_condition_caches_exactly_or_refuses(
    caches: dict[str, Cache],
    db: psycopg.AsyncConnection[Any],
    store: str,
    key: Any,
    value: Any,
    use_cache: bool,
) -> None:
    cache = caches[store]
    await cache.reset()
    before = await _state(cache, db)
    done, result = await outcome(
        cache.wrap_with_condition(key, lambda: value, use_cache=use_cache, is_cacheable=bool)
    )
    if not done:
        assert await _state(cache, db) == before, "a refused wrap_with_condition() cached something"
        return
    assert_same(result, value, "wrap_with_condition result")
    if use_cache and value:
        await _check_read_back(cache, key, value, cache.default_ttl)
    else:
        assert await _state(cache, db) == before, "an uncacheable result was cached"


# -- the additions of 2026-12-01 (add, touch, has, get_or_set, *_value_in_object) --------------


def _needs(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not hasattr(Cache, name),
        reason=f"Cache.{name} is not implemented yet (DESIGN.md additions)",
    )


@_needs("add")
@pytest.mark.parametrize("store", STORES)
@gen.DB_SETTINGS
@given(key=gen.names, value=gen.values, ttl=st.one_of(st.none(), gen.numbers_or_junk))
async def test_add_stores_once_exactly_or_refuses(
    caches: dict[str, Cache],
    db: psycopg.AsyncConnection[Any],
    store: str,
    key: Any,
    value: Any,
    ttl: Any,
) -> None:
    cache: Any = caches[store]
    await cache.reset()
    before = await _state(cache, db)
    done, added = await outcome(cache.add(key, value, ttl=ttl))
    if not done:
        assert await _state(cache, db) == before, "a refused add() wrote something"
        return
    assert added is True
    await _check_read_back(cache, key, value, _effective_ttl(cache, ttl))
    seconds = _effective_ttl(cache, ttl)
    if seconds is None or seconds >= _SHORT_TTL:
        done, again = await outcome(cache.add(key, "other", ttl=ttl))
        assert done
        assert again is False
        assert_same(await cache.get(key), value, "value after a second add")


@_needs("has")
@pytest.mark.parametrize("store", STORES)
@gen.DB_SETTINGS
@given(key=gen.names, value=gen.values)
async def test_has_tells_exactly_or_refuses(
    caches: dict[str, Cache],
    db: psycopg.AsyncConnection[Any],
    store: str,
    key: Any,
    value: Any,
) -> None:
    cache: Any = caches[store]
    await cache.reset()
    done, found = await outcome(cache.has(key))
    if not done:
        return
    assert found is False
    stored, _ = await outcome(cache.set(key, value))
    assert (await cache.has(key)) is stored


@_needs("touch")
@pytest.mark.parametrize("store", STORES)
@gen.DB_SETTINGS
@given(key=gen.names, ttl=gen.numbers_or_junk)
async def test_touch_sets_the_ttl_or_refuses_before_writing(
    caches: dict[str, Cache], db: psycopg.AsyncConnection[Any], store: str, key: Any, ttl: Any
) -> None:
    cache: Any = caches[store]
    await cache.reset()
    stored, _ = await outcome(cache.set(key, "v"))
    before = await _state(cache, db)
    done, touched = await outcome(cache.touch(key, ttl))
    if not done:
        assert await _state(cache, db) == before, "a refused touch() changed something"
        return
    assert touched is stored
    if stored and float(ttl) >= _SHORT_TTL:
        assert await cache.get(key) == "v"
        left = await cache.ttl(key)
        if math.isinf(float(ttl)):
            assert left is None
        else:
            assert left is not None
            assert 0 < left <= float(ttl) + 1.0


@_needs("get_or_set")
@pytest.mark.parametrize("store", STORES)
@gen.DB_SETTINGS
@given(key=gen.names, value=gen.values, ttl=st.one_of(st.none(), gen.numbers_or_junk))
async def test_get_or_set_round_trips_or_refuses(
    caches: dict[str, Cache],
    db: psycopg.AsyncConnection[Any],
    store: str,
    key: Any,
    value: Any,
    ttl: Any,
) -> None:
    cache: Any = caches[store]
    await cache.reset()
    before = await _state(cache, db)
    done, got = await outcome(cache.get_or_set(key, value, ttl=ttl))
    if not done:
        assert await _state(cache, db) == before, "a refused get_or_set() wrote something"
        return
    assert_same(got, value, "get_or_set result")
    await _check_read_back(cache, key, value, _effective_ttl(cache, ttl))


@_needs("set_value_in_object")
@pytest.mark.parametrize("store", STORES)
@gen.DB_SETTINGS
@given(
    key=gen.names,
    prior=st.one_of(st.just(_MISSING), gen.values),
    field=gen.names,
    value=gen.values,
)
async def test_set_value_in_object_round_trips_or_refuses(
    caches: dict[str, Cache],
    db: psycopg.AsyncConnection[Any],
    store: str,
    key: Any,
    prior: Any,
    field: Any,
    value: Any,
) -> None:
    cache: Any = caches[store]
    await cache.reset()
    if prior is not _MISSING:
        await outcome(cache.set(key, prior))
    before = await _state(cache, db)
    done, _ = await outcome(cache.set_value_in_object(key, field, value))
    if not done:
        assert await _state(cache, db) == before, "a refused set_value_in_object() wrote something"
        return
    assert_same(await cache.get_value_in_object(key, field), value, "field value")
    whole = await cache.get(key)
    assert isinstance(whole, dict)
    assert_same(whole[field], value, "field in the stored object")


# -- create_cache ------------------------------------------------------------------------------

_created: set[str] = set()


def _cache_args() -> st.SearchStrategy[dict[str, Any]]:
    optional_number = st.one_of(st.none(), gen.numbers_or_junk)
    return st.fixed_dictionaries(
        {"name": gen.names},
        optional={
            "prefix": st.one_of(st.none(), gen.names),
            "ttl": optional_number,
            "local_ttl": optional_number,
            "store": st.one_of(st.sampled_from(["postgres", "memory"]), gen.names),
        },
    )


async def check_create_cache(
    coord: pgcoord.Coordinator, db: psycopg.AsyncConnection[Any], args: dict[str, Any]
) -> None:
    """create_cache(...) refuses with a typed error, or makes a cache that works: a value set
    with the cache's default ttl reads back exactly."""
    manager = coord.cache_manager
    name = args["name"]
    done, made = await outcome(_call(manager.create_cache, **args))
    if not done:
        return
    assert isinstance(made, Cache)
    assert name not in _created, f"create_cache({name!a}) made a second cache of one name"
    _created.add(name)
    assert manager.get_cache(name) is made
    await made.reset()
    before = await _state(made, db)
    value = {"v": [True, 1, 1.5, "\x00é"]}
    done, _ = await outcome(made.set("k", value))
    if not done:
        assert await _state(made, db) == before
        raise AssertionError(f"create_cache({args!a}) accepted, but set() on it is refused")
    await _check_read_back(made, "k", value, made.default_ttl)
    await made.reset()


async def _call(fn: Callable[..., Any], **kwargs: Any) -> Any:
    return fn(**kwargs)


@gen.DB_SETTINGS
@given(args=_cache_args())
async def test_create_cache_refuses_or_makes_a_working_cache(
    module_coord: pgcoord.Coordinator, db: psycopg.AsyncConnection[Any], args: dict[str, Any]
) -> None:
    await check_create_cache(module_coord, db, args)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(
            {"name": "c_inf", "ttl": math.inf},
            id="inf-ttl",
        ),
        pytest.param({"name": "c_big", "ttl": 1e300}, id="1e300-ttl"),
        pytest.param({"name": "c_huge", "ttl": 10**400}, id="huge-int-ttl"),
        pytest.param({"name": "c_near_inf", "local_ttl": math.inf}, id="inf-local-ttl"),
        pytest.param({"name": "c_nul", "prefix": "p\x00"}, id="nul-prefix"),
        pytest.param({"name": "c_sur", "prefix": "\udc00"}, id="surrogate-prefix"),
        pytest.param({"name": "\x00"}, id="nul-name"),
        pytest.param({"name": "c_mem_near", "store": "memory", "local_ttl": 1.0}, id="memory-near"),
    ],
)
async def test_create_cache_examples(
    module_coord: pgcoord.Coordinator, db: psycopg.AsyncConnection[Any], args: dict[str, Any]
) -> None:
    await check_create_cache(module_coord, db, args)
