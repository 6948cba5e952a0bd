"""Outbox (relay.core.delivery): seq order, throttling, conflation, urgent and control frames.

Pure: time is passed in as ms floats. The property tests drive an Outbox with random offers,
control frames and takes, and check it against a small model of SPEC.md section 2, "Delivery".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.delivery import Outbox

INTERVAL = 100.0


def frame(batch: str, seq: int, pad: int = 0) -> bytes:
    return (f"{batch}:{seq}:" + "x" * pad).encode()


# -- leading / trailing edge -----------------------------------------------------------------------


def test_first_frame_is_due_at_once() -> None:
    box = Outbox(INTERVAL)
    assert box.next_due() is None
    assert box.offer("b", 1, frame("b", 1), urgent=False, now=1000.0) is True
    assert box.next_due() == 1000.0
    assert box.take_due(1000.0) == [frame("b", 1)]
    assert box.next_due() is None
    assert box.pending_bytes == 0


def test_second_frame_within_interval_waits_for_trailing_edge() -> None:
    box = Outbox(INTERVAL)
    box.offer("b", 1, frame("b", 1), urgent=False, now=1000.0)
    assert box.take_due(1010.0) == [frame("b", 1)]  # sent_at = 1010 (when taken)
    assert box.offer("b", 2, frame("b", 2), urgent=False, now=1030.0) is True  # new deadline
    assert box.next_due() == 1110.0
    assert box.take_due(1030.0) == []
    assert box.take_due(1109.9) == []
    assert box.take_due(1110.0) == [frame("b", 2)]


def test_trailing_edge_carries_latest_frame_and_counts_merges() -> None:
    box = Outbox(INTERVAL)
    box.offer("b", 1, frame("b", 1), urgent=False, now=0.0)
    assert box.take_due(0.0) == [frame("b", 1)]
    assert box.offer("b", 2, frame("b", 2), urgent=False, now=10.0) is True
    # Merged into the waiting frame: same deadline, no wake-up needed.
    assert box.offer("b", 3, frame("b", 3), urgent=False, now=20.0) is False
    assert box.offer("b", 4, frame("b", 4, pad=7), urgent=False, now=30.0) is False
    assert box.merged == 2
    assert box.pending_bytes == len(frame("b", 4, pad=7))
    assert box.next_due() == 100.0
    assert box.take_due(100.0) == [frame("b", 4, pad=7)]
    assert box.pending_bytes == 0


def test_quiet_batch_goes_at_once_again() -> None:
    box = Outbox(INTERVAL)
    box.offer("b", 1, frame("b", 1), urgent=False, now=0.0)
    box.take_due(0.0)
    assert box.offer("b", 2, frame("b", 2), urgent=False, now=500.0) is True
    assert box.next_due() == 500.0
    assert box.take_due(500.0) == [frame("b", 2)]


def test_at_most_one_frame_per_batch_per_interval() -> None:
    box = Outbox(INTERVAL)
    taken: list[float] = []
    for seq, t in enumerate(range(0, 1000, 7), start=1):  # an update every 7 ms
        box.offer("b", seq, frame("b", seq), urgent=False, now=float(t))
        for now in range(t, t + 7):  # the writer looks every ms
            out = box.take_due(float(now))
            assert len(out) <= 1
            if out:
                taken.append(float(now))
    assert len(taken) >= 9
    assert all(b - a >= INTERVAL for a, b in itertools.pairwise(taken))


def test_batches_are_throttled_independently() -> None:
    box = Outbox(INTERVAL)
    box.offer("a", 1, frame("a", 1), urgent=False, now=0.0)
    box.take_due(0.0)
    box.offer("a", 2, frame("a", 2), urgent=False, now=10.0)
    assert box.offer("b", 1, frame("b", 1), urgent=False, now=10.0) is True
    assert box.next_due() == 10.0
    assert box.take_due(10.0) == [frame("b", 1)]
    assert box.next_due() == 100.0
    assert box.take_due(100.0) == [frame("a", 2)]


def test_frames_of_several_batches_come_in_arrival_order() -> None:
    box = Outbox(INTERVAL)
    for batch in ("c", "a", "b"):
        box.offer(batch, 1, frame(batch, 1), urgent=False, now=0.0)
    assert box.take_due(0.0) == [frame("c", 1), frame("a", 1), frame("b", 1)]


# -- seq order -------------------------------------------------------------------------------------


def test_older_or_equal_seq_is_dropped() -> None:
    box = Outbox(INTERVAL)
    assert box.offer("b", 5, frame("b", 5), urgent=False, now=0.0) is True
    assert box.offer("b", 5, frame("b", 5, pad=1), urgent=False, now=0.0) is False
    assert box.offer("b", 3, frame("b", 3), urgent=True, now=0.0) is False
    assert box.merged == 0
    assert box.pending_bytes == len(frame("b", 5))
    assert box.take_due(0.0) == [frame("b", 5)]
    # Still dropped after the frame went out.
    assert box.offer("b", 4, frame("b", 4), urgent=True, now=500.0) is False
    assert box.offer("b", 5, frame("b", 5), urgent=True, now=500.0) is False
    assert box.next_due() is None
    assert box.take_due(1000.0) == []
    assert box.pending_bytes == 0


def test_seq_is_tracked_per_batch() -> None:
    box = Outbox(INTERVAL)
    box.offer("a", 10, frame("a", 10), urgent=False, now=0.0)
    assert box.offer("b", 1, frame("b", 1), urgent=False, now=0.0) is True
    assert box.take_due(0.0) == [frame("a", 10), frame("b", 1)]


# -- urgent frames ---------------------------------------------------------------------------------


def test_urgent_frame_is_due_at_once_inside_the_interval() -> None:
    box = Outbox(INTERVAL)
    box.offer("b", 1, frame("b", 1), urgent=False, now=0.0)
    box.take_due(0.0)
    assert box.offer("b", 2, frame("b", 2), urgent=True, now=10.0) is True
    assert box.next_due() == 10.0
    assert box.take_due(10.0) == [frame("b", 2)]


def test_urgent_frame_merged_into_waiting_frame_is_due_at_once() -> None:
    box = Outbox(INTERVAL)
    box.offer("b", 1, frame("b", 1), urgent=False, now=0.0)
    box.take_due(0.0)
    box.offer("b", 2, frame("b", 2), urgent=False, now=10.0)
    assert box.offer("b", 3, frame("b", 3), urgent=True, now=20.0) is True
    assert box.merged == 1
    assert box.take_due(20.0) == [frame("b", 3)]


def test_urgent_deadline_survives_a_later_merge() -> None:
    """A terminal frame is due at once; a later update merged into it must not delay it."""
    box = Outbox(INTERVAL)
    box.offer("b", 1, frame("b", 1), urgent=False, now=0.0)
    box.take_due(0.0)
    box.offer("b", 2, frame("b", 2), urgent=True, now=10.0)  # turns terminal: due at 10
    box.offer("b", 3, frame("b", 3), urgent=False, now=20.0)  # writer was slow: merged
    assert box.next_due() == 10.0
    assert box.take_due(25.0) == [frame("b", 3)]


# -- control frames --------------------------------------------------------------------------------


def test_control_frames_come_first_and_are_always_due() -> None:
    box = Outbox(INTERVAL)
    box.offer("b", 1, frame("b", 1), urgent=False, now=0.0)
    box.take_due(0.0)
    box.offer("b", 2, frame("b", 2), urgent=False, now=10.0)
    box.offer("c", 1, frame("c", 1), urgent=False, now=10.0)
    box.control(b'{"action":"ping"}')
    box.control(b'{"action":"pong"}')
    assert box.next_due() == float("-inf")
    assert box.pending_bytes == sum(
        len(f) for f in (frame("b", 2), frame("c", 1), b'{"action":"ping"}', b'{"action":"pong"}')
    )
    assert box.take_due(10.0) == [b'{"action":"ping"}', b'{"action":"pong"}', frame("c", 1)]
    assert box.pending_bytes == len(frame("b", 2))
    assert box.next_due() == 100.0
    box.control(b"late")
    assert box.take_due(20.0) == [b"late"]
    assert box.take_due(100.0) == [frame("b", 2)]
    assert box.pending_bytes == 0


# -- clear -----------------------------------------------------------------------------------------


def test_clear_drops_everything_waiting_but_keeps_seq_order() -> None:
    box = Outbox(INTERVAL)
    box.offer("a", 3, frame("a", 3), urgent=False, now=0.0)
    box.offer("b", 1, frame("b", 1), urgent=False, now=0.0)
    box.control(b"ping")
    box.clear()
    assert box.pending_bytes == 0
    assert box.next_due() is None
    assert box.take_due(1000.0) == []
    assert box.offer("a", 2, frame("a", 2), urgent=False, now=1000.0) is False
    assert box.offer("a", 4, frame("a", 4), urgent=False, now=1000.0) is True
    assert box.take_due(1000.0) == [frame("a", 4)]
    assert box.pending_bytes == 0


# -- property tests --------------------------------------------------------------------------------

BATCHES = ("a", "b", "c", "d")


@dataclass
class Offer:
    batch: int
    seq: int
    urgent: bool
    pad: int
    dt: int


@dataclass
class Take:
    dt: int


@dataclass
class Control:
    pad: int


Op = Offer | Take | Control


def ops_strategy() -> st.SearchStrategy[tuple[bool, list[Op]]]:
    offer = st.builds(
        Offer,
        batch=st.integers(0, len(BATCHES) - 1),
        seq=st.integers(1, 40),  # a step when seqs increase, else the seq itself
        urgent=st.sampled_from([False, False, False, True]),
        pad=st.integers(0, 20),
        dt=st.integers(0, 60),
    )
    take = st.builds(Take, dt=st.integers(0, 250))  # sometimes a very slow writer
    control = st.builds(Control, pad=st.integers(0, 5))
    op: st.SearchStrategy[Op] = st.one_of(offer, offer, take, control)
    return st.tuples(st.booleans(), st.lists(op, max_size=80))


@dataclass
class _Model:
    """What SPEC.md says one connection's outbox holds, per batch."""

    interval: float
    highest: dict[str, int] = field(default_factory=dict)  # highest seq offered
    waiting: dict[str, bytes] = field(default_factory=dict)  # latest accepted frame not yet taken
    due: dict[str, float] = field(default_factory=dict)  # earliest time the waiting one may go
    urgent: dict[str, bool] = field(default_factory=dict)  # an urgent frame merged into it
    sent_at: dict[str, float] = field(default_factory=dict)
    control: list[bytes] = field(default_factory=list)

    def offer(self, batch: str, seq: int, text: bytes, urgent: bool, now: float) -> bool:
        if seq <= self.highest.get(batch, -1):
            return False
        self.highest[batch] = seq
        if urgent or batch not in self.sent_at:
            due = now
        else:
            due = max(now, self.sent_at[batch] + self.interval)
        self.due[batch] = min(due, self.due.get(batch, due))
        self.urgent[batch] = urgent or self.urgent.get(batch, False)
        self.waiting[batch] = text
        return True

    def pending_bytes(self) -> int:
        return sum(map(len, self.waiting.values())) + sum(map(len, self.control))

    def next_due(self) -> float | None:
        if self.control:
            return float("-inf")
        return min(self.due.values(), default=None)


def _check_take(
    box: Outbox,
    model: _Model,
    now: float,
    taken: dict[str, list[tuple[float, int, bytes]]],
    interval: float,
) -> None:
    must_go = {b for b, due in model.due.items() if due <= now}
    out = box.take_due(now)
    n_control = len(model.control)
    assert out[:n_control] == model.control  # control frames first, in order
    model.control.clear()
    seen: set[str] = set()
    for text in out[n_control:]:
        batch, seq_text, _ = text.decode().split(":", 2)
        seq = int(seq_text)
        assert batch not in seen  # at most one frame per batch per take
        seen.add(batch)
        assert text == model.waiting[batch]  # the latest accepted frame (conflation)
        history = taken.setdefault(batch, [])
        if history:
            last_time, last_seq, _ = history[-1]
            assert seq > last_seq  # seq never goes backwards
            if not model.urgent[batch]:
                assert now - last_time >= interval  # throttled unless urgent
        history.append((now, seq, text))
        del model.waiting[batch], model.due[batch], model.urgent[batch]
        model.sent_at[batch] = now
    assert must_go <= seen  # nothing due is held back (leading edge, trailing edge, urgent)
    assert seen <= must_go  # nothing goes early


@settings(max_examples=200, deadline=None)
@given(
    interval=st.sampled_from([1.0, 50.0, 100.0, 175.5]),
    scenario=ops_strategy(),
)
def test_outbox_against_model(interval: float, scenario: tuple[bool, list[Op]]) -> None:
    increasing, ops = scenario
    box = Outbox(interval)
    model = _Model(interval)
    now = 0.0
    last_seq = dict.fromkeys(BATCHES, 0)
    taken: dict[str, list[tuple[float, int, bytes]]] = {}
    merged = 0
    for op in ops:
        if isinstance(op, Offer):
            now += op.dt
            batch = BATCHES[op.batch]
            if increasing:
                last_seq[batch] += op.seq
                seq = last_seq[batch]
            else:
                seq = op.seq
            text = frame(batch, seq, op.pad)
            was_waiting = batch in model.waiting
            accepted = model.offer(batch, seq, text, op.urgent, now)
            merged += accepted and was_waiting
            wake = box.offer(batch, seq, text, urgent=op.urgent, now=now)
            if not accepted:
                assert wake is False
            elif not was_waiting or model.due[batch] <= now:
                assert wake is True  # the writer must look again
        elif isinstance(op, Control):
            text = ("ctl" + "!" * op.pad).encode()
            box.control(text)
            model.control.append(text)
        else:
            now += op.dt
            _check_take(box, model, now, taken, interval)
        assert box.pending_bytes >= 0
        assert box.pending_bytes == model.pending_bytes()
        assert box.next_due() == model.next_due()
        assert box.merged == merged

    # Final drain: past every deadline, everything still waiting goes out.
    now += interval + 1
    _check_take(box, model, now, taken, interval)
    assert box.pending_bytes == 0
    assert box.next_due() is None
    assert box.take_due(now + 10 * interval) == []
    for batch, highest in model.highest.items():
        assert taken[batch][-1][1] == highest  # the final state of every batch arrived


@settings(max_examples=100, deadline=None)
@given(
    seqs=st.permutations(list(range(1, 30))),
    steps=st.lists(st.integers(0, 40), min_size=29, max_size=29),
    take_every=st.integers(1, 5),
)
def test_shuffled_seqs_single_batch(seqs: list[int], steps: list[int], take_every: int) -> None:
    box = Outbox(INTERVAL)
    now = 0.0
    taken: list[tuple[float, int]] = []
    for i, (seq, dt) in enumerate(zip(seqs, steps, strict=True)):
        now += dt
        box.offer("b", seq, frame("b", seq), urgent=False, now=now)
        if i % take_every == 0:
            taken += [(now, int(f.split(b":")[1])) for f in box.take_due(now)]
        assert box.pending_bytes >= 0
    now += INTERVAL
    taken += [(now, int(f.split(b":")[1])) for f in box.take_due(now)]
    assert box.pending_bytes == 0
    assert [s for _, s in taken] == sorted({s for _, s in taken})
    assert taken[-1][1] == 29
    times = [t for t, _ in taken]
    assert all(b - a >= INTERVAL for a, b in itertools.pairwise(times))


# -- terminal corrections --------------------------------------------------------------------------


def test_change_from_one_terminal_status_to_another_is_due_at_once() -> None:
    """completed, then a correction to failed within the interval: sent at once (SPEC.md 2)."""
    box = Outbox(INTERVAL)
    box.offer("b", 1, frame("b", 1), terminal="completed", now=0.0)
    assert box.take_due(0.0) == [frame("b", 1)]
    assert box.offer("b", 2, frame("b", 2), terminal="failed", now=10.0) is True
    assert box.take_due(10.0) == [frame("b", 2)]


def test_update_of_a_terminal_batch_that_keeps_its_status_is_throttled() -> None:
    """Counters still move after completion (SPEC.md 1): those updates follow the interval."""
    box = Outbox(INTERVAL)
    box.offer("b", 1, frame("b", 1), terminal="completed", now=0.0)
    box.take_due(0.0)
    box.offer("b", 2, frame("b", 2), terminal="completed", now=10.0)
    assert box.take_due(10.0) == []
    assert box.next_due() == 100.0
