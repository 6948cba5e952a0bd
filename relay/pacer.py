"""The one loop timer behind every connection's throttle (the I/O side of relay.core.deadlines).

A connection whose outbox holds a frame that is not due yet (the throttle's trailing edge)
registers its deadline here. One `loop.call_at` timer is armed for the earliest deadline of all
connections; when it fires, every connection due by then writes what its outbox says is due,
in one pass, and registers its next deadline. Time is the event loop's clock in ms everywhere
(the fan-out's `now`, the outboxes' deadlines, this timer).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog

from relay.core.deadlines import Deadlines

log = structlog.get_logger("relay.pacer")


class Paced(Protocol):
    """A connection as the pacer sees it."""

    def write_due(self, now: float) -> None:
        """Write what is due at `now` (loop ms) and register the next deadline, if any."""

    def __hash__(self) -> int: ...


def now_ms() -> float:
    """The clock of every delivery decision: the running loop's time, in ms."""
    return asyncio.get_running_loop().time() * 1000


class Pacer:
    def __init__(self) -> None:
        self.deadlines: Deadlines[Paced] = Deadlines()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None  # the deadline (ms) the timer is armed for
        self.ticks = 0

    def arm(self) -> None:
        """(Re-)arm the one timer for the earliest deadline; called when it moved earlier."""
        due = self.deadlines.next_due()
        if due == self._armed_for:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_for = due
        if due is not None:
            self._timer = asyncio.get_running_loop().call_at(due / 1000, self._tick)

    def forget(self, conn: Paced) -> None:
        self.deadlines.cancel(conn)

    def _tick(self) -> None:
        self._timer = None
        # The loop's timer may fire a fraction of a ms early (ms resolution): it stands for
        # the deadline it was armed for.
        now = max(now_ms(), self._armed_for or 0.0)
        self._armed_for = None
        self.ticks += 1
        try:
            for conn in self.deadlines.pop_due(now):
                try:
                    conn.write_due(now)
                except Exception:  # one connection's failure must not stop the clock
                    log.exception("write_due_failed")
        finally:
            self.arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_for = None
