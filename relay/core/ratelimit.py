"""Client frame rate limit: a token bucket with time passed in."""

from __future__ import annotations

from typing import Final

BURST_SECONDS: Final = 2.0  # the bucket holds this many seconds' worth of frames


class MessageBucket:
    """Token bucket for client frames: `rate` per second, bursts of BURST_SECONDS * rate."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * BURST_SECONDS)
        self._tokens = self.capacity
        self._last: float | None = None

    def take(self, now: float) -> bool:
        """Spend one token at monotonic time `now` (s); False when the bucket is empty."""
        if self._last is not None:
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
