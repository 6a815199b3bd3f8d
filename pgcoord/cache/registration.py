"""Near-cache registrations: which instances near-cache a namespace, so that writers know whom
to tell.

Every write to a namespace (through any cache with that prefix, near-cached or not) must reach
the near caches of that namespace; sending a NOTIFY after every write of every plain cache
would cost each write a second transaction. Instead an instance with a near cache on
``"<app>:<prefix>"`` keeps a registration row in the cache table (see the end of
``queries.sql``), and every write statement answers, in the same round trip, whether another
instance's registration is live: only then does the writer NOTIFY. A plain cache whose prefix
nobody near-caches therefore pays one index probe per write and no NOTIFY.

What makes that safe:

- A near cache serves nothing until its instance's registration committed *and* every write
  that could have missed it has ended (:meth:`ready`). Writers never wait for a registration:
  its row is committed on its own, so every write statement that starts afterwards sees it;
  the writes already in flight are the transactions that held ``ROW EXCLUSIVE`` on the table at
  that moment (a statement takes that lock before its snapshot), and the registering instance
  polls ``pg_locks`` until none of them is left (``near_writers`` in ``queries.sql``), within
  the command timeout. A table lock would be simpler but conflicts with VACUUM and ANALYZE, so
  the registration would wait behind them, and every cache write of the schema behind it.
- The row is renewed every :data:`RENEW` seconds; writers count it while it is younger than
  :data:`LEASE`. The instance itself stops serving :data:`MARGIN` seconds before its last
  renewal could lapse (a frozen process, a stalled network). A renewal only extends a row
  younger than ``LEASE - MARGIN``: an older one (or none: a server crash empties the UNLOGGED
  table) is registered afresh as above and that namespace's entries dropped, since a writer
  judging the row lapsed while the renewal ran may have skipped telling this instance.
- After a listener reconnect the near caches are emptied and serve again once a renewal
  succeeded (the rows counted for writers all along, so nothing else was missed).

A crashed instance's rows stop costing writers NOTIFYs after :data:`LEASE` seconds and are
swept a day later; a stopping instance deletes its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from pgcoord._retry import Backoff
from pgcoord.cache.queries import Queries
from pgcoord.runtime import Runtime
from pgcoord.schema.cache import TABLE

log = logging.getLogger("pgcoord.cache")

#: Seconds a registration counts for writers after its last renewal.
LEASE = 60.0
#: Seconds between renewals.
RENEW = 15.0
#: The instance stops serving this long before its registration could lapse for writers.
MARGIN = 15.0
#: How long reads wait for a registration under way before they read Postgres instead (it
#: takes a few round trips, unless a write transaction it must outlast stays open).
READY_WAIT = 0.5
#: After a failed registration, reads skip the near cache (no new attempt) for this long.
RETRY_AFTER = 1.0
# Polling for the writes a new registration outlasts: they are single statements, so most
# have ended by the first look; a long one is re-checked at most this often.
_POLL_FIRST = 0.002
_POLL_MAX = 0.05


def marker_ns(ns: str) -> str:
    """The namespace of the registration rows of cache namespace ``ns`` (``"<app>:<prefix>"``
    becomes ``"<app>;near:<prefix>"``, outside every app's range of cache namespaces)."""
    app, _, prefix = ns.partition(":")
    return f"{app};near:{prefix}"


class Registrations:
    """This instance's registrations: confirmed (and when they lapse), renewed, removed.

    ``namespaces`` returns the namespaces this instance near-caches now; ``dropped(ns)`` is
    called when a namespace's near caches must forget everything (registered afresh).
    """

    def __init__(
        self,
        runtime: Runtime,
        queries: Queries,
        namespaces: Callable[[], Iterable[str]],
        dropped: Callable[[str], None],
    ) -> None:
        self._rt = runtime
        self._q = queries
        self._namespaces = namespaces
        self._dropped = dropped
        # The namespaces this instance may serve near caches of now: a set, so the check on
        # every near-cache hit is one membership test (a per-hit clock read cost a fifth of a
        # hit). A timer per namespace takes it out when its margin runs out.
        self._valid: set[str] = set()
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        # The registration rows (markers) this instance wrote and then outlasted every write
        # in flight of: only those may be renewed in place. A row renewed but not in here
        # (an earlier attempt committed it, then failed while waiting) goes through
        # registration again.
        self._settled: set[str] = set()
        self._refreshing: asyncio.Task[bool] | None = None
        self._refresh_started = 0.0
        self._retry_at = 0.0
        self._loop: asyncio.Task[None] | None = None

    def valid(self, ns: str) -> bool:
        """Is ``ns`` registered, with a margin, right now (no I/O)?"""
        return ns in self._valid

    def forget(self) -> None:
        """Serve again only after the next successful renewal (after a listener reconnect)."""
        self._valid.clear()
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()

    def _confirm(self, ns: str, until: float) -> None:
        """``ns`` may be served until the monotonic time ``until``."""
        old = self._expiry.pop(ns, None)
        if old is not None:
            old.cancel()
        left = until - time.monotonic()
        if left <= 0:
            self._valid.discard(ns)
            return
        self._valid.add(ns)
        self._expiry[ns] = asyncio.get_running_loop().call_later(left, self._lapse, ns)

    def _withdraw(self, ns: str) -> None:
        """Stop serving ``ns`` now."""
        handle = self._expiry.pop(ns, None)
        if handle is not None:
            handle.cancel()
        self._valid.discard(ns)

    def _lapse(self, ns: str) -> None:
        self._expiry.pop(ns, None)
        self._valid.discard(ns)

    async def ready(self, ns: str) -> bool:
        """Make sure ``ns`` is registered; False when it is not yet (then read Postgres).

        Waits for the registration at most :data:`READY_WAIT` seconds after it started: one
        that must outlast a long write transaction goes on in the background, and reads go to
        Postgres meanwhile.
        """
        if self.valid(ns):
            return True
        if time.monotonic() < self._retry_at:
            return False  # a registration failed a moment ago: do not hammer the server
        task = self._refreshing
        if task is None or task.done():
            task = self._start_refresh()
        left = self._refresh_started + READY_WAIT - time.monotonic()
        if left > 0:
            await asyncio.wait({task}, timeout=left)
        return self.valid(ns)

    def _start_refresh(self) -> asyncio.Task[bool]:
        self._refresh_started = time.monotonic()
        task = self._refreshing = asyncio.create_task(
            self._refresh(), name="pgcoord-cache-near-registration"
        )
        return task

    async def refresh(self) -> bool:
        """Renew or create the registrations of every near-cached namespace (one attempt shared
        by concurrent callers); False when it failed (logged)."""
        task = self._refreshing
        if task is None or task.done():
            task = self._start_refresh()
        # Shielded: a caller giving up must not cancel the registration others wait for.
        return await asyncio.shield(task)

    async def _refresh(self) -> bool:
        wanted = list(dict.fromkeys(self._namespaces()))
        if not wanted:
            return True
        markers = {marker_ns(ns): ns for ns in wanted}
        started = time.monotonic()
        missing: list[str] = []
        try:
            async with self._rt.connection("cache near-cache renewal") as conn:
                cur = await conn.execute(
                    self._q.near_renew,
                    {"ns": list(markers), "me": self._rt.instance_id, "fresh": LEASE - MARGIN},
                )
                renewed = {row[0] for row in await cur.fetchall()}
            missing = [m for m in markers if m not in renewed or m not in self._settled]
            if missing:
                await self._register(missing, [markers[m] for m in missing])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._retry_at = time.monotonic() + RETRY_AFTER
            log.warning(
                "pgcoord cache: registering near caches failed (they read Postgres meanwhile; "
                "retrying): %s",
                exc,
            )
            return False
        until = started + LEASE - MARGIN
        for ns in wanted:
            self._confirm(ns, until)
        return True

    async def _register(self, missing: list[str], namespaces: list[str]) -> None:
        """Write the registration rows ``missing`` (of ``namespaces``), outlast every write that
        may have missed them, then drop those namespaces' near entries."""
        for marker, ns in zip(missing, namespaces, strict=True):
            # Stop serving at once: writers may have skipped telling this instance already.
            self._settled.discard(marker)
            self._withdraw(ns)
        deadline = self._rt.step_deadline()
        async with self._rt.connection("cache near-cache registration") as conn:
            # Autocommit: committed before the look at pg_locks below, so every write statement
            # that is not in that look started after the rows were visible, and sees them.
            await conn.execute(self._q.near_register, {"ns": missing, "me": self._rt.instance_id})
            cur = await conn.execute(
                self._q.near_writers, {"schema": self._rt.schema, "table": TABLE}
            )
            writers = [row[0] for row in await cur.fetchall()]
        await self._outlast(writers, deadline)
        for marker, ns in zip(missing, namespaces, strict=True):
            # What was read before the registration took effect may be stale: start afresh.
            self._dropped(ns)
            self._settled.add(marker)

    async def _outlast(self, writers: list[str], deadline: float) -> None:
        """Wait until none of the transactions ``writers`` (virtual transaction ids) is left,
        polling; raise TimeoutError at ``deadline`` (event-loop time)."""
        loop = asyncio.get_running_loop()
        poll = Backoff(_POLL_FIRST, _POLL_MAX, jitter=0.0)
        while writers:
            await asyncio.sleep(poll.next() or _POLL_MAX)
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(
                    f"{len(writers)} write transaction(s) on the cache table in flight at "
                    "registration are still open at the command timeout"
                )
            # A connection per look, never held across the wait: with a small budget the
            # writers being waited for may need it.
            async with self._rt.connection("cache near-cache registration", timeout=left) as c:
                cur = await c.execute(self._q.near_writers_left, (writers,))
                writers = [row[0] for row in await cur.fetchall()]

    async def _renew_loop(self) -> None:
        backoff = Backoff(0.5, RENEW)
        delay = RENEW
        while True:
            await asyncio.sleep(delay)
            if await self.refresh():
                backoff.reset()
                delay = RENEW
            else:
                delay = backoff.next() or RENEW

    def start(self) -> None:
        """Start renewing (every :data:`RENEW` seconds, only while there are near caches)."""
        self._loop = asyncio.create_task(self._renew_loop(), name="pgcoord-cache-near-renew")

    async def stop(self) -> None:
        """Stop renewing and delete this instance's registrations (best effort)."""
        self.forget()
        self._settled.clear()
        for task in (self._loop, self._refreshing):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._loop = self._refreshing = None
        markers = [marker_ns(ns) for ns in dict.fromkeys(self._namespaces())]
        if not markers:
            return
        try:
            async with self._rt.connection("cache near-cache unregistration") as conn:
                await conn.execute(
                    self._q.near_unregister, {"ns": markers, "me": self._rt.instance_id}
                )
        except Exception as exc:
            # The rows stop counting after LEASE seconds and are swept a day later.
            log.warning("pgcoord cache: removing near-cache registrations failed: %s", exc)
