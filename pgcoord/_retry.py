"""Retrying, one way for every part: a backoff policy (pure, no I/O) and a task set.

:class:`Backoff` says how long to wait before the next attempt: capped exponential delays with
jitter, optionally an immediate first retry and a budget after which it says stop. The clock
and the random source are injectable, so the arithmetic is tested without sleeping.

:class:`TaskSet` keeps the background tasks a component starts: referenced until they end (the
event loop holds only weak references), their failures logged, and all of them cancelled and
awaited when the component stops.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

log = logging.getLogger("pgcoord")


class Backoff:
    """Delays ``first``, ``2 * first``, ... up to ``cap``, each scaled by a random factor in
    ``1 +- jitter`` (so processes refused at the same moment do not retry in lockstep).

    ``immediate``: the first retry waits 0 (a dropped socket usually reconnects at once).
    ``budget``: seconds after the first failure (since the last :meth:`reset`) past which
    :meth:`next` returns None: give up.
    """

    __slots__ = (
        "_budget",
        "_cap",
        "_clock",
        "_delay",
        "_first",
        "_immediate",
        "_jitter",
        "_rand",
        "_since",
    )

    def __init__(
        self,
        first: float,
        cap: float,
        *,
        jitter: float = 0.2,
        immediate: bool = False,
        budget: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._first = first
        self._cap = cap
        self._jitter = jitter
        self._immediate = immediate
        self._budget = budget
        self._clock = clock
        self._rand = rand
        self._delay: float | None = None  # None: no failure since the last reset
        self._since = 0.0

    def next(self) -> float | None:
        """Seconds to wait before the next attempt, or None once the budget is spent."""
        if self._delay is None:
            self._since = self._clock()
            self._delay = 0.0 if self._immediate else self._first
        elif self._budget is not None and self._clock() - self._since >= self._budget:
            return None
        else:
            self._delay = min(max(self._delay * 2, self._first), self._cap)
        return self._delay * (1.0 - self._jitter + 2.0 * self._jitter * self._rand())

    def reset(self) -> None:
        """An attempt went through: the next failure starts from the beginning."""
        self._delay = None


class TaskSet:
    """Background tasks of one component; see the module docstring.

    ``what`` names the component in the log line of a task that failed; with
    ``log_failures=False`` the failure is left to whoever awaits the task.
    """

    def __init__(self, what: str, *, log_failures: bool = True) -> None:
        self._what = what
        self._log_failures = log_failures
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(
        self, work: Coroutine[Any, Any, Any], *, name: str | None = None
    ) -> asyncio.Task[Any]:
        """Run ``work`` in a task of its own, kept until it ends."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if self._log_failures and not task.cancelled() and task.exception() is not None:
            log.warning(
                "pgcoord %s: a background task failed", self._what, exc_info=task.exception()
            )

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    async def wait(self) -> None:
        """Wait for every task running now to end (their errors are logged, not raised)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        """Cancel every task and wait until they have ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
