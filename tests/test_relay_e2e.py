"""End to end: SDK -> Redis -> relay -> real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import redis.asyncio
from relay_harness import collect_until, open_client, progress, recv_json, wait_until

from relay.emitter import AsyncEmitter
from relay.server import Relay

Factory = Callable[..., Any]


def bid() -> str:
    return str(uuid.uuid4())


async def test_frames_follow_emits(
    relay_factory: Factory, aredis: redis.asyncio.Redis, prefix: str
) -> None:
    relay: Relay = await relay_factory()
    em = AsyncEmitter(aredis, prefix=prefix)
    ws = await open_client(relay, "alice")
    b = bid()
    await em.start(b, "alice", 4, label="Upload")
    for i in range(3):
        await em.item(b, "alice", f"i{i}")
    await em.item(b, "alice", "i3", ok=False)
    frames = await collect_until(
        ws, lambda f: (p := progress(f, b)) is not None and p["status"] == "completed"
    )
    last = progress(frames[-1])
    assert last is not None
    assert last["total"] == 4 and last["processed"] == 4
    assert last["successful"] == 3 and last["failed"] == 1
    assert last["progress_percentage"] == 100.0
    assert last["label"] == "Upload" and last["eta_seconds"] is None
    assert frames[-1]["timestamp"].endswith("Z") and last["updated_at"].endswith("Z")
    seqs = [p["seq"] for f in frames if (p := progress(f, b))]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    await ws.close()


async def test_snapshot_includes_batches_started_before(
    relay_factory: Factory, aredis: redis.asyncio.Redis, prefix: str
) -> None:
    em = AsyncEmitter(aredis, prefix=prefix)
    b1, b2 = bid(), bid()
    await em.start(b1, "bob", 10)
    await em.incr(b1, "bob", successful=4)
    await em.start(b2, "bob", 0)
    await em.finish(b2, "bob", "cancelled")
    await em.start(bid(), "carol", 5)
    relay: Relay = await relay_factory()
    ws = await open_client(relay, "bob")
    seen: dict[str, dict[str, Any]] = {}
    await collect_until(
        ws,
        lambda f: bool((p := progress(f)) and seen.setdefault(p["batch_id"], p)) and len(seen) == 2,
    )
    assert seen[b1]["processed"] == 4 and seen[b1]["progress_percentage"] == 40.0
    assert seen[b2]["status"] == "cancelled"
    await ws.close()


async def test_users_are_isolated_and_all_connections_receive(
    relay_factory: Factory, aredis: redis.asyncio.Redis, prefix: str
) -> None:
    relay: Relay = await relay_factory()
    em = AsyncEmitter(aredis, prefix=prefix)
    a1 = await open_client(relay, "ann")
    a2 = await open_client(relay, "ann")
    z = await open_client(relay, "zed")
    ba, bz = bid(), bid()
    await em.start(ba, "ann", 1)
    await em.start(bz, "zed", 1)
    await em.item(ba, "ann", "x")
    await em.item(bz, "zed", "x")

    def completed(batch_id: str) -> Callable[[dict[str, Any]], bool]:
        return lambda f: (p := progress(f, batch_id)) is not None and p["status"] == "completed"

    for ws, mine, other in ((a1, ba, bz), (a2, ba, bz), (z, bz, ba)):
        frames = await collect_until(ws, completed(mine))
        assert all(progress(f, other) is None for f in frames)
    await asyncio.gather(a1.close(), a2.close(), z.close())


async def test_percentage_is_clamped(
    relay_factory: Factory, aredis: redis.asyncio.Redis, prefix: str
) -> None:
    relay: Relay = await relay_factory()
    em = AsyncEmitter(aredis, prefix=prefix)
    ws = await open_client(relay, "dan")
    b = bid()
    await em.set(b, "dan", total=2, processed=5, status="processing")
    frames = await collect_until(ws, lambda f: progress(f, b) is not None)
    p = progress(frames[-1])
    assert p is not None and p["progress_percentage"] == 100.0 and p["processed"] == 5
    await ws.close()


async def test_many_rapid_updates_are_conflated(
    relay_factory: Factory, aredis: redis.asyncio.Redis, prefix: str
) -> None:
    relay: Relay = await relay_factory()
    em = AsyncEmitter(aredis, prefix=prefix)
    ws = await open_client(relay, "eve")
    b = bid()
    n = 10_000
    await em.start(b, "eve", n)
    pipe_batch = 50
    for start in range(0, n, pipe_batch):
        await asyncio.gather(
            *(em.item(b, "eve", f"i{i}") for i in range(start, start + pipe_batch))
        )
    frames = await collect_until(
        ws, lambda f: (p := progress(f, b)) is not None and p["status"] == "completed", timeout=30
    )
    final = progress(frames[-1])
    assert final is not None and final["processed"] == n and final["successful"] == n
    assert final["seq"] == n + 1
    assert len(frames) < n / 10, len(frames)


async def test_ping_pong(relay_factory: Factory) -> None:
    relay: Relay = await relay_factory(fanout={"heartbeat_s": 0.2})
    ws = await open_client(relay, "pat")
    await ws.send(json.dumps({"action": "ping"}))
    got: set[str] = set()
    while got != {"ping", "pong"}:
        got.add((await recv_json(ws))["action"])
    await ws.send(json.dumps({"action": "pong"}))
    await ws.send(json.dumps({"something": "else"}))
    assert (await recv_json(ws))["action"] in {"ping", "pong"}
    await ws.close()


async def test_metrics_after_a_workload(
    relay_factory: Factory, aredis: redis.asyncio.Redis, prefix: str
) -> None:
    relay: Relay = await relay_factory()
    await wait_until(lambda: relay.reader.healthy)  # positioned at the tail: reads all 3 below
    ws = await open_client(relay, "mia")
    em = AsyncEmitter(aredis, prefix=prefix)
    b = bid()
    await em.start(b, "mia", 2)
    await em.incr(b, "mia", successful=2)
    await aredis.xadd(relay.keys.stream(0), {"foreign": "producer"})
    await collect_until(ws, lambda f: (p := progress(f, b)) is not None and p["processed"] == 2)
    rejected = 'relay_stream_entries_rejected_total{reason="foreign"} 1.0'
    await wait_until(lambda: rejected in relay.metrics.render().decode())
    bad = await open_client(relay)
    await bad.send("not json")
    await wait_until(
        lambda: (
            'relay_auth_failures_total{reason="bad_format"} 1.0' in relay.metrics.render().decode()
        )
    )
    text = relay.metrics.render().decode()
    for name in (
        'relay_connections{state="authenticated"} 1.0',
        "relay_frames_sent_total",
        "relay_stream_entries_read_total 3.0",
        'relay_stream_entries_rejected_total{reason="foreign"} 1.0',
        "relay_reader_lag_ms",
        "relay_event_loop_lag_seconds",
        "relay_slow_consumer_disconnects_total 0.0",
    ):
        assert name in text, name
    await ws.close()
    await bad.close()
