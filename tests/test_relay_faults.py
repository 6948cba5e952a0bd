"""Production faults: slow consumers, SIGTERM, Redis going away and coming back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio
from redis_server import RedisServer, free_port
from relay_harness import (
    SECRET,
    collect_until,
    open_client,
    progress,
    token,
    wait_http,
    wait_until,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from relay.emitter import AsyncEmitter
from relay.server import Relay

Factory = Callable[..., Any]


async def test_slow_consumer_closed_4008_while_others_keep_receiving(
    relay_factory: Factory, aredis: redis.asyncio.Redis, prefix: str
) -> None:
    relay: Relay = await relay_factory(
        fanout={"min_interval_ms": 0, "write_timeout_s": 1.0, "max_buffer_bytes": 65536}
    )
    # The slow client: a tiny receive buffer, and it never reads until told to.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", relay.port))
    slow = await connect(f"ws://127.0.0.1:{relay.port}/ws", sock=sock, max_queue=1)
    await slow.send(json.dumps({"type": "auth", "token": token("sloth")}))
    fast = await open_client(relay, "hare")

    em = AsyncEmitter(aredis, prefix=prefix)
    label = "x" * 200
    batches = [str(uuid.uuid4()) for _ in range(50)]
    fast_batch = str(uuid.uuid4())
    await em.start(fast_batch, "hare", 3)

    async def flood() -> None:
        for b in batches:
            await em.start(b, "sloth", 10**6, label=label)
        for _ in range(400):
            if relay.metrics.slow_disconnects._value.get() >= 1:
                return
            await asyncio.gather(*(em.incr(b, "sloth", successful=1) for b in batches))

    await flood()
    await wait_until(lambda: relay.metrics.slow_disconnects._value.get() >= 1, timeout=20)
    # The other user's connection is unaffected and still gets its frames.
    for i in range(3):
        await em.item(fast_batch, "hare", f"i{i}")
    frames = await collect_until(
        fast, lambda f: (p := progress(f, fast_batch)) is not None and p["status"] == "completed"
    )
    assert progress(frames[-1], fast_batch) is not None
    # The slow client, once it reads again, finds the 4008 close after what was already sent.
    async with asyncio.timeout(15):
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await slow.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 4008
    await fast.close()


@pytest.mark.slow
async def test_sigterm_closes_clients_1012_and_exits_0(redis_url: str, prefix: str) -> None:
    port = free_port()
    env = {
        **os.environ,
        "RELAY_REDIS_URL": redis_url,
        "RELAY_REDIS_PREFIX": prefix,
        "RELAY_AUTH_SECRET": SECRET,
        "RELAY_SERVER_HOST": "127.0.0.1",
        "RELAY_SERVER_PORT": str(port),
        "RELAY_LIFECYCLE_SHUTDOWN_TIMEOUT_S": "5",
    }
    proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "serve"], env=env)
    try:
        await wait_http(f"http://127.0.0.1:{port}/readyz", 200)
        clients = []
        for user in ("a", "b"):
            ws = await connect(f"ws://127.0.0.1:{port}/ws")
            await ws.send(json.dumps({"type": "auth", "token": token(user)}))
            assert json.loads(await ws.recv())["action"] == "auth_success"
            clients.append(ws)
        proc.send_signal(signal.SIGTERM)
        for ws in clients:
            async with asyncio.timeout(10):
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1012
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
async def test_readyz_follows_redis_and_clients_survive(
    relay_factory: Factory, redis_server_factory: Callable[..., RedisServer], prefix: str
) -> None:
    server = redis_server_factory(appendonly=True)
    relay: Relay = await relay_factory(redis={"url": server.url})
    ready = f"http://127.0.0.1:{relay.port}/readyz"
    await wait_http(ready, 200)
    before = str(uuid.uuid4())
    setup = redis.asyncio.Redis.from_url(server.url)
    try:
        await AsyncEmitter(setup, prefix=prefix).start(before, "rita", 5)
    finally:
        await setup.aclose()
    ws = await open_client(relay, "rita")
    # The snapshot has been read (its frame arrived) before Redis goes away.
    await collect_until(ws, lambda f: progress(f, before) is not None)
    server.kill()
    await wait_http(ready, 503)
    server.restart()
    await wait_http(ready, 200)
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        em = AsyncEmitter(client, prefix=prefix)
        b = str(uuid.uuid4())
        await em.start(b, "rita", 2)
        await em.incr(b, "rita", successful=2)
        frames = await collect_until(
            ws, lambda f: (p := progress(f, b)) is not None and p["status"] == "completed"
        )
        assert progress(frames[-1], b) is not None
    finally:
        await client.aclose()
    await ws.close()


@pytest.mark.slow
async def test_redis_restart_without_persistence_is_detected(
    relay_factory: Factory, redis_server_factory: Callable[..., RedisServer], prefix: str
) -> None:
    server = redis_server_factory(appendonly=False)
    relay: Relay = await relay_factory(redis={"url": server.url})
    ready = f"http://127.0.0.1:{relay.port}/readyz"
    await wait_http(ready, 200)
    ws = await open_client(relay, "nora")
    b = str(uuid.uuid4())

    async def emit(ops: int) -> None:
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            em = AsyncEmitter(client, prefix=prefix)
            await em.start(b, "nora", 10)
            await em.incr(b, "nora", successful=ops)
        finally:
            await client.aclose()

    for _ in range(5):
        await emit(1)  # seq climbs to 6
    await collect_until(ws, lambda f: (p := progress(f, b)) is not None and p["seq"] == 6)
    server.kill()
    await wait_http(ready, 503)
    server.restart()  # empty: the batch starts again at seq 1
    await wait_http(ready, 200)
    await emit(10)
    frames = await collect_until(
        ws, lambda f: (p := progress(f, b)) is not None and p["status"] == "completed"
    )
    final = progress(frames[-1], b)
    assert final is not None and final["processed"] == 10 and final["seq"] == 2
    assert relay.metrics.stream_gaps._value.get() >= 1
    await ws.close()
