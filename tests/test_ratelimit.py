"""The client-frame token bucket (pure, time passed in)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.core.ratelimit import BURST_SECONDS, MessageBucket


def test_burst_then_steady_rate() -> None:
    bucket = MessageBucket(10.0)
    burst = int(10 * BURST_SECONDS)
    assert all(bucket.take(0.0) for _ in range(burst))
    assert not bucket.take(0.0)  # the burst is spent
    assert bucket.take(0.1)  # 0.1 s at 10/s earns one frame
    assert not bucket.take(0.1)


@given(st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=1, max_size=300))
def test_never_more_than_burst_plus_rate_times_elapsed(gaps: list[float]) -> None:
    rate = 5.0
    bucket = MessageBucket(rate)
    now, taken = 0.0, 0
    for gap in gaps:
        now += gap
        taken += bucket.take(now)
    assert taken <= rate * BURST_SECONDS + rate * now + 1e-9
