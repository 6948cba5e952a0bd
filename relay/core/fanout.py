"""Fan-out: user id -> the user's open connections, and the per-user figures (rate, ETA).

Pure: the reader calls `publish(state, now)`, the server calls `join`/`leave`. A state for a
user with no connection costs one dict lookup. A frame is encoded once per update and the same
text is offered to every connection of the user.
"""

from __future__ import annotations

from typing import Protocol

from relay.core.delivery import Outbox
from relay.core.progress import RateTracker
from relay.wire import BatchState, progress_frame


class Subscriber(Protocol):
    """One open, authenticated connection as the fan-out sees it."""

    outbox: Outbox

    def wake(self, now: float | None = None) -> None:
        """Something new may be due (at monotonic ms `now`): let the connection write it."""


class _Room:
    __slots__ = ("subscribers", "trackers")

    def __init__(self) -> None:
        self.subscribers: list[Subscriber] = []
        self.trackers: dict[str, RateTracker] = {}

    def frame(self, state: BatchState, wall_ms: float) -> bytes:
        """Encode the state's frame once (with the batch's rate and ETA)."""
        tracker = self.trackers.get(state.batch_id)
        if tracker is None:
            tracker = self.trackers[state.batch_id] = RateTracker()
        rate, eta = tracker.observe(state)
        return progress_frame(state, rate=rate, eta_seconds=eta, now_ms=wall_ms)


class FanOut:
    def __init__(self) -> None:
        self._rooms: dict[str, _Room] = {}
        self.frames_built = 0

    def join(self, user_id: str, sub: Subscriber) -> int:
        """Add a connection; returns how many connections the user now has."""
        room = self._rooms.get(user_id)
        if room is None:
            room = self._rooms[user_id] = _Room()
        room.subscribers.append(sub)
        return len(room.subscribers)

    def leave(self, user_id: str, sub: Subscriber) -> None:
        room = self._rooms.get(user_id)
        if room is None:
            return
        if sub in room.subscribers:
            room.subscribers.remove(sub)
        if not room.subscribers:
            del self._rooms[user_id]

    def watches(self, user_id: str) -> bool:
        """Has the user a connection here? (The reader skips other users' entries.)"""
        return user_id in self._rooms

    def connections_of(self, user_id: str) -> int:
        room = self._rooms.get(user_id)
        return len(room.subscribers) if room else 0

    def user_ids(self) -> list[str]:
        return list(self._rooms)

    def prune(self, now: float, wall_ms: float, idle_ms: float) -> None:
        """Drop rate trackers and per-connection slots of batches idle for `idle_ms`."""
        for room in self._rooms.values():
            stale = [b for b, t in room.trackers.items() if t.last_update_ms < wall_ms - idle_ms]
            for batch_id in stale:
                del room.trackers[batch_id]
            for sub in room.subscribers:
                sub.outbox.prune(now, idle_ms)

    def forget_seqs(self) -> None:
        """After Redis lost its data, batches restart at seq 1: accept them again."""
        for room in self._rooms.values():
            room.trackers.clear()
            for sub in room.subscribers:
                sub.outbox.forget_seqs()

    def publish(self, state: BatchState, now: float, wall_ms: float) -> None:
        """Offer a new state to every connection of its owner. `now` is monotonic ms."""
        room = self._rooms.get(state.user_id)
        if room is None:
            return
        frame = room.frame(state, wall_ms)
        terminal = state.status if state.terminal else None
        self.frames_built += 1
        for sub in room.subscribers:
            if sub.outbox.offer(state.batch_id, state.seq, frame, terminal=terminal, now=now):
                sub.wake(now)

    def snapshot(
        self, user_id: str, sub: Subscriber, states: list[BatchState], now: float, wall_ms: float
    ) -> None:
        """Offer a new connection its user's current batches (sent at once, then live)."""
        room = self._rooms.get(user_id)
        if room is None:
            return
        for state in states:
            frame = room.frame(state, wall_ms)
            terminal = state.status if state.terminal else None
            sub.outbox.offer(
                state.batch_id, state.seq, frame, urgent=True, terminal=terminal, now=now
            )
        sub.wake(now)
