"""Which sync messages this instance has already delivered (pure, no I/O).

A sync message can reach an instance twice: live through NOTIFY and again from the log when the
instance catches up after a reconnect (or a publish retried after a lost connection logs it
twice). Receivers remember every delivered message id for as long as the log can still return
it (the log's retention plus a margin), and drop repeats.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class SeenIds:
    """Ids delivered within the last ``horizon`` seconds (by the caller's clock)."""

    def __init__(self, horizon: float) -> None:
        self.horizon = horizon
        self._ids: OrderedDict[Hashable, float] = OrderedDict()

    def add(self, key: Hashable, now: float) -> bool:
        """Record ``key``; True if it is new, False if it was already seen."""
        if key in self._ids:
            return False
        self._ids[key] = now
        self._evict(now)
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def _evict(self, now: float) -> None:
        # Insertion order is delivery order, so the oldest entries are at the front.
        limit = now - self.horizon
        ids = self._ids
        while ids:
            first = next(iter(ids.values()))
            if first >= limit:
                break
            ids.popitem(last=False)
