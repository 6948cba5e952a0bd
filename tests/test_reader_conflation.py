"""The reader's cheap path (issue 10): raw XREAD replies, entries of users nobody here watches
counted as read and validated but not fanned out, and only the newest state per batch of one
reply fanned out.

Real Redis (the shared server with a unique prefix); the reader is started behind a prepared
backlog, so that one XREAD reply holds several states of the same batch.
"""

from __future__ import annotations

import asyncio

import redis.asyncio
from redis.typing import EncodableT, FieldT

from relay.keys import KeySpace
from relay.metrics import Metrics
from relay.reader import StreamReader
from relay.wire import BatchState


def entry(batch: str, user: str, seq: int, status: str = "processing") -> dict[FieldT, EncodableT]:
    return {
        "v": "1",
        "batch_id": batch,
        "user_id": user,
        "status": status,
        "total": "100",
        "processed": str(seq),
        "successful": str(seq),
        "failed": "0",
        "seq": str(seq),
        "started_at": "1000",
        "updated_at": str(1000 + seq),
    }


async def test_one_reply_fans_out_the_newest_state_per_watched_batch(
    aredis: redis.asyncio.Redis, prefix: str
) -> None:
    keys = KeySpace(prefix, 1)
    stream = keys.stream(0)
    first: bytes = await aredis.xadd(stream, entry("seed", "nobody", 1))  # type: ignore[assignment]
    pipe = aredis.pipeline(transaction=False)
    expected_read = 0
    for seq in range(1, 51):  # a watched batch, 50 states; the 50th is terminal
        pipe.xadd(stream, entry("b1", "alice", seq, "completed" if seq == 50 else "processing"))
        pipe.xadd(stream, entry("b2", "alice", seq))  # another batch of the same user
        pipe.xadd(stream, entry("x", "bob", seq))  # nobody watches bob: read, not fanned out
        expected_read += 3
    bad = entry("b3", "alice", 1)
    bad["total"] = "-1"  # a watched user's malformed entry: rejected and counted
    pipe.xadd(stream, bad)
    bad_unwatched = entry("b4", "bob", 1)
    bad_unwatched["v"] = "2"  # a foreign entry is parsed whoever it names: rejected, counted
    pipe.xadd(stream, bad_unwatched)
    bad_unwatched_number = entry("b5", "bob", 1)
    bad_unwatched_number["seq"] = "x"  # nobody watches bob, still a bad entry: counted
    pipe.xadd(stream, bad_unwatched_number)
    last = (await pipe.execute())[-1]
    assert last
    expected_read += 3

    got: list[BatchState] = []
    metrics = Metrics()
    done = asyncio.Event()

    def on_state(state: BatchState) -> None:
        got.append(state)
        if state.batch_id == "b1" and state.seq == 50:  # parsing of its reply is over
            done.set()

    reader = StreamReader(aredis, keys, on_state, metrics, watching=lambda user: user == "alice")
    reader.last_ids[0] = first
    reader._counted[0] = int((await aredis.xinfo_stream(stream))["entries-added"]) - expected_read
    task = asyncio.create_task(reader.run())
    try:
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert reader.last_ids[0] == bytes(last)
    assert metrics.entries_read._value.get() == expected_read
    assert metrics.entries_rejected.labels("bad_number")._value.get() == 2
    assert metrics.entries_rejected.labels("foreign")._value.get() == 1
    assert metrics.stream_gaps._value.get() == 0  # skipped entries count as read
    assert {s.user_id for s in got} == {"alice"}
    # one reply: one state per batch, the newest (the terminal one for b1)
    assert sorted((s.batch_id, s.seq, s.status) for s in got) == [
        ("b1", 50, "completed"),
        ("b2", 50, "processing"),
    ]
