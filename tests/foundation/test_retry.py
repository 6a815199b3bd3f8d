"""The one backoff policy and the task set (pure: an injected clock, no sleeping)."""

from __future__ import annotations

import asyncio

import pytest

from pgcoord._retry import Backoff, TaskSet


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_delays_double_from_first_up_to_the_cap() -> None:
    backoff = Backoff(0.05, 0.3, jitter=0.0)
    assert [backoff.next() for _ in range(5)] == [0.05, 0.1, 0.2, 0.3, 0.3]


def test_an_immediate_backoff_retries_at_once_first() -> None:
    backoff = Backoff(0.05, 1.0, jitter=0.0, immediate=True)
    assert [backoff.next() for _ in range(3)] == [0.0, 0.05, 0.1]


def test_reset_starts_from_the_beginning() -> None:
    backoff = Backoff(0.05, 1.0, jitter=0.0)
    backoff.next()
    backoff.next()
    backoff.reset()
    assert backoff.next() == 0.05


def test_jitter_stays_within_its_band() -> None:
    low = Backoff(1.0, 1.0, jitter=0.2, rand=lambda: 0.0)
    high = Backoff(1.0, 1.0, jitter=0.2, rand=lambda: 1.0)
    assert low.next() == pytest.approx(0.8)
    assert high.next() == pytest.approx(1.2)


def test_the_budget_counts_from_the_first_failure_and_restarts_after_reset() -> None:
    clock = Clock()
    backoff = Backoff(0.05, 1.0, jitter=0.0, budget=2.0, clock=clock)
    assert backoff.next() == 0.05
    clock.now += 1.9
    assert backoff.next() == 0.1
    clock.now += 0.1
    assert backoff.next() is None  # 2 s since the first failure: give up
    backoff.reset()
    assert backoff.next() == 0.05


async def test_a_task_set_keeps_tasks_until_they_end_and_logs_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = TaskSet("test")
    release = asyncio.Event()

    async def waits() -> None:
        await release.wait()

    async def fails() -> None:
        raise RuntimeError("boom")

    tasks.spawn(waits())
    tasks.spawn(fails())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(tasks) == 1  # the failed one is gone
    assert any("test: a background task failed" in r.getMessage() for r in caplog.records)
    release.set()
    await tasks.wait()
    assert len(tasks) == 0


async def test_cancel_ends_every_task() -> None:
    tasks = TaskSet("test")
    started = [tasks.spawn(asyncio.sleep(60)) for _ in range(3)]
    await tasks.cancel()
    assert all(task.cancelled() for task in started) and len(tasks) == 0
