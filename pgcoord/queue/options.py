"""Validation of publish and subscribe arguments (pure, no I/O).

Everything is checked before anything is written, with errors that name the argument.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pgcoord.errors import InvalidInputError, InvalidTypeError
from pgcoord.validation import (
    INT4_MAX,
    INT4_MIN,
    check_callable,
    check_int,
    check_non_negative,
    check_positive,
)


@dataclass(frozen=True, slots=True)
class PublishOptions:
    """Checked options of one ``publish``/``publish_many`` call."""

    timeout: float
    max_retries: int
    delay: float
    priority: int

    def as_dict(self) -> dict[str, Any]:
        """The options as handed to ``process`` in ``ctx.options``."""
        return {
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "delay": self.delay,
            "priority": self.priority,
        }


_CACHE: dict[tuple[object, ...], PublishOptions] = {}
_CACHE_MAX = 256


def publish_options(
    *, timeout: object, max_retries: object, delay: object, priority: object
) -> PublishOptions:
    """Validate ``publish`` keywords: timeout > 0, max_retries >= 0, delay >= 0, int priority.

    Producers repeat the same few option sets, so valid ones are remembered (keyed with
    their types, so ``True`` never passes for ``1``): checking costs a dict lookup.
    """
    key = (
        type(timeout),
        timeout,
        type(max_retries),
        max_retries,
        type(delay),
        delay,
        type(priority),
        priority,
    )
    try:
        return _CACHE[key]
    except (KeyError, TypeError):  # TypeError: an unhashable argument, refused below
        pass
    opts = _check_publish(timeout, max_retries, delay, priority)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[key] = opts
    return opts


def _check_publish(
    timeout: object, max_retries: object, delay: object, priority: object
) -> PublishOptions:
    # Finite: a try without a time limit would hold its lease (renewed) forever, and a job
    # delayed forever would never run; both are stored as server intervals too.
    t = check_positive(timeout, "timeout", finite=True)
    # priority and max_retries are stored as Postgres integers.
    retries = check_int(max_retries, "max_retries", minimum=0, maximum=INT4_MAX)
    d = check_non_negative(delay, "delay", finite=True)
    p = check_int(priority, "priority", minimum=INT4_MIN)
    if p > INT4_MAX:
        raise InvalidInputError(f"priority must be within a 32-bit int; got {p}")
    return PublishOptions(timeout=t, max_retries=retries, delay=d, priority=p)


@dataclass(frozen=True, slots=True)
class SubscribeOptions:
    """Checked options of one ``subscribe`` call."""

    process: Callable[..., Any]
    is_async: bool
    idle: Callable[[], bool] | None
    concurrency: int | None  # None: unlimited
    interval: float


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """True when calling ``fn`` returns a coroutine (async def, partials, async ``__call__``)."""
    if inspect.iscoroutinefunction(fn) or asyncio.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - looking for an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def subscribe_options(
    *, process: object, idle: object, concurrency: object, interval: object
) -> SubscribeOptions:
    """Validate ``subscribe`` keywords; ``concurrency <= 0`` means unlimited."""
    fn = check_callable(process, "process")
    if idle is not None and not callable(idle):
        raise InvalidTypeError(f"idle must be callable or None, not {type(idle).__name__}")
    limit = check_int(concurrency, "concurrency")
    # Finite: it is the poll period while NOTIFYs cannot arrive, and then nothing else wakes
    # the worker.
    every = check_positive(interval, "interval", finite=True)
    return SubscribeOptions(
        process=fn,
        is_async=is_async_callable(fn),
        idle=idle,
        concurrency=limit if limit > 0 else None,
        interval=every,
    )
