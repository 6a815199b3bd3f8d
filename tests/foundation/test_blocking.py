"""The blocking API: sync calls that wait on a sync connection block their caller, not the loop."""

from __future__ import annotations

import threading

import psycopg

import pgcoord


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
