"""One clock for every connection: which outboxes hold a frame that becomes due later, and when.

The throttle's trailing edge needs a wake-up when a held frame's interval ends. Instead of one
timer (or task) per connection, the relay keeps every such deadline here and runs one loop
timer for the earliest; when it fires, `pop_due(now)` gives every connection whose deadline has
passed, and each writes what its outbox says is due, in one pass. Deadlines are exact (a heap,
not a wheel with buckets), so a held frame waits no longer than its outbox asked for.

Pure: time is passed in (monotonic ms, the event loop's clock in the relay).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """The earliest pending deadline per key (a connection); older entries are dropped lazily."""

    __slots__ = ("_due", "_heap", "_order")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}  # the live deadline of each key
        self._order = itertools.count()  # ties in time: first scheduled, first due

    def __len__(self) -> int:
        return len(self._due)

    def schedule(self, key: K, due: float) -> bool:
        """Ask for `key` to be due at `due` (an earlier deadline it already has is kept).

        Returns True when `due` is now the earliest deadline of all: the caller re-arms its one
        timer for it.
        """
        current = self._due.get(key)
        if current is not None and current <= due:
            return False
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._order), key))
        return self._heap[0][0] == due

    def cancel(self, key: K) -> None:
        """Forget `key`'s deadline (a closed connection)."""
        self._due.pop(key, None)

    def pop_due(self, now: float) -> list[K]:
        """Every key whose deadline is at or before `now`, earliest first; they are forgotten."""
        heap, live = self._heap, self._due
        out: list[K] = []
        while heap and heap[0][0] <= now:
            due, _, key = heapq.heappop(heap)
            if live.get(key) == due:
                del live[key]
                out.append(key)
        return out

    def next_due(self) -> float | None:
        """The earliest live deadline, or None."""
        heap, live = self._heap, self._due
        while heap and live.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # superseded or cancelled
        if not heap:
            return None
        return heap[0][0]


class _Outbox(Protocol):
    def take_due(self, now: float) -> list[bytes]: ...

    def next_due(self) -> float | None: ...


def take_and_schedule(
    outbox: _Outbox, deadlines: Deadlines[K], key: K, now: float
) -> tuple[list[bytes], bool]:
    """What `key`'s connection writes at `now`, with its next deadline scheduled.

    Returns (frames, rearm): the frames due now, and whether the deadline just scheduled is the
    earliest of all (the one timer must be moved earlier).
    """
    frames = outbox.take_due(now)
    due = outbox.next_due()
    return frames, due is not None and deadlines.schedule(key, due)
