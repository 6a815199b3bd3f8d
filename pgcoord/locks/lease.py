"""Pure lease and token arithmetic for locks (no I/O), unit-tested without a database.

The server enforces a lease with ``idle_session_timeout`` (whole milliseconds): the holder's
session ends once it idles that long after its last statement, which frees the lock. The client
counts its own deadline from the moment it *sent* the statement (plus the time the server says
it waited for the lock), and rounds the server's timeout *up*, so the client never believes it
holds a lock longer than the server grants it.
"""

from __future__ import annotations

import math
import time

from pgcoord.errors import InvalidInputError
from pgcoord.validation import check_non_negative, check_positive

#: The default lease (seconds). See docs/locks.md: long enough that an ordinary critical section
#: never needs ``extend``; short enough that a frozen holder blocks others for at most half a
#: minute. (NocoBase's acquire/runExclusive default to 500 ms; pgcoord deliberately does not.)
DEFAULT_TTL = 30.0

#: ``idle_session_timeout`` is an int of milliseconds; this is the longest lease it can express.
MAX_TTL = (2**31 - 1) / 1000.0

#: A token is ``epoch << TOKEN_EPOCH_SHIFT | counter``: room for 2**40 acquisitions per epoch.
TOKEN_EPOCH_SHIFT = 40

#: ``lock_acquire``'s wait argument meaning "wait as long as it takes".
WAIT_FOREVER = -1


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def now() -> float:
    """The clock leases are counted on (seconds; only differences are meaningful).

    ``CLOCK_BOOTTIME`` where available: unlike the event loop's monotonic clock it keeps running
    while the machine is suspended, and the server's lease certainly does.
    """
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.monotonic()  # pragma: no cover - platforms without CLOCK_BOOTTIME


def check_ttl(ttl: object, what: str = "ttl") -> float | None:
    """Validate a lease: ``None`` or ``inf`` mean no lease; otherwise 0 < ttl <= :data:`MAX_TTL`."""
    if ttl.__class__ is float and 0.0 < ttl <= MAX_TTL:
        return ttl  # the common case, checked in one step
    if ttl is None:
        return None
    seconds = check_positive(ttl, what)
    if math.isinf(seconds):
        return None
    if seconds > MAX_TTL:
        raise InvalidInputError(
            f"{what} must be at most {MAX_TTL:,.0f} seconds (PostgreSQL's idle_session_timeout "
            f"limit); use {what}=None for a lock without a lease; got {ttl!r}"
        )
    return seconds


def check_timeout(timeout: object) -> float:
    """Validate ``try_acquire``'s ``timeout``: seconds >= 0 (0 means a single try)."""
    return check_non_negative(timeout, "timeout")


def server_ttl_ms(ttl: float | None) -> int:
    """The ``idle_session_timeout`` for a lease (0 disables it): ``ttl`` rounded up to a ms."""
    if ttl is None:
        return 0
    return max(1, min(2**31 - 1, math.ceil(ttl * 1000.0)))


def server_wait_ms(remaining: float | None) -> int:
    """``lock_acquire``'s wait: -1 forever, 0 try once, else ``lock_timeout`` in whole ms.

    Under one millisecond left is a single try: ``lock_timeout`` cannot express less.
    """
    if remaining is None:
        return WAIT_FOREVER
    if remaining < 0.001:
        return 0
    return min(2**31 - 1, int(remaining * 1000.0))


def local_deadline(sent_at: float, ttl: float | None) -> float | None:
    """When the client must consider the lease over: ``ttl`` after the request was *sent*."""
    return None if ttl is None else sent_at + ttl


def split_token(token: int) -> tuple[int, int]:
    """A token's (epoch, counter); the epoch grows after every crash of the server."""
    return token >> TOKEN_EPOCH_SHIFT, token & ((1 << TOKEN_EPOCH_SHIFT) - 1)
