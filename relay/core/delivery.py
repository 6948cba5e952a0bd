"""What one connection should receive next: seq order, throttling and conflation.

An `Outbox` belongs to one connection. The fan-out offers it every new frame of the user's
batches (encoded once, shared by all connections); the connection's writer takes what is due.

Rules (docs/PROTOCOL.md, "Delivery"):
- per batch, seq never goes backwards: an offer older than what was accepted is dropped;
- at most one frame per batch per `min_interval_ms`: the first change goes at once (leading
  edge); changes within the interval replace each other (conflation) and the latest goes when
  the interval ends (trailing edge);
- a batch's turn to a terminal state, and any change from one terminal status to another,
  goes at once;
- a slow connection that has not taken its frames yet keeps only the latest frame per batch.
Control frames (ping) are queued in order and always due.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TypeAlias

Frame: TypeAlias = bytes  # encoded once (UTF-8 JSON), shared by every connection of the user


@dataclass(slots=True)
class _Slot:
    seq: int = -1  # highest seq accepted for this batch
    sent_at: float | None = None  # when the last frame of this batch was taken (ms)
    frame: Frame | None = None  # waiting frame, if any
    due: float = 0.0  # when the waiting frame may go (ms)
    terminal: str | None = None  # the latest accepted state's status, when it is terminal


class Outbox:
    __slots__ = ("_control", "_interval", "_queued", "_slots", "merged", "pending_bytes")

    def __init__(self, min_interval_ms: float) -> None:
        self._interval = float(min_interval_ms)
        self._slots: dict[str, _Slot] = {}
        self._queued: dict[str, _Slot] = {}  # slots holding a frame, in arrival order
        self._control: deque[Frame] = deque()
        self.pending_bytes = 0  # size of the frames waiting here
        self.merged = 0  # frames replaced by a newer one before they were taken

    def offer(
        self,
        batch_id: str,
        seq: int,
        frame: Frame,
        *,
        now: float,
        urgent: bool = False,
        terminal: str | None = None,
    ) -> bool:
        """Accept a frame. `terminal` is the state's status when it is terminal. The frame skips
        the interval when `urgent`, or when its terminal status differs from the last state this
        connection accepted for the batch (a turn to a terminal status, or a correction from one
        to another, goes at once, whatever other connections of the user saw).

        Returns True when the writer must look again: the frame is due now, or a new
        deadline appeared. A frame merged into one already waiting needs no wake-up.
        """
        slot = self._slots.get(batch_id)
        if slot is None:
            slot = self._slots[batch_id] = _Slot()
        if seq <= slot.seq:
            return False
        slot.seq = seq
        urgent = urgent or (terminal is not None and terminal != slot.terminal)
        slot.terminal = terminal
        merged = slot.frame is not None
        if slot.frame is not None:
            self.merged += 1
            self.pending_bytes -= len(slot.frame)
        else:
            self._queued[batch_id] = slot
        slot.frame = frame
        self.pending_bytes += len(frame)
        due = now if urgent or slot.sent_at is None else max(now, slot.sent_at + self._interval)
        # A merge never pushes back a frame already waiting (an urgent one stays due at once).
        slot.due = min(slot.due, due) if merged else due
        return slot.due <= now or not merged

    def control(self, frame: Frame) -> None:
        self._control.append(frame)
        self.pending_bytes += len(frame)

    def take_due(self, now: float) -> list[Frame]:
        """Frames to write now, control frames first; marks their batches as sent at `now`."""
        if self._control:
            out = list(self._control)
            self._control.clear()
        else:
            out = []
        queued = self._queued
        if queued:
            done: list[str] = []
            for batch_id, slot in queued.items():
                frame = slot.frame
                if slot.due <= now and frame is not None:
                    out.append(frame)
                    slot.frame = None
                    slot.sent_at = now
                    done.append(batch_id)
            for batch_id in done:
                del queued[batch_id]
        if out:
            self.pending_bytes -= sum(map(len, out))
        return out

    def waiting(self) -> bool:
        """Is any frame waiting here (due or not)?"""
        return bool(self._queued or self._control)

    def next_due(self) -> float | None:
        """The earliest time (ms) something becomes due; None when nothing waits."""
        if self._control:
            return float("-inf")
        if not self._queued:
            return None
        return min(slot.due for slot in self._queued.values())

    def prune(self, now: float, idle_ms: float) -> int:
        """Forget batches with nothing waiting and nothing sent for `idle_ms`.

        Keeps a long-lived connection's memory bounded by its recently active batches. A pruned
        batch that changes again simply starts over (its next frame goes at once).
        """
        stale = [
            batch_id
            for batch_id, slot in self._slots.items()
            if slot.frame is None and slot.sent_at is not None and slot.sent_at < now - idle_ms
        ]
        for batch_id in stale:
            del self._slots[batch_id]
        return len(stale)

    def forget_seqs(self) -> None:
        """Accept any seq again (the source was reset); throttling state is kept."""
        for slot in self._slots.values():
            slot.seq = -1

    def clear(self) -> None:
        self._control.clear()
        for slot in self._queued.values():
            slot.frame = None
        self._queued.clear()
        self.pending_bytes = 0
