"""The relay on Redis Sentinel: 1 master, 1 replica, 3 sentinels on private ports.

The master is SIGKILLed while workers emit: the relay follows the sentinels to the new
master, frames resume within seconds and every client ends on the exact state of every batch.
Run with `-s` to see the measured times.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import redis.asyncio
import redis.asyncio.sentinel
from redis_server import RedisUnavailable, SentinelGroup
from relay_harness import running_relay
from test_faults_redis import Watcher, all_exact, eventually

from relay.config import load_config, masked
from relay.emitter import AsyncEmitter
from relay.emitter import RedisUnavailable as EmitUnavailable
from relay.errors import ConfigError
from relay.redis_client import async_client

ITEMS = 60


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    try:
        g = SentinelGroup().start()
    except RedisUnavailable as e:
        pytest.skip(f"no redis-server: {e}")
    try:
        yield g
    finally:
        g.stop()


def worker_client(group: SentinelGroup) -> Any:
    """What the docs tell workers to use: the Sentinel's master client, short timeouts."""
    sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        [("127.0.0.1", s.port) for s in group.sentinels], socket_timeout=1.0
    )
    return sentinel.master_for(group.service, socket_timeout=1.0, socket_connect_timeout=1.0)


async def _retry(op: Any) -> None:
    while True:
        try:
            await op()
            return
        except (EmitUnavailable, redis.RedisError):
            await asyncio.sleep(0.05)


def test_sentinel_keys_from_env_and_their_errors() -> None:
    env = {"RELAY_REDIS_SENTINELS": "s1:26379, [::1]:26380", "RELAY_REDIS_SENTINEL_PASSWORD": "pw"}
    cfg = load_config(env=env)
    assert cfg.redis.sentinels == ["s1:26379", "[::1]:26380"]
    assert cfg.redis.sentinel_service == "mymaster"
    assert masked(cfg)["redis"]["sentinel_password"] == "***"
    with pytest.raises(ConfigError, match=r"redis\.sentinels: expected host:port, got 's1'"):
        load_config(env={"RELAY_REDIS_SENTINELS": "s1"})
    with pytest.raises(ConfigError, match=r"redis\.sentinels: cannot be used with redis\.cluster"):
        load_config(env={"RELAY_REDIS_SENTINELS": "s1:1", "RELAY_REDIS_CLUSTER": "true"})


async def test_sentinel_client_options_from_config() -> None:
    """Sentinel credentials go to the sentinels, url's credentials, db and TLS to the master."""
    cfg = load_config(
        env={
            "RELAY_REDIS_URL": "rediss://relay:pw@ignored:1/3?ssl_ca_certs=/ca.pem",
            "RELAY_REDIS_SENTINELS": "s1:26379,s2:26380",
            "RELAY_REDIS_SENTINEL_SERVICE": "progress",
            "RELAY_REDIS_SENTINEL_USERNAME": "watcher",
            "RELAY_REDIS_SENTINEL_PASSWORD": "spw",
        }
    )
    client: Any = async_client(cfg.redis)
    try:
        manager = client.sentinel_manager
        assert [
            (
                c.connection_pool.connection_kwargs["host"],
                c.connection_pool.connection_kwargs["port"],
            )
            for c in manager.sentinels
        ] == [("s1", 26379), ("s2", 26380)]
        sentinel_kwargs = manager.sentinel_kwargs
        assert sentinel_kwargs["username"] == "watcher" and sentinel_kwargs["password"] == "spw"
        assert sentinel_kwargs["ssl"] is True and sentinel_kwargs["ssl_ca_certs"] == "/ca.pem"
        master = client.connection_pool.connection_kwargs
        assert master["username"] == "relay" and master["password"] == "pw" and master["db"] == 3
        assert master["ssl_ca_certs"] == "/ca.pem" and "host" not in master
        assert client.connection_pool.service_name == "progress"
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_failover_frames_resume_and_clients_end_exact(group: SentinelGroup) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    client = worker_client(group)
    em = AsyncEmitter(client, prefix=prefix)
    users = ["ann", "bob"]
    batches = {u: [str(uuid.uuid4()) for _ in range(4)] for u in users}
    for u in users:
        for b in batches[u]:
            await em.start(b, u, ITEMS, label="job")
    section = {"sentinels": group.addrs, "sentinel_service": group.service}
    async with running_relay("redis://127.0.0.1:1/0", prefix, redis=section) as relay:
        assert await relay.readiness() == (True, "ok")
        watchers = [
            Watcher(f"ws://127.0.0.1:{relay.port}/ws", u, reconnect=True).start() for u in users
        ]
        rounds = 0

        demoted = asyncio.Event()

        async def work() -> None:
            nonlocal rounds
            for i in range(ITEMS):
                await emit_round(i)
                rounds += 1
                await asyncio.sleep(0.02)
            # Writes that reached the old master after the promotion are lost when it becomes a
            # replica (asynchronous replication). A worker that must not lose counts emits its
            # items again after the failover: items are idempotent, kept ones change nothing.
            await demoted.wait()
            for i in range(ITEMS):
                await emit_round(i)
            for u in users:
                for b in batches[u]:
                    await _retry(partial(em.finish, b, u, "completed"))

        async def emit_round(i: int) -> None:
            for u in users:
                for b in batches[u]:
                    await _retry(partial(em.item, b, u, f"i{i}", ok=i % 5 > 0))

        try:
            for w in watchers:
                async with asyncio.timeout(10):
                    await w.snapshot_done.wait()
            worker = asyncio.create_task(work())

            async def some_rounds() -> str | None:
                return None if rounds >= 10 else f"{rounds} rounds"

            await eventually(some_rounds, 20)
            old = group.current_master()
            started = time.monotonic()
            new = await asyncio.to_thread(partial(group.failover, kill=True))
            switched = time.monotonic() - started
            assert new is not old
            demoted.set()  # the old master is dead: nothing more can be written there

            async def frames_after() -> str | None:
                late = [w.first_frame_after(started + switched) for w in watchers]
                return None if all(late) else "no frame since the failover"

            await eventually(frames_after, 20)
            resumed = max(w.first_frame_after(started + switched) or 0 for w in watchers)
            await asyncio.wait_for(worker, 40)
            for u in users:
                await all_exact([w for w in watchers if w.user == u], em.get, batches[u])
            for w in watchers:
                for b in batches[w.user]:
                    assert w.states[b]["status"] == "completed"
                    assert w.states[b]["processed"] == ITEMS
            ready = await relay.readiness()
        finally:
            for w in watchers:
                await w.stop()
            await client.aclose()
    assert ready == (True, "ok")
    print(
        f"\nsentinel failover (master SIGKILLed): sentinels switched after {switched:.2f}s, "
        f"first frame on every client "
        f"{resumed - started - switched:.2f}s after; reconnects per client "
        f"{[w.connects for w in watchers]}; {sum(len(b) for b in batches.values())} batches exact"
    )
