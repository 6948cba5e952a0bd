"""RateTracker / eta_seconds (relay.core.progress) and BatchState.progress_percentage."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.progress import MAX_SAMPLES, WINDOW_MS, RateTracker, eta_seconds
from relay.wire import MAX_COUNT, STATUSES, TERMINAL, BatchState

T0 = 1_700_000_000_000  # Redis time, ms


def state(
    seq: int,
    t: int,
    processed: int,
    *,
    total: int = 1000,
    status: str = "processing",
    successful: int | None = None,
    failed: int = 0,
) -> BatchState:
    return BatchState(
        batch_id="b1",
        user_id="u1",
        status=status,
        total=total,
        processed=processed,
        successful=processed - failed if successful is None else successful,
        failed=failed,
        seq=seq,
        started_at=T0,
        updated_at=T0 + t,
    )


# -- rate ------------------------------------------------------------------------------------------


def test_rate_is_none_until_two_samples() -> None:
    tracker = RateTracker()
    assert tracker.observe(state(1, 0, 0)) == (None, None)
    rate, eta = tracker.observe(state(2, 1000, 10))
    assert rate == 10.0
    assert eta == 99.0


def test_rate_none_when_two_samples_share_a_timestamp() -> None:
    tracker = RateTracker()
    tracker.observe(state(1, 0, 0))
    assert tracker.observe(state(2, 0, 5)) == (None, None)


def test_steady_updates_give_items_per_second() -> None:
    tracker = RateTracker()
    rate: float | None = None
    eta: float | None = None
    for i in range(30):  # 25 items every 500 ms = 50 items/s
        rate, eta = tracker.observe(state(i + 1, i * 500, i * 25))
    assert rate == 50.0
    assert eta == pytest.approx((1000 - 29 * 25) / 50.0, abs=0.05)


def test_rate_is_rounded_to_three_decimals() -> None:
    tracker = RateTracker()
    tracker.observe(state(1, 0, 0))
    rate, _ = tracker.observe(state(2, 3000, 1))
    assert rate == 0.333


def test_window_keeps_recent_samples_and_one_anchor() -> None:
    tracker = RateTracker()
    # 10 items/s for 20 s, then 100 items/s: the rate follows the last ~10 s only.
    processed = 0
    t = 0
    seq = 0
    for _ in range(20):
        seq += 1
        tracker.observe(state(seq, t, processed, total=100_000))
        t += 1000
        processed += 10
    for _ in range(15):
        seq += 1
        rate, _ = tracker.observe(state(seq, t, processed, total=100_000))
        t += 1000
        processed += 100
    samples = list(tracker._samples)
    newest = samples[-1][0]
    assert samples[0][0] < newest - WINDOW_MS  # the anchor, just before the window
    assert all(ts >= newest - WINDOW_MS for ts, _ in samples[1:])  # the rest are recent
    assert len(samples) == 12
    assert rate == 100.0  # the slow start is forgotten


def test_sample_count_is_bounded() -> None:
    tracker = RateTracker()
    for i in range(200):
        tracker.observe(state(i + 1, i * 10, i, total=10_000))
    assert len(tracker._samples) <= MAX_SAMPLES


def test_reset_when_processed_goes_backwards() -> None:
    tracker = RateTracker()
    tracker.observe(state(1, 0, 100))
    assert tracker.observe(state(2, 1000, 200))[0] == 100.0
    # `set` reset the counters: the history says nothing any more.
    assert tracker.observe(state(3, 2000, 10)) == (None, None)
    rate, _ = tracker.observe(state(4, 4000, 30))
    assert rate == 10.0


def test_reset_when_time_goes_backwards() -> None:
    tracker = RateTracker()
    tracker.observe(state(1, 5000, 0))
    tracker.observe(state(2, 6000, 100))
    assert tracker.observe(state(3, 1000, 150)) == (None, None)


def test_older_seq_is_ignored() -> None:
    tracker = RateTracker()
    tracker.observe(state(5, 0, 0))
    tracker.observe(state(6, 1000, 20))
    # A stale state (lower or equal seq) does not enter the samples.
    rate, eta = tracker.observe(state(4, 500, 900, status="completed"))
    assert rate == 20.0
    assert eta is None  # figures are computed for the state given: terminal
    assert tracker.observe(state(6, 9000, 999))[0] == 20.0
    assert len(tracker._samples) == 2


def test_eta_is_none_when_terminal() -> None:
    tracker = RateTracker()
    tracker.observe(state(1, 0, 0))
    rate, eta = tracker.observe(state(2, 1000, 100, status="cancelled"))
    assert rate == 100.0
    assert eta is None


# -- eta -------------------------------------------------------------------------------------------


def test_eta_is_remaining_over_rate() -> None:
    assert eta_seconds(state(1, 0, 250, total=1000), 50.0) == 15.0
    assert eta_seconds(state(1, 0, 0, total=10), 3.0) == 3.3


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_eta_none_when_terminal(status: str) -> None:
    assert eta_seconds(state(1, 0, 10, status=status), 5.0) is None


def test_eta_none_when_rate_unknown_or_not_positive() -> None:
    assert eta_seconds(state(1, 0, 10), None) is None
    assert eta_seconds(state(1, 0, 10), 0.0) is None
    assert eta_seconds(state(1, 0, 10), -1.0) is None


def test_eta_none_when_total_is_zero() -> None:
    assert eta_seconds(state(1, 0, 10, total=0), 5.0) is None


def test_eta_zero_when_processed_passed_total() -> None:
    assert eta_seconds(state(1, 0, 1200, total=1000), 5.0) == 0.0


# -- progress_percentage ---------------------------------------------------------------------------


def test_percentage_basic() -> None:
    assert state(1, 0, 250, total=1000).progress_percentage == 25.0
    assert state(1, 0, 1, total=3).progress_percentage == 33.33
    assert isinstance(state(1, 0, 0, total=5).progress_percentage, float)


def test_percentage_clamps_at_100() -> None:
    assert state(1, 0, 1500, total=1000).progress_percentage == 100.0


def test_percentage_zero_when_total_zero() -> None:
    assert state(1, 0, 0, total=0).progress_percentage == 0.0
    assert state(1, 0, 7, total=0).progress_percentage == 0.0
    assert state(1, 0, 7, total=0, status="failed").progress_percentage == 0.0


def test_percentage_100_when_completed() -> None:
    assert state(1, 0, 0, total=0, status="completed").progress_percentage == 100.0
    assert state(1, 0, 3, total=10, status="completed").progress_percentage == 100.0


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(0, MAX_COUNT),
    processed=st.integers(0, MAX_COUNT),
    status=st.sampled_from(sorted(STATUSES)),
)
def test_percentage_always_in_range(total: int, processed: int, status: str) -> None:
    pct = state(1, 0, processed, total=total, status=status).progress_percentage
    assert isinstance(pct, float)
    assert 0.0 <= pct <= 100.0


# -- property: figures are always sane -------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    updates=st.lists(
        st.tuples(
            st.integers(-2, 50),  # seq step (<= 0: a stale or repeated state)
            st.integers(-5_000, 60_000),  # time step, ms (negative: clock went back)
            st.integers(-1000, 10**12) | st.sampled_from([0, MAX_COUNT]),  # processed step
            st.integers(0, MAX_COUNT) | st.integers(0, 1000),  # total
            st.sampled_from(sorted(STATUSES)),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_rate_and_eta_never_negative_or_non_finite(
    updates: list[tuple[int, int, int, int, str]],
) -> None:
    tracker = RateTracker()
    seq, t, processed = 0, 0, 0
    for dseq, dt, dp, total, status in updates:
        seq = max(0, seq + dseq)
        t = max(0, t + dt)
        processed = min(MAX_COUNT, max(0, processed + dp))
        rate, eta = tracker.observe(state(seq, t, processed, total=total, status=status))
        if rate is not None:
            assert math.isfinite(rate)
            assert rate >= 0
        if eta is not None:
            assert math.isfinite(eta)
            assert eta >= 0
            assert rate is not None
            assert rate > 0
        if status in TERMINAL:
            assert eta is None


def test_fast_updates_still_span_the_whole_window() -> None:
    """100 updates/s for 20 s: the rate reflects the last ~10 s, not the last 32 updates."""
    tracker = RateTracker()
    processed = 0
    for i in range(2000):
        t = i * 10
        processed += 1 if t < 15_000 else 5  # speeds up for the last 5 s
        tracker.observe(state(i + 1, t, processed, total=10**6))
    span = tracker._samples[-1][0] - tracker._samples[0][0]
    assert WINDOW_MS * 0.9 <= span <= WINDOW_MS * 1.1
    rate, _ = tracker.figures(state(2000, 19_990, processed, total=10**6))
    assert rate is not None and 250 < rate < 350  # half slow (100/s), half fast (500/s)
