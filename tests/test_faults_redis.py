"""Faults with real processes: Redis SIGKILLed mid-batch (with and without AOF), the relay
SIGKILLed and restarted, the stream trimmed past a stalled reader. Each test checks that every
client ends on the exact final state of every batch (the batch hash is the truth).

Run with `-s` to see the measured recovery times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_server import RedisServer, free_port
from relay_harness import SECRET, token, wait_http
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from relay.emitter import AsyncEmitter, Emitter, RedisUnavailable
from relay.reader import StreamInfo
from relay.server import Relay
from relay.wire import BatchState

Factory = Callable[..., Any]
FIELDS = ("status", "total", "processed", "successful", "failed", "seq")


# -- helpers (also used by test_cluster.py) ------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[str | None]], timeout: float, poll: float = 0.05
) -> None:
    """Poll `check` (None: done, else what is still wrong) until done; fail with the last reason."""
    deadline = time.monotonic() + timeout
    while (problem := await check()) is not None:
        assert time.monotonic() < deadline, f"not reached in {timeout}s: {problem}"
        await asyncio.sleep(poll)


def differs(payload: dict[str, Any] | None, state: BatchState | None) -> str | None:
    """None when the frame payload shows exactly `state`, else a description of the difference."""
    if state is None:
        return "batch missing in Redis"
    if payload is None:
        return f"no frame (redis has seq {state.seq})"
    want = {f: getattr(state, f) for f in FIELDS}
    got = {f: payload.get(f) for f in FIELDS}
    return None if got == want else f"frame {got} != redis {want}"


class Watcher:
    """A WebSocket client that keeps the latest payload per batch, as the browser client does.

    With `reconnect`, it reconnects after any close (backoff 0.05 s) until stopped. It answers
    pings, records when frames arrive, and records any seq that went backwards on one connection.
    """

    def __init__(self, url: str, user: str, *, reconnect: bool = False) -> None:
        self.url = url
        self.user = user
        self.reconnect = reconnect
        self.states: dict[str, dict[str, Any]] = {}
        self.frame_times: list[float] = []
        self.connects = 0
        self.closes: list[str] = []
        self.backwards: list[tuple[str, int, int]] = []
        self.snapshot_done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Watcher:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as e:
                self.closes.append(repr(e))
            if not self.reconnect:
                return
            await asyncio.sleep(0.05)

    async def _session(self) -> None:
        async with connect(self.url, open_timeout=3, close_timeout=1) as ws:
            await ws.send(json.dumps({"type": "auth", "token": token(self.user)}))
            first = json.loads(await ws.recv())
            assert first == {"action": "auth_success", "user_id": self.user}, first
            self.connects += 1
            seqs: dict[str, int] = {}
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("action") == "ping":
                    await ws.send('{"action":"pong"}')
                if msg.get("action") != "batch_progress":
                    continue
                p = msg["payload"]
                if p["seq"] < seqs.get(p["batch_id"], -1):
                    self.backwards.append((p["batch_id"], seqs[p["batch_id"]], p["seq"]))
                seqs[p["batch_id"]] = p["seq"]
                self.states[p["batch_id"]] = p
                self.frame_times.append(time.monotonic())
                self.snapshot_done.set()
            self.closes.append(f"closed {ws.close_code}")

    def first_frame_after(self, t: float) -> float | None:
        return next((f for f in self.frame_times if f > t), None)


async def all_exact(
    watchers: list[Watcher], get: Callable[[str], Awaitable[BatchState | None]], batches: list[str]
) -> None:
    """Wait until every watcher shows exactly Redis's state of every batch (15 s)."""
    truth: dict[str, BatchState | None] = {b: await get(b) for b in batches}

    async def check() -> str | None:
        for w in watchers:
            for b in batches:
                if (problem := differs(w.states.get(b), truth[b])) is not None:
                    return f"{w.user}@{w.url} batch {b}: {problem}"
        return None

    await eventually(check, 15.0)


def bid() -> str:
    return str(uuid.uuid4())


class Worker:
    """Emits items into batches round by round, retrying every failed op until it succeeds.

    Items are idempotent, so a retry of an op that Redis applied before it died changes nothing:
    the final counts are exact. At the end every batch is finished.
    """

    def __init__(
        self, url: str, prefix: str, user: str, batches: list[str], *, items: int, pause: float
    ) -> None:
        self.url, self.prefix, self.user = url, prefix, user
        self.batches, self.items, self.pause = batches, items, pause
        self.rounds_done = 0
        self.failures = 0
        self.ops = 0

    async def _retry(self, op: Callable[[], Awaitable[object]]) -> None:
        while True:
            try:
                await op()
                self.ops += 1
                return
            except (RedisUnavailable, redis.RedisError):
                self.failures += 1
                await asyncio.sleep(0.05)

    async def run(self) -> None:
        # Short timeouts, no hidden retries: the worker sees the outage and retries itself.
        client = redis.asyncio.Redis.from_url(
            self.url, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        em = AsyncEmitter(client, prefix=self.prefix)
        try:
            for b in self.batches:
                await self._retry(partial(em.start, b, self.user, self.items, label="job"))
            for i in range(self.items):
                for b in self.batches:
                    await self._retry(partial(em.item, b, self.user, f"i{i}", ok=i % 7 > 0))
                self.rounds_done += 1
                await asyncio.sleep(self.pause)
            for b in self.batches:
                await self._retry(partial(em.finish, b, self.user, "completed"))
        finally:
            await client.aclose()


def getter(
    client: redis.asyncio.Redis, prefix: str
) -> Callable[[str], Awaitable[BatchState | None]]:
    return AsyncEmitter(client, prefix=prefix).get


# -- 1. Redis SIGKILLed in the middle of a batch -------------------------------------------------


async def _redis_killed_mid_batch(
    relay_factory: Factory, server: RedisServer, prefix: str, *, persistent: bool
) -> None:
    relay: Relay = await relay_factory(redis={"url": server.url})
    ready = f"http://127.0.0.1:{relay.port}/readyz"
    await wait_http(ready, 200)
    user = "kim"
    batches = [bid() for _ in range(8)]
    worker = Worker(server.url, prefix, user, batches, items=60, pause=0.01)
    # A batch that exists before the client connects: its snapshot frame tells us the
    # connection is fully set up (snapshot read) before we kill Redis.
    seed = Emitter(server.client(), prefix=prefix)
    seed.start(batches[0], user, 60, label="job")
    watchers = [Watcher(f"ws://127.0.0.1:{relay.port}/ws", user).start() for _ in range(2)]
    for w in watchers:
        async with asyncio.timeout(5):
            await w.snapshot_done.wait()
    work = asyncio.create_task(worker.run())

    async def rounds(n: int) -> str | None:
        return None if worker.rounds_done >= n else f"worker at round {worker.rounds_done}"

    await eventually(lambda: rounds(15), 20)
    server.kill()  # SIGKILL: no shutdown, no final fsync
    killed = time.monotonic()
    await wait_http(ready, 503, timeout=10)

    async def worker_failing() -> str | None:
        return None if worker.failures >= 3 else "worker has not failed yet"

    await eventually(worker_failing, 10)

    async def outage_lasted() -> str | None:  # long enough for the reader to back off a few times
        return None if time.monotonic() - killed >= 1.5 else "outage still short"

    await eventually(outage_lasted, 5)
    rounds_at_kill = worker.rounds_done
    server.start()  # same port, same dir: AOF (if any) is replayed
    up = time.monotonic()
    await wait_http(ready, 200, timeout=15)
    ready_after = time.monotonic() - up
    await asyncio.wait_for(work, 30)
    assert worker.rounds_done == worker.items and rounds_at_kill < worker.items  # mid-batch

    client = redis.asyncio.Redis.from_url(server.url)
    try:
        await all_exact(watchers, getter(client, prefix), batches)
        if persistent:
            for b in batches:
                state = await getter(client, prefix)(b)
                assert state is not None and state.processed == 60 and state.total == 60
    finally:
        await client.aclose()
    for w in watchers:  # clients stayed connected through the outage
        assert w.connects == 1 and w.closes == [], w.closes
        if persistent:
            assert w.backwards == []
    first = min(t for w in watchers if (t := w.first_frame_after(up)) is not None)
    gaps = relay.metrics.stream_gaps._value.get()
    if persistent:
        assert gaps == 0
    else:
        assert gaps >= 1  # the reset was noticed
    print(
        f"\n[redis SIGKILL, {'AOF always' if persistent else 'no persistence'}] outage "
        f"{up - killed:.2f}s; restart -> first frame {first - up:.3f}s, "
        f"-> /readyz 200 {ready_after:.3f}s; worker retries {worker.failures}; "
        f"stream gaps {gaps}; final states exact for {len(batches)} batches x 2 clients"
    )
    for w in watchers:
        await w.stop()


@pytest.mark.slow
async def test_redis_sigkill_mid_batch_with_aof(
    relay_factory: Factory, redis_server_factory: Callable[..., RedisServer], prefix: str
) -> None:
    server = redis_server_factory(appendonly=True)
    await _redis_killed_mid_batch(relay_factory, server, prefix, persistent=True)


@pytest.mark.slow
async def test_redis_sigkill_mid_batch_without_persistence(
    relay_factory: Factory, redis_server_factory: Callable[..., RedisServer], prefix: str
) -> None:
    server = redis_server_factory(appendonly=False)
    await _redis_killed_mid_batch(relay_factory, server, prefix, persistent=False)


# -- 2. the relay SIGKILLed and restarted --------------------------------------------------------


@contextlib.contextmanager
def relay_process(redis_url: str, prefix: str, port: int, log: Path) -> Iterator[Callable[[], Any]]:
    """Yields start(): spawn `relay serve` on `port` (again after a kill). Killed at exit."""
    env = {
        **os.environ,
        "RELAY_REDIS_URL": redis_url,
        "RELAY_REDIS_PREFIX": prefix,
        "RELAY_AUTH_SECRET": SECRET,
        "RELAY_SERVER_HOST": "127.0.0.1",
        "RELAY_SERVER_PORT": str(port),
        "RELAY_LOG_LEVEL": "warning",
    }
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "relay.cli", "serve"], env=env, stdout=out, stderr=out
            )
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.mark.slow
async def test_relay_sigkill_restart_loses_nothing(
    aredis: redis.asyncio.Redis, redis_url: str, prefix: str
) -> None:
    port = free_port()
    ready = f"http://127.0.0.1:{port}/readyz"
    users = ["ada", "bo"]
    before = {u: [bid() for _ in range(4)] for u in users}  # emitted before, during and after
    during = {u: [bid() for _ in range(3)] for u in users}  # started and finished while down
    em = AsyncEmitter(aredis, prefix=prefix)
    with (
        tempfile.TemporaryDirectory() as tmp,
        relay_process(redis_url, prefix, port, Path(tmp) / "relay.log") as start,
    ):
        proc = start()
        await wait_http(ready, 200)
        for u in users:
            for b in before[u]:
                await em.start(b, u, 40)
        watchers = [
            Watcher(f"ws://127.0.0.1:{port}/ws", u, reconnect=True).start()
            for u in users
            for _ in range(2)
        ]
        for w in watchers:
            async with asyncio.timeout(5):
                await w.snapshot_done.wait()
        workers = [Worker(redis_url, prefix, u, before[u], items=40, pause=0.02) for u in users]
        work = [asyncio.create_task(w.run()) for w in workers]

        async def rounds(n: int) -> str | None:
            done = min(w.rounds_done for w in workers)
            return None if done >= n else f"workers at round {done}"

        await eventually(lambda: rounds(10), 20)
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)
        killed = time.monotonic()
        rounds_at_kill = min(w.rounds_done for w in workers)
        for u in users:  # whole batches that live and die while no relay runs
            for b in during[u]:
                await em.start(b, u, 5)
                for i in range(5):
                    await em.item(b, u, f"d{i}")
        await eventually(lambda: rounds(rounds_at_kill + 10), 20)  # the workers went on
        start()
        up = time.monotonic()
        await wait_http(ready, 200)
        ready_after = time.monotonic() - up
        await asyncio.gather(*work)
        for u in users:
            mine = [w for w in watchers if w.user == u]
            await all_exact(mine, em.get, before[u] + during[u])
        for w in watchers:
            assert w.connects == 2, (w.connects, w.closes)  # one reconnect, after the kill
            # Nothing from another user, and nothing of theirs is missing.
            assert set(w.states) == set(before[w.user] + during[w.user])
        back = min(t for w in watchers if (t := w.first_frame_after(up)) is not None)
        count = sum(len(v) for v in before.values()) + sum(len(v) for v in during.values())
        print(
            f"\n[relay SIGKILL] down {up - killed:.2f}s; restart -> /readyz 200 "
            f"{ready_after:.3f}s, -> first frame {back - up:.3f}s; {len(watchers)} clients "
            f"reconnected, final states exact for {count} batches"
        )
        for w in watchers:
            await w.stop()


# -- 3. the stream trimmed past a stalled reader -------------------------------------------------


async def test_trim_past_stalled_reader_is_detected_and_resynced(
    relay_factory: Factory,
    aredis: redis.asyncio.Redis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay: Relay = await relay_factory()
    user = "tess"
    a, b = bid(), bid()
    em = AsyncEmitter(aredis, prefix=prefix)
    small = AsyncEmitter(aredis, prefix=prefix, stream_maxlen=10)  # trims whole 100-entry nodes
    await em.start(a, user, 10)
    await em.item(a, user, "x0")
    watcher = Watcher(f"ws://127.0.0.1:{relay.port}/ws", user).start()
    async with asyncio.timeout(5):
        await watcher.snapshot_done.wait()

    # Stall the reader: its next XREAD waits at a gate (as if the event loop were blocked).
    real_xread = relay.reader._xread
    gate, parked = asyncio.Event(), asyncio.Event()
    gate.set()

    async def gated_xread(*args: Any, **kwargs: Any) -> Any:
        if not gate.is_set():
            parked.set()
            await gate.wait()
        return await real_xread(*args, **kwargs)

    monkeypatch.setattr(relay.reader, "_xread", gated_xread)
    gate.clear()
    await em.item(a, user, "x1")  # wakes the XREAD in flight; the next one parks
    async with asyncio.timeout(5):
        await parked.wait()
    for i in range(2, 10):  # a completes while the reader is stalled...
        await em.item(a, user, f"x{i}")
    await small.start(b, user, 400)
    for i in range(300):  # ...and b's entries push a's out of the capped stream
        await small.item(b, user, f"y{i}")
    stream = relay.keys.stream(relay.keys.shard_of(a))
    left: Any = await aredis.xrange(stream)
    assert all(f[b"batch_id"] != a.encode() for _id, f in left), "a's entries were not trimmed"
    gate.set()

    async def gap_seen() -> str | None:
        return None if relay.metrics.stream_gaps._value.get() >= 1 else "no gap counted"

    await eventually(gap_seen, 10)
    # a's final state exists only in its hash now: the resync must have delivered it.
    await all_exact([watcher], em.get, [a, b])
    state_a = await em.get(a)
    assert state_a is not None and state_a.status == "completed"
    # ...and the reader goes on: later changes arrive, without another gap.
    await em.start(a, user, 12)
    await em.item(a, user, "x10")
    for i in range(300, 320):
        await small.item(b, user, f"y{i}")
    await all_exact([watcher], em.get, [a, b])
    assert relay.metrics.stream_gaps._value.get() == 1
    assert watcher.backwards == [] and watcher.connects == 1
    await watcher.stop()


@pytest.mark.parametrize(
    ("info", "position", "counted", "lost"),
    [
        (StreamInfo(), (0, 0), 0, 0),  # no stream, nothing read
        (StreamInfo(5, (9, 0), 5, (5, 0)), (9, 0), 5, 0),  # at the tail, all counted
        (StreamInfo(2, (9, 0), 7, (8, 0)), (9, 0), 5, 2),  # at the tail, 2 never read
        (StreamInfo(3, (12, 0), 8, (5, 0)), (9, 0), 5, None),  # behind, trim not past us
        (StreamInfo(3, (12, 0), 8, (10, 0)), (9, 0), 5, 0),  # trimmed up to us, rest here
        (StreamInfo(3, (12, 0), 10, (11, 0)), (9, 0), 5, 2),  # trimmed 2 past us
        (StreamInfo(0, (12, 0), 10, None), (9, 0), 5, 5),  # XTRIM MAXLEN 0 after 5 more
        (StreamInfo(), (9, 0), 5, -1),  # stream gone: Redis lost its data
        (StreamInfo(2, (20, 0), 2, (19, 0)), (9, 0), 5, -5),  # a new, shorter history
    ],
)
def test_stream_info_counts_lost_entries(
    info: StreamInfo, position: tuple[int, int], counted: int, lost: int | None
) -> None:
    assert info.lost_after(position, counted) == lost
