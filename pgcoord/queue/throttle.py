"""When to send a wake-up NOTIFY for a queue (pure bookkeeping, no I/O).

A transaction that NOTIFYs takes a server-wide lock at commit and holds it through its WAL
flush, so a NOTIFY inside every enqueue transaction serialises all producers. pgcoord avoids
that in two ways:

- ``publish()`` without ``transaction=`` commits its INSERT first and sends the NOTIFY
  afterwards in a separate, write-free transaction (cheap: no WAL, no flush under the lock).
  Per process and queue at most one such NOTIFY is in flight and they are at least ``gap``
  seconds apart; jobs committed meanwhile are covered by one trailing NOTIFY, because a
  NOTIFY sent after a commit always reveals that commit to the worker it wakes.
- ``publish(transaction=...)`` cannot know when the caller commits, so its NOTIFY must ride
  inside that transaction (Postgres folds identical notifications in one transaction into
  one). That is done only when no NOTIFY for this queue left this process within
  ``txn_window`` seconds; otherwise a trailing NOTIFY is sent outside the transaction
  ``txn_window`` later, which finds the job if the caller committed by then, and the
  workers' polling (``interval``) covers a caller that took longer.

The states live in :class:`NotifyStates`, which keeps only the most recently used ones: a
process publishing to per-entity queue names must not grow without bound.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

#: Queues whose wake-up bookkeeping one EventQueue keeps (the most recently published to).
MAX_STATES = 10_000


@dataclass(slots=True)
class NotifyState:
    """Wake-up bookkeeping for one queue in one process."""

    gap: float
    txn_window: float
    #: Monotonic time the last NOTIFY was sent (or committed inside a caller's transaction).
    last: float = float("-inf")
    #: A NOTIFY is wanted that is not covered by one already sent or in flight.
    pending: bool = False
    #: Earliest monotonic time the wanted NOTIFY may be sent.
    due: float = float("-inf")
    #: A sender is running for this queue.
    sending: bool = False

    def inside_transaction(self, now: float) -> bool:
        """Should the NOTIFY go inside the caller's transaction? (Else call :meth:`request`.)"""
        if self.sending or self.pending or now - self.last < self.txn_window:
            return False
        self.last = now
        return True

    def request(self, now: float, delay: float = 0.0) -> bool:
        """Ask for a NOTIFY sent no earlier than ``now + delay``.

        Returns True when the caller must start a sender (none is running).
        """
        self.pending = True
        self.due = max(self.due, now + delay, self.last + self.gap)
        if self.sending:
            return False
        self.sending = True
        return True

    def next_send(self, now: float) -> float | None:
        """For the sender: seconds to wait before sending (0: now), or None to stop."""
        if not self.pending:
            self.sending = False
            return None
        return max(0.0, self.due - now, self.last + self.gap - now)

    def sent(self, started: float) -> None:
        """For the sender: a NOTIFY that was sent at ``started`` committed."""
        self.last = started

    def take(self) -> None:
        """For the sender: it is about to send the wanted NOTIFY."""
        self.pending = False


class NotifyStates:
    """The :class:`NotifyState` of each queue, for at most ``limit`` queues (least recently
    used dropped first).

    Dropping a state never loses a wake-up: a sender already running holds its state and
    finishes its work, and the next publish to that queue starts from a fresh state, which
    sends at once. The worst case is one NOTIFY more than the ``gap`` would have allowed.
    """

    __slots__ = ("_gap", "_limit", "_states", "_txn_window")

    def __init__(self, *, gap: float, txn_window: float, limit: int = MAX_STATES) -> None:
        self._gap = gap
        self._txn_window = txn_window
        self._limit = limit
        self._states: OrderedDict[str, NotifyState] = OrderedDict()

    def get(self, pg_channel: str) -> NotifyState:
        """The state of ``pg_channel``'s queue (a fresh one if it was never used or dropped)."""
        states = self._states
        state = states.get(pg_channel)
        if state is None:
            state = states[pg_channel] = NotifyState(gap=self._gap, txn_window=self._txn_window)
            if len(states) > self._limit:
                states.popitem(last=False)
        else:
            states.move_to_end(pg_channel)
        return state

    def __len__(self) -> int:
        return len(self._states)
