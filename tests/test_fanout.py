"""FanOut (relay.core.fanout): rooms per user, frames encoded once, publish/snapshot/join/leave."""

from __future__ import annotations

import json
from typing import Any

from relay.core.delivery import Outbox
from relay.core.fanout import FanOut, Subscriber
from relay.wire import BatchState

INTERVAL = 100.0
WALL = 1_700_000_000_000.0


class RecordingOutbox(Outbox):
    """An Outbox that also remembers the `urgent` flag of every offer."""

    def __init__(self, min_interval_ms: float) -> None:
        super().__init__(min_interval_ms)
        self.offers: list[tuple[str, int, bool]] = []

    def offer(
        self,
        batch_id: str,
        seq: int,
        frame: bytes,
        *,
        now: float,
        urgent: bool = False,
        terminal: str | None = None,
    ) -> bool:
        slot = self._slots.get(batch_id)
        turned = (
            terminal is not None
            and terminal != (slot.terminal if slot is not None else None)
            and seq > (slot.seq if slot else -1)
        )
        self.offers.append((batch_id, seq, urgent or turned))
        return super().offer(batch_id, seq, frame, now=now, urgent=urgent, terminal=terminal)


class FakeSub:
    """A connection as the fan-out sees it; compared by identity, like a real one."""

    def __init__(self) -> None:
        self.rec = RecordingOutbox(INTERVAL)
        self.outbox: Outbox = self.rec
        self.wakes = 0

    def wake(self, now: float | None = None) -> None:
        self.wakes += 1


def as_sub(sub: FakeSub) -> Subscriber:
    return sub  # checks FakeSub against the protocol


def st8(
    batch_id: str = "b1",
    user_id: str = "u1",
    *,
    seq: int = 1,
    processed: int = 0,
    total: int = 10,
    status: str = "processing",
    t: int = 0,
) -> BatchState:
    return BatchState(
        batch_id=batch_id,
        user_id=user_id,
        status=status,
        total=total,
        processed=processed,
        successful=processed,
        failed=0,
        seq=seq,
        started_at=1_700_000_000_000,
        updated_at=1_700_000_000_000 + t,
    )


def payload(text: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(text)
    assert obj["action"] == "batch_progress"
    p: dict[str, Any] = obj["payload"]
    return p


def test_state_for_user_without_connection_builds_no_frame() -> None:
    fan = FanOut()
    fan.publish(st8(user_id="nobody"), 0.0, WALL)
    assert fan.frames_built == 0
    assert len(fan.user_ids()) == 0
    sub = FakeSub()
    fan.join("u1", as_sub(sub))
    fan.publish(st8(user_id="nobody", seq=2), 0.0, WALL)
    assert fan.frames_built == 0
    assert sub.rec.offers == []
    assert sub.wakes == 0


def test_join_counts_connections_per_user() -> None:
    fan = FanOut()
    a, b, c = FakeSub(), FakeSub(), FakeSub()
    assert fan.join("u1", as_sub(a)) == 1
    assert fan.join("u1", as_sub(b)) == 2
    assert fan.join("u2", as_sub(c)) == 1
    assert fan.connections_of("u1") == 2
    assert fan.connections_of("u2") == 1
    assert fan.connections_of("u3") == 0
    assert sorted(fan.user_ids()) == ["u1", "u2"]


def test_users_are_isolated() -> None:
    fan = FanOut()
    alice, bob = FakeSub(), FakeSub()
    fan.join("alice", as_sub(alice))
    fan.join("bob", as_sub(bob))
    fan.publish(st8("a1", "alice"), 0.0, WALL)
    fan.publish(st8("b1", "bob"), 0.0, WALL)
    fan.publish(st8("b2", "bob"), 0.0, WALL)
    assert fan.frames_built == 3
    alice_frames = alice.outbox.take_due(0.0)
    bob_frames = bob.outbox.take_due(0.0)
    assert [payload(f)["batch_id"] for f in alice_frames] == ["a1"]
    assert [payload(f)["batch_id"] for f in bob_frames] == ["b1", "b2"]
    assert alice.wakes == 1
    assert bob.wakes == 2


def test_subscribers_of_one_user_share_one_encoded_frame() -> None:
    fan = FanOut()
    subs = [FakeSub() for _ in range(3)]
    for sub in subs:
        fan.join("u1", as_sub(sub))
    fan.publish(st8(processed=4), 0.0, WALL)
    assert fan.frames_built == 1  # encoded once, not once per connection
    frames = [sub.outbox.take_due(0.0) for sub in subs]
    assert all(len(f) == 1 for f in frames)
    first = frames[0][0]
    assert all(f[0] is first for f in frames)  # the very same str object
    assert payload(first)["processed"] == 4
    assert all(sub.wakes == 1 for sub in subs)


def test_merged_offer_does_not_wake() -> None:
    fan = FanOut()
    sub = FakeSub()
    fan.join("u1", as_sub(sub))
    fan.publish(st8(seq=1), 0.0, WALL)
    sub.outbox.take_due(0.0)
    fan.publish(st8(seq=2, processed=1, t=10), 10.0, WALL)  # new deadline: wake
    fan.publish(st8(seq=3, processed=2, t=20), 20.0, WALL)  # merged: no wake
    assert sub.wakes == 2
    assert [payload(f)["seq"] for f in sub.outbox.take_due(100.0)] == [3]


def test_leave_of_last_subscriber_drops_the_room() -> None:
    fan = FanOut()
    a, b = FakeSub(), FakeSub()
    fan.join("u1", as_sub(a))
    fan.join("u1", as_sub(b))
    fan.leave("u1", as_sub(a))
    assert fan.connections_of("u1") == 1
    assert len(fan.user_ids()) == 1
    fan.publish(st8(seq=1), 0.0, WALL)
    assert a.rec.offers == []
    assert len(b.rec.offers) == 1
    fan.leave("u1", as_sub(b))
    assert fan.connections_of("u1") == 0
    assert len(fan.user_ids()) == 0
    built = fan.frames_built
    fan.publish(st8(seq=2), 0.0, WALL)
    assert fan.frames_built == built


def test_leave_unknown_is_harmless() -> None:
    fan = FanOut()
    a, stranger = FakeSub(), FakeSub()
    fan.leave("nobody", as_sub(a))
    fan.join("u1", as_sub(a))
    fan.leave("u1", as_sub(stranger))
    assert fan.connections_of("u1") == 1
    fan.leave("u1", as_sub(a))
    fan.leave("u1", as_sub(a))
    assert len(fan.user_ids()) == 0


def test_rejoin_after_room_dropped_starts_fresh() -> None:
    fan = FanOut()
    a = FakeSub()
    fan.join("u1", as_sub(a))
    fan.publish(st8(seq=1, status="completed", processed=10), 0.0, WALL)
    fan.leave("u1", as_sub(a))
    b = FakeSub()
    fan.join("u1", as_sub(b))
    fan.publish(st8(seq=2, status="completed", processed=10), 0.0, WALL)
    assert b.rec.offers == [("b1", 2, True)]  # a new room: the tracker is new too


def test_snapshot_offers_frames_to_one_subscriber_only() -> None:
    fan = FanOut()
    old, new = FakeSub(), FakeSub()
    fan.join("u1", as_sub(old))
    fan.publish(st8("b1", seq=1), 0.0, WALL)
    old.outbox.take_due(0.0)
    old_wakes = old.wakes
    fan.join("u1", as_sub(new))
    states = [st8("b1", seq=2, processed=3, t=5), st8("b2", seq=7, processed=1)]
    fan.snapshot("u1", as_sub(new), states, 5.0, WALL)
    assert old.rec.offers == [("b1", 1, False)]
    assert old.wakes == old_wakes
    assert new.wakes == 1
    assert [(b, s) for b, s, _ in new.rec.offers] == [("b1", 2), ("b2", 7)]
    assert all(urgent for _, _, urgent in new.rec.offers)  # the snapshot goes at once
    frames = new.outbox.take_due(5.0)
    assert [(payload(f)["batch_id"], payload(f)["seq"]) for f in frames] == [("b1", 2), ("b2", 7)]


def test_snapshot_then_live_never_goes_backwards() -> None:
    fan = FanOut()
    sub = FakeSub()
    fan.join("u1", as_sub(sub))
    fan.publish(st8(seq=4, processed=4), 0.0, WALL)  # live update raced ahead of the snapshot
    fan.snapshot("u1", as_sub(sub), [st8(seq=3, processed=3)], 1.0, WALL)
    fan.publish(st8(seq=3, processed=3), 2.0, WALL)  # late stream entry
    assert [payload(f)["seq"] for f in sub.outbox.take_due(2.0)] == [4]


def test_snapshot_for_user_without_room_does_nothing() -> None:
    fan = FanOut()
    sub = FakeSub()
    fan.snapshot("u1", as_sub(sub), [st8()], 0.0, WALL)
    assert sub.rec.offers == []
    assert sub.wakes == 0


def test_empty_snapshot_still_wakes() -> None:
    fan = FanOut()
    sub = FakeSub()
    fan.join("u1", as_sub(sub))
    fan.snapshot("u1", as_sub(sub), [], 0.0, WALL)
    assert sub.wakes == 1
    assert sub.rec.offers == []


def test_urgent_only_when_batch_turns_terminal() -> None:
    fan = FanOut()
    sub = FakeSub()
    fan.join("u1", as_sub(sub))
    fan.publish(st8(seq=1, status="pending"), 0.0, WALL)
    fan.publish(st8(seq=2, processed=5), 10.0, WALL)
    fan.publish(st8(seq=3, processed=10, status="completed"), 20.0, WALL)
    fan.publish(st8(seq=4, processed=11, total=11, status="completed"), 30.0, WALL)
    fan.publish(st8("b2", seq=1, status="failed"), 40.0, WALL)  # first seen already terminal
    fan.publish(st8("b2", seq=2, status="failed"), 50.0, WALL)
    fan.publish(st8("b3", seq=1, status="cancelled"), 60.0, WALL)
    assert sub.rec.offers == [
        ("b1", 1, False),
        ("b1", 2, False),
        ("b1", 3, True),
        ("b1", 4, False),
        ("b2", 1, True),
        ("b2", 2, False),
        ("b3", 1, True),
    ]


def test_stale_terminal_state_does_not_mark_batch_terminal() -> None:
    fan = FanOut()
    sub = FakeSub()
    fan.join("u1", as_sub(sub))
    fan.publish(st8(seq=5, processed=5), 0.0, WALL)
    fan.publish(st8(seq=6, processed=10, status="completed"), 10.0, WALL)
    assert sub.rec.offers[-1] == ("b1", 6, True)


def test_terminal_frame_goes_at_once_inside_the_interval() -> None:
    fan = FanOut()
    sub = FakeSub()
    fan.join("u1", as_sub(sub))
    fan.publish(st8(seq=1, processed=1), 0.0, WALL)
    assert len(sub.outbox.take_due(0.0)) == 1
    fan.publish(st8(seq=2, processed=2, t=10), 10.0, WALL)
    assert sub.outbox.take_due(10.0) == []
    fan.publish(st8(seq=3, processed=10, status="completed", t=20), 20.0, WALL)
    frames = sub.outbox.take_due(20.0)
    assert [payload(f)["status"] for f in frames] == ["completed"]
    p = payload(frames[0])
    assert p["progress_percentage"] == 100.0
    assert p["eta_seconds"] is None


def test_frames_carry_rate_and_eta() -> None:
    fan = FanOut()
    sub = FakeSub()
    fan.join("u1", as_sub(sub))
    fan.publish(st8(seq=1, processed=0, total=100, t=0), 0.0, WALL)
    fan.publish(st8(seq=2, processed=20, total=100, t=2000), 2000.0, WALL)
    frames = sub.outbox.take_due(2000.0)
    first, second = (payload(f) for f in frames) if len(frames) == 2 else (None, payload(frames[0]))
    assert first is None or first["rate"] is None
    assert second["rate"] == 10.0
    assert second["eta_seconds"] == 8.0


def test_trackers_are_per_user_room() -> None:
    fan = FanOut()
    a, b = FakeSub(), FakeSub()
    fan.join("u1", as_sub(a))
    fan.join("u2", as_sub(b))
    # Same batch id under two users must not share rate history.
    fan.publish(st8("same", "u1", seq=1, processed=0, t=0), 0.0, WALL)
    fan.publish(st8("same", "u2", seq=1, processed=0, t=0), 0.0, WALL)
    fan.publish(st8("same", "u1", seq=2, processed=10, t=1000), 1000.0, WALL)
    a_frames = a.outbox.take_due(1000.0)
    assert payload(a_frames[-1])["rate"] == 10.0
    fan.publish(st8("same", "u2", seq=2, processed=50, t=1000), 1000.0, WALL)
    assert payload(b.outbox.take_due(1000.0)[-1])["rate"] == 50.0


def test_forget_seqs_accepts_restarted_batches() -> None:
    fan = FanOut()
    sub = FakeSub()
    fan.join("u1", as_sub(sub))
    fan.publish(st8(seq=9, processed=9, status="completed", total=9), 0.0, WALL)
    sub.outbox.take_due(0.0)
    fan.publish(st8(seq=1), 500.0, WALL)  # Redis lost its data: seq restarts...
    assert sub.outbox.take_due(500.0) == []  # ...and is dropped until the reset is known
    fan.forget_seqs()
    fan.publish(st8(seq=1), 600.0, WALL)
    frames = sub.outbox.take_due(600.0)
    assert [(payload(f)["seq"], payload(f)["status"]) for f in frames] == [(1, "processing")]
    fan.publish(st8(seq=2, processed=10, status="completed"), 610.0, WALL)
    assert sub.rec.offers[-1] == ("b1", 2, True)  # trackers forgotten: terminal again


def test_prune_forgets_idle_batches_but_keeps_active_ones() -> None:
    fan = FanOut()
    sub = FakeSub()
    fan.join("u1", as_sub(sub))
    fan.publish(st8("old", seq=1, t=0), now=0.0, wall_ms=WALL)
    sub.rec.take_due(0.0)
    fan.publish(st8("new", seq=1, t=590_000), now=590_000.0, wall_ms=WALL + 590_000)
    sub.rec.take_due(590_000.0)
    fan.prune(now=601_000.0, wall_ms=1_700_000_601_000.0, idle_ms=600_000.0)
    room = fan._rooms["u1"]
    assert set(room.trackers) == {"new"}
    assert set(sub.rec._slots) == {"new"}
    # A pruned batch that changes again starts over: its next frame goes at once.
    assert sub.rec.offer("old", 2, b"f", urgent=False, now=601_001.0)
    assert sub.rec.take_due(601_001.0) == [b"f"]


def test_prune_keeps_batches_with_a_frame_waiting() -> None:
    box = Outbox(INTERVAL)
    box.offer("b", 1, b"one", urgent=False, now=0.0)
    box.take_due(0.0)
    box.offer("b", 2, b"two", urgent=False, now=10.0)  # waits for the trailing edge
    assert box.prune(now=10_000.0, idle_ms=1.0) == 0
    assert box.take_due(10_000.0) == [b"two"]


def test_terminal_goes_at_once_even_after_another_connections_snapshot_saw_it() -> None:
    fan = FanOut()
    old, new = FakeSub(), FakeSub()
    fan.join("u1", as_sub(old))
    fan.publish(st8(seq=1, processed=5), now=0.0, wall_ms=WALL)
    old.rec.take_due(0.0)  # `old` just got a frame: the interval runs until 100
    fan.join("u1", as_sub(new))
    done = st8(seq=2, processed=10, status="completed", t=10)
    fan.snapshot("u1", as_sub(new), [done], now=10.0, wall_ms=WALL + 10)  # hash ahead of stream
    fan.publish(done, now=20.0, wall_ms=WALL + 20)  # the reader catches up
    assert len(old.rec.take_due(20.0)) == 1  # at once, not at 100
