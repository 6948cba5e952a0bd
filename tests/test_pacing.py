"""One clock for all connections (relay.core.deadlines) with the outbox and the per-read
conflation (relay.core.conflate): property tests of the sans-I/O core, no real time.

The simulation drives the core exactly as the relay does: a read (one XREAD reply) arrives at
time t, its states are conflated to the newest per batch and offered to every connection's
outbox, each connection writes what is due at t and schedules its next deadline; the one timer
fires at the earliest deadline and every connection due then writes in one pass. Connections are
idle (their sockets take every frame), so any wait is the throttle's.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.conflate import newest_per_batch
from relay.core.deadlines import Deadlines, take_and_schedule
from relay.core.delivery import Outbox
from relay.wire import BatchState

BATCHES = ("a", "b", "c")
STATUSES = ("processing", "processing", "processing", "completed", "failed")


def state(batch: str, seq: int, status: str) -> BatchState:
    return BatchState(
        batch_id=batch,
        user_id="u",
        status=status,
        total=100,
        processed=seq,
        successful=seq,
        failed=0,
        seq=seq,
        started_at=0,
        updated_at=seq,
    )


def frame_of(s: BatchState) -> bytes:
    return f"{s.batch_id}:{s.seq}:{s.status}".encode()


def parse_frame(frame: bytes) -> tuple[str, int, str]:
    batch, seq, status = frame.decode().split(":")
    return batch, int(seq), status


@dataclass
class Sent:
    at: float
    batch: str
    seq: int
    status: str


@dataclass
class Sim:
    interval: float
    connections: int
    outboxes: list[Outbox] = field(default_factory=list)
    deadlines: Deadlines[int] = field(default_factory=Deadlines)
    sent: list[list[Sent]] = field(default_factory=list)
    timer_at: float | None = None  # the one timer
    rearms: int = 0
    before: dict[tuple[str, int], str] = field(default_factory=dict)  # status offered before
    offered: dict[str, str] = field(default_factory=dict)  # status of the newest offered state

    def __post_init__(self) -> None:
        self.outboxes = [Outbox(self.interval) for _ in range(self.connections)]
        self.sent = [[] for _ in range(self.connections)]

    def write(self, key: int, now: float) -> None:
        frames, rearm = take_and_schedule(self.outboxes[key], self.deadlines, key, now)
        for f in frames:
            batch, seq, status = parse_frame(f)
            self.sent[key].append(Sent(now, batch, seq, status))
        if rearm:
            self.rearms += 1
            self.timer_at = self.deadlines.next_due()

    def run_timers_until(self, t: float) -> None:
        """The loop timer fires at each earliest deadline up to t (exactly on time)."""
        while True:
            due = self.deadlines.next_due()
            if due is None or due > t:
                self.timer_at = due
                return
            assert self.timer_at is not None and self.timer_at <= due  # armed early enough
            for key in self.deadlines.pop_due(due):
                self.write(key, due)

    def read(self, t: float, states: list[BatchState]) -> None:
        self.run_timers_until(t)
        for s in newest_per_batch(states):
            self.before[s.batch_id, s.seq] = self.offered.get(s.batch_id, "")
            self.offered[s.batch_id] = s.status
            for key, box in enumerate(self.outboxes):
                terminal = s.status if s.terminal else None
                if box.offer(s.batch_id, s.seq, frame_of(s), now=t, terminal=terminal):
                    self.write(key, t)

    def finish(self) -> None:
        self.run_timers_until(float("inf"))


Read = tuple[float, list[tuple[str, str]]]  # (ms since the previous read, [(batch, status)])


def reads_strategy() -> st.SearchStrategy[list[Read]]:
    entry = st.tuples(st.sampled_from(BATCHES), st.sampled_from(STATUSES))
    gap = st.one_of(st.just(0.0), st.floats(0.0, 300.0), st.sampled_from([50.0, 100.0, 99.5]))
    return st.lists(st.tuples(gap, st.lists(entry, min_size=1, max_size=8)), max_size=40)


def simulate(
    interval: float, connections: int, reads: list[Read]
) -> tuple[Sim, list[tuple[float, BatchState]]]:
    sim = Sim(interval, connections)
    seqs: dict[str, int] = defaultdict(int)
    arrived: list[tuple[float, BatchState]] = []
    t = 1000.0
    for gap, entries in reads:
        t += gap
        states = []
        for batch, status in entries:
            seqs[batch] += 1
            states.append(state(batch, seqs[batch], status))
        arrived += [(t, s) for s in states]
        sim.read(t, states)
    sim.finish()
    return sim, arrived


@settings(max_examples=300, deadline=None)
@given(
    interval=st.sampled_from([0.0, 50.0, 100.0]),
    connections=st.integers(1, 3),
    reads=reads_strategy(),
)
def test_pacing_properties(interval: float, connections: int, reads: list[Read]) -> None:
    sim, arrived = simulate(interval, connections, reads)
    last_seq: dict[str, int] = {}
    for _, s in arrived:
        last_seq[s.batch_id] = s.seq
    for sent in sim.sent:
        by_batch: dict[str, list[Sent]] = defaultdict(list)
        for x in sent:
            by_batch[x.batch].append(x)
        for batch, frames in by_batch.items():
            # frames never go backwards in seq per batch (nor repeat)
            assert all(a.seq < b.seq for a, b in itertools.pairwise(frames))
            # the last state always goes
            assert frames[-1].seq == last_seq[batch]
            # at most one frame per interval, except a batch's turn to a terminal status
            for a, b in itertools.pairwise(frames):
                was = sim.before[batch, b.seq]
                turn = b.status in ("completed", "failed") and was != b.status
                assert turn or b.at - a.at >= interval - 1e-6, (a, b, was)  # float sums
        assert set(by_batch) == set(last_seq)
        # no state waits more than `interval` past its arrival: by then it, or a newer state
        # of its batch, has been written
        for t, s in arrived:
            assert any(
                x.batch == s.batch_id and x.seq >= s.seq and x.at <= t + interval for x in sent
            ), (t, s)
        # frames are written at the time of a read or of a deadline, never before a state came
        assert all(x.at >= 1000.0 for x in sent)


@settings(max_examples=200, deadline=None)
@given(interval=st.sampled_from([50.0, 100.0]), reads=reads_strategy())
def test_terminal_turn_goes_at_once(interval: float, reads: list[Read]) -> None:
    """The newest state of a read that turns its batch terminal, or changes its terminal
    status, is written at the read."""
    sim, arrived = simulate(interval, 1, reads)
    for t, s in arrived:
        before = sim.before.get((s.batch_id, s.seq))
        if s.terminal and before is not None and before != s.status:
            assert any(
                x.batch == s.batch_id and x.seq == s.seq and x.at == t for x in sim.sent[0]
            ), (t, s)


def test_deadlines_keep_the_earliest_per_key_and_pop_in_order() -> None:
    d: Deadlines[str] = Deadlines()
    assert d.schedule("x", 200.0) is True
    assert d.schedule("y", 150.0) is True  # the new earliest: re-arm
    assert d.schedule("x", 300.0) is False  # later than what x has: kept at 200
    assert d.schedule("z", 250.0) is False
    assert d.next_due() == 150.0
    assert d.pop_due(149.9) == []
    assert d.pop_due(200.0) == ["y", "x"]
    assert d.next_due() == 250.0
    d.cancel("z")
    assert d.next_due() is None
    assert len(d) == 0


@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0, 1000)), max_size=60), st.floats(0, 1000))
def test_deadlines_pop_exactly_the_due_keys(ops: list[tuple[int, float]], now: float) -> None:
    d: Deadlines[int] = Deadlines()
    earliest: dict[int, float] = {}
    for key, due in ops:
        d.schedule(key, due)
        earliest[key] = min(due, earliest.get(key, due))
    want = sorted((due, key) for key, due in earliest.items() if due <= now)
    got = d.pop_due(now)
    assert sorted(got) == sorted(key for _, key in want)
    rest = [due for due in earliest.values() if due > now]
    assert d.next_due() == (min(rest) if rest else None)


@given(
    st.lists(
        st.tuples(st.sampled_from(BATCHES), st.integers(1, 20), st.sampled_from(STATUSES)),
        max_size=30,
    )
)
def test_newest_per_batch(entries: list[tuple[str, int, str]]) -> None:
    states = [state(b, seq, status) for b, seq, status in entries]
    out = newest_per_batch(states)
    assert len({s.batch_id for s in out}) == len(out)
    for s in out:
        same = [x for x in states if x.batch_id == s.batch_id]
        assert s.seq == max(x.seq for x in same)
        assert s is [x for x in same if x.seq == s.seq][-1]  # a tie goes to the later entry
    assert [s.batch_id for s in out] == list(dict.fromkeys(s.batch_id for s in states))
