"""Rate and ETA of a batch, from the states the relay has seen (entry times are Redis time)."""

from __future__ import annotations

from collections import deque
from typing import Final

from relay.wire import BatchState

WINDOW_MS: Final = 10_000  # rate is measured over the updates of the last 10 s
MAX_SAMPLES: Final = 32


class RateTracker:
    """Items per second over recent updates of one batch; None until two updates are known."""

    __slots__ = ("_samples", "_seq")

    def __init__(self) -> None:
        self._samples: deque[tuple[int, int]] = deque(maxlen=MAX_SAMPLES)
        self._seq = -1

    def observe(self, state: BatchState) -> tuple[float | None, float | None]:
        """Record a state (older seqs are ignored) and return (rate, eta_seconds)."""
        if state.seq > self._seq:
            self._seq = state.seq
            samples = self._samples
            if samples and (state.processed < samples[-1][1] or state.updated_at < samples[-1][0]):
                samples.clear()  # counters were reset by `set`: history says nothing any more
            # Samples closer together than WINDOW_MS / MAX_SAMPLES replace the newest one, so
            # that MAX_SAMPLES always span the whole window however fast updates come.
            if len(samples) >= 2 and state.updated_at - samples[-2][0] < WINDOW_MS / MAX_SAMPLES:
                samples[-1] = (state.updated_at, state.processed)
            else:
                samples.append((state.updated_at, state.processed))
            # Drop samples older than the window, but keep one anchor before it.
            while len(samples) > 2 and samples[1][0] < state.updated_at - WINDOW_MS:
                samples.popleft()
        return self.figures(state)

    @property
    def last_update_ms(self) -> int:
        """Redis time of the newest sample (0 before any)."""
        return self._samples[-1][0] if self._samples else 0

    def figures(self, state: BatchState) -> tuple[float | None, float | None]:
        rate = self._rate()
        return rate, eta_seconds(state, rate)

    def _rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, p0), (t1, p1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return None
        return round((p1 - p0) * 1000.0 / (t1 - t0), 3)


def eta_seconds(state: BatchState, rate: float | None) -> float | None:
    """Seconds until processed reaches total at `rate`; None if unknown or terminal."""
    if state.terminal or rate is None or rate <= 0 or state.total <= 0:
        return None
    remaining = state.total - state.processed
    return round(max(0, remaining) / rate, 1)
