"""The reader decides a trim past it before it consumes the reply that hides it (issue 9, 13).

XREAD from position P returns the oldest entries still in the stream after P: when the stream
was trimmed past P, the reply silently starts after a gap. Checked after consuming, the position
has moved into the surviving entries and the check cannot decide until the reader reaches the
tail, which under sustained load may be never.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio

from relay.keys import KeySpace
from relay.metrics import Metrics
from relay.reader import COUNT, StreamInfo, StreamReader, _id_bytes, _id_tuple


@pytest.mark.parametrize(
    ("info", "position", "counted", "reply", "lost"),
    [
        # nothing trimmed past us: the stream still holds our position
        (StreamInfo(10, (20, 0), 10, (11, 0)), (12, 0), 2, [(13, 0), (14, 0)], 0),
        # trimmed exactly up to the reply's first entry: 3 lost (13, 14, 15)
        (StreamInfo(5, (20, 0), 10, (16, 0)), (12, 0), 2, [(16, 0), (17, 0)], 3),
        # trimmed further since the XREAD: the reply's first entry is gone too, still 3 lost
        (StreamInfo(4, (20, 0), 10, (17, 0)), (12, 0), 2, [(16, 0), (17, 0)], 3),
        # trimmed past the whole reply and past 18: 3 before it, 18 after it
        (StreamInfo(2, (20, 0), 10, (19, 0)), (12, 0), 2, [(16, 0), (17, 0)], 4),
        # the stream is empty now (XTRIM MAXLEN 0): everything not in the reply is lost
        (StreamInfo(0, (20, 0), 10, None), (12, 0), 2, [(16, 0), (17, 0)], 6),
        # a different history (Redis lost its data and counted again from 0)
        (StreamInfo(3, (20, 0), 3, (18, 0)), (12, 0), 5, [(18, 0), (19, 0)], -5),
    ],
)
def test_lost_before_reply(
    info: StreamInfo,
    position: tuple[int, int],
    counted: int,
    reply: list[tuple[int, int]],
    lost: int,
) -> None:
    assert info.lost_before(position, counted, reply) == lost


async def test_trim_past_a_reader_behind_is_decided_before_it_reads_on(
    aredis: redis.asyncio.Redis, prefix: str
) -> None:
    keys = KeySpace(prefix, 1)
    stream = keys.stream(0)
    total = 5 * COUNT
    pipe = aredis.pipeline(transaction=False)
    for i in range(total):
        pipe.xadd(stream, {"n": str(i)})
    ids = [bytes(i) for i in await pipe.execute()]

    gaps: list[tuple[bytes, bool]] = []
    seen = asyncio.Event()
    reader: StreamReader

    def on_gap(shard: int, reset: bool) -> None:
        gaps.append((reader.last_ids[shard], reset))
        seen.set()

    metrics = Metrics()
    reader = StreamReader(aredis, keys, lambda _s: None, metrics, on_gap=on_gap)
    # The reader stands at entry COUNT, having accounted for COUNT additions; then the stream is
    # trimmed to its last 2*COUNT entries: entries COUNT+1 .. 3*COUNT are gone unread.
    reader.last_ids[0] = ids[COUNT - 1]
    reader._counted[0] = COUNT
    await aredis.xtrim(stream, maxlen=2 * COUNT, approximate=False)
    task = asyncio.create_task(reader.run())
    try:
        async with asyncio.timeout(10):
            await seen.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    position, reset = gaps[0]
    assert not reset
    # Decided before a single entry after the gap was consumed, and exactly.
    assert _id_tuple(position) == _id_tuple(ids[COUNT - 1]), position
    assert metrics.stream_gaps._value.get() == 1
    assert reader._counted[0] >= 3 * COUNT
    assert _id_bytes(_id_tuple(ids[-1])) == ids[-1]
