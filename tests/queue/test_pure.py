"""Pure helpers of the queue, without a database: backoff, validation, NOTIFY throttling."""

from __future__ import annotations

import math

import pytest

import pgcoord
from pgcoord.queue.backoff import retry_delay
from pgcoord.queue.options import publish_options, subscribe_options
from pgcoord.queue.throttle import NotifyState


def test_backoff_doubles_from_half_a_second_and_caps_at_a_minute() -> None:
    assert [retry_delay(n, rand=0.5) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert retry_delay(7, rand=0.5) == 60.0  # 0.5 x 128 = 64 -> capped
    assert retry_delay(10_000, rand=0.5) == 60.0


def test_backoff_jitter_stays_within_twenty_percent() -> None:
    assert math.isclose(retry_delay(0, rand=0.0), 0.4)
    assert math.isclose(retry_delay(0, rand=1.0), 0.6)
    for _ in range(200):
        assert 0.8 * 60 <= retry_delay(20) <= 1.2 * 60


def _publish(**overrides: object) -> object:
    kwargs: dict[str, object] = {"timeout": 15.0, "max_retries": 0, "delay": 0.0, "priority": 0}
    kwargs.update(overrides)
    return publish_options(**kwargs)


@pytest.mark.parametrize(
    "bad",
    [
        {"timeout": 0},
        {"timeout": -1.0},
        {"timeout": math.nan},
        {"max_retries": -1},
        {"delay": -0.1},
        {"delay": math.inf},
        {"priority": 2**31},
    ],
)
def test_publish_options_refuse_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _publish(**bad)


@pytest.mark.parametrize(
    "bad", [{"timeout": "1"}, {"max_retries": 1.5}, {"priority": "high"}, {"delay": None}]
)
def test_publish_options_refuse_bad_types(bad: dict[str, object]) -> None:
    with pytest.raises(TypeError):
        _publish(**bad)


def test_subscribe_options_detect_async_and_unlimited() -> None:
    async def handler(message: object, ctx: object) -> None:
        return None

    opts = subscribe_options(process=handler, idle=None, concurrency=0, interval=0.25)
    assert opts.is_async and opts.concurrency is None
    opts = subscribe_options(process=print, idle=lambda: True, concurrency=-5, interval=1)
    assert not opts.is_async and opts.concurrency is None
    assert subscribe_options(process=print, idle=None, concurrency=3, interval=1).concurrency == 3
    with pytest.raises(TypeError):
        subscribe_options(process="not callable", idle=None, concurrency=1, interval=1)
    with pytest.raises(TypeError):
        subscribe_options(process=print, idle=5, concurrency=1, interval=1)
    with pytest.raises(ValueError):
        subscribe_options(process=print, idle=None, concurrency=1, interval=0)


def test_throttle_one_sender_and_a_trailing_notify() -> None:
    state = NotifyState(gap=0.002, txn_window=0.01)
    assert state.request(now=1.0) is True  # start a sender
    assert state.next_send(1.0) == 0.0
    state.take()
    # A commit while the first NOTIFY is in flight needs one more NOTIFY after it.
    assert state.request(now=1.0001) is False
    state.sent(1.0)
    assert state.next_send(1.0005) == pytest.approx(0.0015)
    state.take()
    state.sent(1.002)
    assert state.next_send(1.003) is None and not state.sending


def test_throttle_many_commits_in_one_gap_cost_one_notify() -> None:
    state = NotifyState(gap=0.002, txn_window=0.01)
    state.request(now=5.0)
    state.take()
    state.sent(5.0)
    starts = sum(state.request(now=5.0 + i * 0.0001) for i in range(10))
    assert starts == 0  # the running sender covers all ten with one trailing NOTIFY
    assert state.next_send(5.001) == pytest.approx(0.001)


def test_throttle_inside_transaction_at_most_once_per_window() -> None:
    state = NotifyState(gap=0.002, txn_window=0.01)
    assert state.inside_transaction(10.0) is True
    assert state.inside_transaction(10.005) is False
    assert state.inside_transaction(10.011) is True
    state.request(now=10.012, delay=0.01)
    assert state.inside_transaction(10.03) is False  # a trailing NOTIFY is pending


@pytest.mark.parametrize("level", ["fast", "", "synchronous"])
def test_queue_synchronous_commit_refuses_an_unknown_level_at_construction(level: str) -> None:
    with pytest.raises(pgcoord.InvalidInputError, match="'on', 'off', 'local'") as info:
        pgcoord.Coordinator("postgresql://127.0.0.1:1/none", queue_synchronous_commit=level)
    assert isinstance(info.value, ValueError)
    with pytest.raises(pgcoord.InvalidTypeError, match="queue_synchronous_commit"):
        pgcoord.Coordinator("postgresql://127.0.0.1:1/none", queue_synchronous_commit=True)


@pytest.mark.parametrize("level", ["on", "off", "local", "remote_write", "remote_apply"])
def test_queue_synchronous_commit_accepts_postgres_levels(level: str) -> None:
    pgcoord.Coordinator("postgresql://127.0.0.1:1/none", queue_synchronous_commit=level)
