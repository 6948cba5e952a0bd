"""Scale-out: several relays reading the same streams, and the relay on a 3-master Redis Cluster.

Every connection, whichever relay it is on, must end on exactly the state in the batch hash.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis_server import RedisCluster
from relay_harness import http_status, wait_http
from test_faults_redis import Watcher, all_exact

from relay.emitter import AsyncEmitter, Emitter
from relay.server import Relay

Factory = Callable[..., Any]
SHARDS = 16


def bid() -> str:
    return str(uuid.uuid4())


async def _emit_mixed(em: AsyncEmitter, user: str, batches: list[str], seed: int) -> None:
    """Every kind of op, interleaved over the batches, ending in each terminal status."""
    rng = random.Random(seed)
    for b in batches:
        await em.start(b, user, 30, label=f"job {b[:8]}")
    for step in range(30):
        for j, b in enumerate(batches):
            kind = rng.random()
            if kind < 0.6:
                await em.item(b, user, f"i{step}", ok=rng.random() > 0.1)
            elif kind < 0.9:
                await em.incr(b, user, successful=1)
            elif step % 10 == 0:
                await em.set(b, user, total=30 + j)
        await asyncio.sleep(0)
    for j, b in enumerate(batches):
        await em.finish(b, user, ("completed", "failed", "cancelled")[j % 3])


@pytest.mark.slow
@pytest.mark.parametrize("relays", [2, 3])
async def test_every_relay_ends_on_identical_states(
    relay_factory: Factory, aredis: redis.asyncio.Redis, prefix: str, relays: int
) -> None:
    instances: list[Relay] = [await relay_factory() for _ in range(relays)]
    em = AsyncEmitter(aredis, prefix=prefix)
    users = ["uma", "vic"]
    batches = {u: [bid() for _ in range(20)] for u in users}
    for u in users:  # one batch each before connecting: its snapshot frame marks "connected"
        await em.start(batches[u][0], u, 30)
    watchers = [Watcher(f"ws://127.0.0.1:{r.port}/ws", u).start() for r in instances for u in users]
    for w in watchers:
        async with asyncio.timeout(5):
            await w.snapshot_done.wait()
    started = time.monotonic()
    await asyncio.gather(
        *(_emit_mixed(em, u, batches[u][k::4], seed=k) for u in users for k in range(4))
    )
    for u in users:
        mine = [w for w in watchers if w.user == u]
        await all_exact(mine, em.get, batches[u])
        assert all(w.states == mine[0].states for w in mine)  # identical frames, not just fields
    for w in watchers:
        assert set(w.states) == set(batches[w.user]) and w.backwards == []
        assert w.connects == 1
    print(
        f"\n[{relays} relays] {len(watchers)} connections, {sum(map(len, batches.values()))} "
        f"batches: identical exact final states {time.monotonic() - started:.2f}s after start"
    )
    for w in watchers:
        await w.stop()


def _cluster_worker(url: str, prefix: str, user: str, batches: list[str], seed: int) -> None:
    """One worker process: the sync SDK on a RedisCluster client."""
    client = redis.cluster.RedisCluster.from_url(url)
    rng = random.Random(seed)
    try:
        em = Emitter(client, prefix=prefix, shards=SHARDS)
        for b in batches:
            em.start(b, user, 25)
        for step in range(25):
            for b in batches:
                if rng.random() < 0.8:
                    em.item(b, user, f"i{step}", ok=rng.random() > 0.1)
                else:
                    em.incr(b, user, failed=1)
        for j, b in enumerate(batches):
            if j % 4 == 0:
                em.finish(b, user, "cancelled")
    finally:
        client.close()


@pytest.mark.slow
async def test_cluster_two_relays_many_workers(
    relay_factory: Factory, redis_cluster: RedisCluster, prefix: str
) -> None:
    redis_section = {"url": redis_cluster.url, "cluster": True, "shards": SHARDS}
    instances: list[Relay] = [await relay_factory(redis=redis_section) for _ in range(2)]
    for r in instances:
        await wait_http(f"http://127.0.0.1:{r.port}/readyz", 200)  # PING through the cluster
    client = redis.asyncio.cluster.RedisCluster.from_url(redis_cluster.url)
    em = AsyncEmitter(client, prefix=prefix, shards=SHARDS)
    users = ["ann", "ben", "cat"]
    per_proc = 12
    batches = {u: [bid() for _ in range(2 * per_proc)] for u in users}
    try:
        # Batches on every shard exist before anyone connects: the snapshot (index per shard,
        # hashes through a cluster pipeline) must bring them all.
        early = {u: batches[u][:4] for u in users}
        for u in users:
            for b in early[u]:
                await em.start(b, u, 25, label="early")
        shards_used = {instances[0].keys.shard_of(b) for u in users for b in batches[u]}
        assert len(shards_used) >= 10  # the batches really spread over the shards (and nodes)
        watchers = [
            Watcher(f"ws://127.0.0.1:{r.port}/ws", u).start() for r in instances for u in users
        ]

        async def snapshots() -> str | None:
            for w in watchers:
                if set(w.states) != set(early[w.user]):
                    return f"{w.user}: snapshot has {len(w.states)} of {len(early[w.user])}"
            return None

        deadline = time.monotonic() + 10
        while (problem := await snapshots()) is not None:
            assert time.monotonic() < deadline, problem
            await asyncio.sleep(0.05)

        ctx = multiprocessing.get_context("spawn")
        procs = [
            ctx.Process(
                target=_cluster_worker,
                args=(redis_cluster.url, prefix, u, batches[u][k * per_proc : (k + 1) * per_proc]),
                kwargs={"seed": k},
            )
            for u in users
            for k in range(2)
        ]
        started = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            await asyncio.to_thread(p.join, 60)
            assert p.exitcode == 0, f"worker exited with {p.exitcode}"
        for u in users:
            mine = [w for w in watchers if w.user == u]
            await all_exact(mine, em.get, batches[u])
        for w in watchers:
            assert set(w.states) == set(batches[w.user]) and w.backwards == []
            assert w.connects == 1
        for r in instances:
            assert r.metrics.stream_gaps._value.get() == 0
            assert await asyncio.to_thread(http_status, f"http://127.0.0.1:{r.port}/readyz") == 200
        total = sum(map(len, batches.values()))
        print(
            f"\n[cluster 3 masters, {SHARDS} shards] {len(procs)} worker processes, {total} "
            f"batches, 2 relays x {len(users)} users: exact final states "
            f"{time.monotonic() - started:.2f}s after the workers started"
        )
        for w in watchers:
            await w.stop()
    finally:
        await client.aclose()
