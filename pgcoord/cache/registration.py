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

- A near cache serves nothing until its instance's registration committed (:meth:`ready`),
  and a registration is written behind a table lock that no in-flight write can slip past
  (``near_barrier``): every write that commits after a near cache starts reading sees the row.
- The row is renewed every :data:`RENEW` seconds; writers count it while it is younger than
  :data:`LEASE`. The instance itself stops serving :data:`MARGIN` seconds before its last
  renewal could lapse (a frozen process, a stalled network), and when a registration is found
  lapsed or gone it registers afresh and drops that namespace's entries, which writers may
  have skipped telling it about.
- After a listener reconnect every registration is confirmed again before serving (a server
  crash empties the UNLOGGED table, registrations included).

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

log = logging.getLogger("pgcoord.cache")

#: Seconds a registration counts for writers after its last renewal.
LEASE = 60.0
#: Seconds between renewals.
RENEW = 15.0
#: The instance stops serving this long before its registration could lapse for writers.
MARGIN = 15.0
#: How long a registration waits for the table lock (ms) before it gives up and retries: while
#: it waits, every new cache write of the schema waits behind it.
BARRIER_WAIT_MS = 200
#: After a failed registration, reads skip the near cache (no new attempt) for this long.
RETRY_AFTER = 1.0


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
        self._refreshing: asyncio.Task[bool] | None = None
        self._retry_at = 0.0
        self._loop: asyncio.Task[None] | None = None

    def valid(self, ns: str) -> bool:
        """Is ``ns`` registered, with a margin, right now (no I/O)?"""
        return ns in self._valid

    def forget(self) -> None:
        """Confirm every registration again before serving (after a listener reconnect)."""
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

    def _lapse(self, ns: str) -> None:
        self._expiry.pop(ns, None)
        self._valid.discard(ns)

    async def ready(self, ns: str) -> bool:
        """Make sure ``ns`` is registered; False when it cannot be now (then read Postgres)."""
        if self.valid(ns):
            return True
        if time.monotonic() < self._retry_at:
            return False  # a registration failed a moment ago: do not hammer the server
        await self.refresh()
        return self.valid(ns)

    async def refresh(self) -> bool:
        """Renew or create the registrations of every near-cached namespace (one attempt shared
        by concurrent callers); False when it failed (logged)."""
        task = self._refreshing
        if task is None or task.done():
            task = self._refreshing = asyncio.create_task(
                self._refresh(), name="pgcoord-cache-near-registration"
            )
        # Shielded: a reader giving up must not cancel the registration others wait for.
        return await asyncio.shield(task)

    async def _refresh(self) -> bool:
        wanted = list(dict.fromkeys(self._namespaces()))
        if not wanted:
            return True
        markers = {marker_ns(ns): ns for ns in wanted}
        me = self._rt.instance_id
        started = time.monotonic()
        try:
            async with self._rt.connection("cache near-cache registration") as conn:
                cur = await conn.execute(
                    self._q.near_renew, {"ns": list(markers), "me": me, "lease": LEASE}
                )
                renewed = {row[0] for row in await cur.fetchall()}
                missing = [marker for marker in markers if marker not in renewed]
                if missing:
                    async with conn.transaction():
                        await conn.execute(self._q.near_lock_timeout, (f"{BARRIER_WAIT_MS}ms",))
                        await conn.execute(self._q.near_barrier)
                        await conn.execute(self._q.near_register, {"ns": missing, "me": me})
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
        for marker in missing:
            # Lapsed or new: writers may have skipped telling this instance; start afresh.
            self._dropped(markers[marker])
        for ns in wanted:
            self._confirm(ns, until)
        return True

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
