"""Properties of the locks over generated keys, ttls and timeouts.

The property of every way to take a lock (acquire, try_acquire, lock, run_exclusive): a typed
error (InvalidInputError / InvalidTypeError) with nothing held and no lease row written, or a
held lock whose key, ttl and token read back exactly (``holders()`` reports the key as given,
tokens of a key strictly increase), which releases so that the key can be taken again at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgcoord
from pgcoord.locks.lock import Lock
from tests.properties import strategies as gen
from tests.properties.strategies import outcome, table

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]

METHODS = ["acquire", "try_acquire", "lock", "run_exclusive"]
#: The last token seen per key: the next must be larger.
_tokens: dict[str, int] = {}
_NO_TTL = object()  # leave ttl to its default


async def _leases(db: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
    return await table(
        db, "SELECT lock_key, name, token, ttl_ms FROM pgcoord.lock_leases ORDER BY lock_key"
    )


#: A lease shorter than this may end while the property looks at it.
_SHORT = 60.0


def _long(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The lease rows whose ttl is not short (NULL: no lease)."""
    return [row for row in rows if row[3] is None or row[3] >= _SHORT * 1000]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_lease(reported: float | None, want: float | None, ttl: Any) -> None:
    """holders() reports the lease in whole milliseconds, rounded up."""
    if want is None:
        assert reported is None, f"ttl={ttl!r}: holders() says a lease of {reported!r}"
    else:
        assert reported is not None, f"ttl={ttl!r}: holders() says no lease"
        assert abs(reported - want) <= 0.001 + want * 1e-9, (reported, want)


def _want_ttl(ttl: Any) -> float | None:
    if ttl is _NO_TTL:
        return 30.0
    if ttl is None or math.isinf(float(ttl)):
        return None
    return float(ttl)


async def _take(
    coord: pgcoord.Coordinator, method: str, key: Any, kwargs: dict[str, Any]
) -> tuple[bool, Any]:
    """Take the lock as ``method`` does; return (done, (lock, token, ttl) seen while held)."""
    locks = coord.lock_manager
    seen: dict[str, Any] = {}

    async def inside(lock: Lock) -> None:
        seen["lock"] = lock
        seen["holders"] = await locks.holders()

    if method in ("acquire", "try_acquire"):
        done, lock = await outcome(getattr(locks, method)(key, **kwargs))
        if not done:
            return False, lock
        try:
            await inside(lock)
        finally:
            await lock.release()
        return True, seen

    if method == "lock":

        async def with_block() -> None:
            async with locks.lock(key, **kwargs) as lock:
                await inside(lock)

        done, error = await outcome(with_block())
        return (True, seen) if done else (False, error)

    async def fn() -> str:
        # run_exclusive hands fn no lock: find ours among the holders.
        seen["holders"] = await locks.holders()
        return "result"

    done, result = await outcome(locks.run_exclusive(key, fn, **kwargs))
    if done:
        assert result == "result"
    return (True, seen) if done else (False, result)


async def check_take(
    coord: pgcoord.Coordinator,
    db: psycopg.AsyncConnection[Any],
    method: str,
    key: Any,
    ttl: Any,
    timeout: Any,
) -> None:
    """See the module docstring."""
    locks = coord.lock_manager
    kwargs: dict[str, Any] = {}
    if ttl is not _NO_TTL:
        kwargs["ttl"] = ttl
    if method == "try_acquire" and timeout is not _NO_TTL:
        kwargs["timeout"] = timeout
    before = await _leases(db)
    held_before = await locks.holders()
    short = _is_number(ttl) and 0 < ttl < _SHORT
    try:
        done, seen = await _take(coord, method, key, kwargs)
    except pgcoord.LockLostError:
        assert short, f"{method}({key!a}, ttl={ttl!r}) lost a lock with a long lease"
        return
    gen.tally(f"{method} {'accepted' if done else 'refused'}")
    if not done:
        assert await locks.holders() == held_before, f"a refused {method} holds something"
        # Rows of short leases are left out: an earlier example's lock with a 1 ms lease can
        # be promoted (and lost) in the background while this one runs.
        assert _long(await _leases(db)) == _long(before), f"a refused {method} wrote a lease row"
        return
    assert isinstance(key, str)
    want = _want_ttl(ttl)
    mine = [h for h in seen["holders"] if h.instance_id == coord.instance_id]
    if not (short and not mine):  # a short lease may have ended before holders() looked
        assert [h.key for h in mine] == [key], f"holders() while held: {[h.key for h in mine]!a}"
        _check_lease(mine[0].ttl, want, ttl)
    lock = seen.get("lock")
    if lock is not None:
        assert lock.key == key
        assert lock.ttl == want, (lock.ttl, want)
        assert isinstance(lock.token, int)
        last = _tokens.get(key)
        assert last is None or lock.token > last, f"token {lock.token} after {last}"
        _tokens[key] = lock.token
        assert not lock.held, "released, yet still held"
    # Released: free again at once (a single try), and nothing of ours is left listed.
    again = await locks.try_acquire(key, timeout=0)
    await again.release()
    left = [h for h in await locks.holders() if h.instance_id == coord.instance_id]
    assert left == [], f"after release holders() still lists {left!a}"


_ttls = st.one_of(st.just(_NO_TTL), st.none(), gen.numbers_or_junk)


@pytest.mark.parametrize("method", METHODS)
@gen.DB_SETTINGS
@given(
    key=gen.sometimes("k", gen.names),
    ttl=_ttls,
    timeout=st.one_of(st.just(_NO_TTL), gen.numbers_or_junk),
)
async def test_taking_a_lock_round_trips_or_refuses_before_writing(
    module_coord: pgcoord.Coordinator,
    db: psycopg.AsyncConnection[Any],
    method: str,
    key: Any,
    ttl: Any,
    timeout: Any,
) -> None:
    await check_take(module_coord, db, method, key, ttl, timeout)


_TAKE_EXAMPLES: list[tuple[str, str, Any, Any, str | None]] = [
    ("nul-key", "a\x00b", _NO_TTL, _NO_TTL, None),
    ("surrogate-key", "\udfff", _NO_TTL, _NO_TTL, None),
    ("split-pair-key", "\ud83d\ude00", _NO_TTL, _NO_TTL, None),
    ("255-key", "\U0001f600" * 255, _NO_TTL, _NO_TTL, None),
    ("256-key", "x" * 256, _NO_TTL, _NO_TTL, None),
    ("combining-key", "e\u0301", _NO_TTL, _NO_TTL, None),
    ("inf-ttl", "k", math.inf, _NO_TTL, None),
    ("none-ttl", "k", None, _NO_TTL, None),
    ("huge-ttl", "k", 10**400, _NO_TTL, None),
    ("1e300-ttl", "k", 1e300, _NO_TTL, None),
    ("max-ttl", "k", (2**31 - 1) / 1000.0, _NO_TTL, None),
    ("tiny-ttl", "k", 1e-300, _NO_TTL, None),
    ("bool-ttl", "k", True, _NO_TTL, None),
    ("inf-timeout", "k", _NO_TTL, math.inf, None),
    ("huge-timeout", "k", _NO_TTL, 10**400, None),
    ("nan-timeout", "k", _NO_TTL, math.nan, None),
    ("negative-zero-timeout", "k", _NO_TTL, -0.0, None),
]


def _take_params() -> list[Any]:
    params = []
    for name, key, ttl, timeout, reason in _TAKE_EXAMPLES:
        for method in METHODS:
            if name.endswith("-timeout") and method != "try_acquire":
                continue
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(
                pytest.param(method, key, ttl, timeout, id=f"{name}-{method}", marks=marks)
            )
    return params


@pytest.mark.parametrize(("method", "key", "ttl", "timeout"), _take_params())
async def test_taking_a_lock_examples(
    module_coord: pgcoord.Coordinator,
    db: psycopg.AsyncConnection[Any],
    method: str,
    key: Any,
    ttl: Any,
    timeout: Any,
) -> None:
    await check_take(module_coord, db, method, key, ttl, timeout)


# -- extend ------------------------------------------------------------------------------------


async def check_extend(
    coord: pgcoord.Coordinator, db: psycopg.AsyncConnection[Any], ttl: Any
) -> None:
    """Lock.extend(ttl): a typed error with the lease unchanged (still held, same ttl, same
    lease row), or the new lease length, exactly."""
    locks = coord.lock_manager
    lock = await locks.acquire("extend-me", ttl=60.0)
    try:
        await locks.holders()  # promotes the lock: its lease row exists from here on
        before = await _leases(db)
        done, error = await outcome(lock.extend(ttl))
        gen.tally(f"extend {'accepted' if done else 'refused'}")
        if not done:
            assert lock.held, f"a refused extend ({error}) lost the lock"
            assert lock.ttl == 60.0
            assert await _leases(db) == before, "a refused extend changed the lease row"
            return
        want = _want_ttl(ttl)
        assert lock.ttl == want, (lock.ttl, want)
        mine = [h for h in await locks.holders() if h.key == "extend-me"]
        if want is None or want >= _SHORT or mine:
            assert len(mine) == 1, f"holders() after extend: {mine!a}"
            _check_lease(mine[0].ttl, want, ttl)
    finally:
        await lock.release()


@gen.DB_SETTINGS
@given(ttl=st.one_of(st.none(), gen.numbers_or_junk))
async def test_extend_sets_the_lease_or_refuses_before_writing(
    module_coord: pgcoord.Coordinator, db: psycopg.AsyncConnection[Any], ttl: Any
) -> None:
    await check_extend(module_coord, db, ttl)


@pytest.mark.parametrize(
    "ttl",
    [
        pytest.param(math.inf, id="inf"),
        pytest.param(10**400, id="huge-int"),
        pytest.param(1e300, id="1e300"),
        pytest.param(True, id="bool"),
        pytest.param(math.nan, id="nan"),
        pytest.param(-0.0, id="negative-zero"),
        pytest.param((2**31) / 1000.0, id="past-max"),
    ],
)
async def test_extend_examples(
    module_coord: pgcoord.Coordinator, db: psycopg.AsyncConnection[Any], ttl: Any
) -> None:
    await check_extend(module_coord, db, ttl)


# -- run_exclusive with any fn -----------------------------------------------------------------


@gen.DB_SETTINGS
@given(
    fn=st.sampled_from([None, 1, "fn", b"", object()]), method=st.sampled_from(["manager", "lock"])
)
async def test_run_exclusive_refuses_a_non_callable_before_taking_the_lock(
    module_coord: pgcoord.Coordinator, db: psycopg.AsyncConnection[Any], fn: Any, method: str
) -> None:
    locks = module_coord.lock_manager
    before = await _leases(db)
    if method == "manager":
        call: Callable[[], Any] = lambda: locks.run_exclusive("rx", fn)  # noqa: E731
        done, _ = await outcome(call())
        assert not done
        assert await _leases(db) == before
    else:
        lock = await locks.acquire("rx")
        try:
            done, _ = await outcome(lock.run_exclusive(fn))
            assert not done
            assert lock.held, "a refused run_exclusive released or lost the lock"
        finally:
            await lock.release()
    again = await locks.try_acquire("rx")
    await again.release()
