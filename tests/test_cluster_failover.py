"""The relay on a 3+3 Redis Cluster (cluster-node-timeout 2000): several seed nodes, and a
master SIGKILLed while workers emit into batches on every shard.

Run with `-s` to see the measured times.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import redis.asyncio.cluster
from redis_server import RedisCluster, RedisUnavailable, free_port
from relay_harness import running_relay
from test_faults_redis import Watcher, all_exact, eventually

from relay.emitter import AsyncEmitter
from relay.emitter import RedisUnavailable as EmitUnavailable
from relay.keys import KeySpace

SHARDS = 16


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    try:
        # Without full coverage required, the healthy masters keep serving their slots while
        # a failed master's slots are uncovered (the default answers CLUSTERDOWN everywhere).
        c = RedisCluster(
            3,
            replicas=1,
            node_timeout_ms=2000,
            extra_args=["--cluster-require-full-coverage", "no"],
        ).start()
    except RedisUnavailable as e:
        pytest.skip(f"no Redis cluster: {e}")
    try:
        yield c
    finally:
        c.stop()


def seeds(cluster: RedisCluster) -> list[str]:
    return [f"127.0.0.1:{s.port}" for s in cluster.servers if s.running]


def relay_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", "check"],
        env={**os.environ, "RELAY_AUTH_SECRET": "x" * 32, **env},
        capture_output=True,
        text=True,
        timeout=50,
    )


async def test_first_seed_down_still_ready_and_check_never_crashes(cluster: RedisCluster) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    dead = f"redis://127.0.0.1:{free_port()}/0"
    section = {"cluster": True, "shards": SHARDS, "cluster_nodes": seeds(cluster)}
    async with running_relay(dead, prefix, redis=section) as relay:

        async def ready() -> str | None:
            ok, reason = await relay.readiness()
            return None if ok else reason

        await eventually(ready, 15)
    env = {
        "RELAY_REDIS_URL": dead,
        "RELAY_REDIS_CLUSTER": "true",
        "RELAY_REDIS_CLUSTER_NODES": ",".join(seeds(cluster)),
    }
    out = await asyncio.to_thread(relay_check, env)
    assert out.returncode == 0, out.stderr
    out = await asyncio.to_thread(relay_check, {**env, "RELAY_REDIS_CLUSTER_NODES": ""})
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "redis: unreachable" in out.stderr, out.stderr
    out = await asyncio.to_thread(
        relay_check, {**env, "RELAY_REDIS_URL": f"redis://127.0.0.1:1,{seeds(cluster)[0]}/0"}
    )
    assert out.returncode == 2 and "redis.cluster_nodes" in out.stderr, out.stderr
    print(f"\nall seeds down: {out.stderr.strip()}")


class BatchWorker:
    """Emits items into one batch until stopped, retrying failures (a task per batch, so a
    shard that is failing over does not hold up the others)."""

    def __init__(self, em: AsyncEmitter, batch: str, user: str) -> None:
        self.em, self.batch, self.user = em, batch, user
        self.items = 0
        self.stop = asyncio.Event()

    async def _retry(self, op: Any) -> None:
        while True:
            try:
                await op()
                return
            except (EmitUnavailable, redis.RedisError, redis.exceptions.RedisClusterException):
                await asyncio.sleep(0.05)
            except AttributeError:  # redis-py's cluster client racing a reconnect (writelines)
                await asyncio.sleep(0.05)

    async def run(self) -> None:
        while not self.stop.is_set():
            i = self.items
            await self._retry(partial(self.em.item, self.batch, self.user, f"i{i}", ok=True))
            self.items += 1
            await asyncio.sleep(0.05)
        # Items written to the killed master and not replicated are lost with it; a worker that
        # must not lose counts emits them again (idempotent), then finishes.
        for i in range(self.items):
            await self._retry(lambda i=i: self.em.item(self.batch, self.user, f"i{i}", ok=True))
        await self._retry(lambda: self.em.finish(self.batch, self.user, "completed"))


@pytest.mark.slow
async def test_master_killed_healthy_shards_keep_flowing(cluster: RedisCluster) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    keys = KeySpace(prefix, SHARDS)
    url = cluster.servers[0].url
    client = redis.asyncio.cluster.RedisCluster.from_url(
        url, socket_timeout=1.0, socket_connect_timeout=1.0
    )
    em = AsyncEmitter(client, prefix=prefix, shards=SHARDS)
    users = ["ann", "bob"]
    batches = {u: [str(uuid.uuid4()) for _ in range(12)] for u in users}
    all_batches = [b for u in users for b in batches[u]]
    for u in users:
        for b in batches[u]:
            await em.start(b, u, 10_000, label="job")
    # Which master holds each batch's shard now; kill the one with the most.
    nodes = {b: _port(client.get_node_from_key(keys.batch(b))) for b in all_batches}
    ports = list(nodes.values())
    victim = next(s for s in cluster.masters() if s.port == max(set(ports), key=ports.count))
    failed = {b for b in all_batches if nodes[b] == victim.port}
    healthy = set(all_batches) - failed
    assert failed and healthy
    section = {"cluster": True, "shards": SHARDS, "cluster_nodes": seeds(cluster)[1:]}
    async with running_relay(url, prefix, redis=section) as relay:
        watchers = [
            Watcher(f"ws://127.0.0.1:{relay.port}/ws", u, reconnect=True).start() for u in users
        ]
        frames: list[tuple[float, str, int]] = []  # (time, batch, processed) of every frame
        workers = [BatchWorker(em, b, u) for u in users for b in batches[u]]
        tasks: list[asyncio.Task[None]] = []
        try:
            for w in watchers:
                async with asyncio.timeout(10):
                    await w.snapshot_done.wait()
            for w in watchers:
                _record(w, frames)
            tasks = [asyncio.create_task(worker.run()) for worker in workers]

            async def flowing() -> str | None:
                return None if len(frames) > 50 else f"{len(frames)} frames"

            await eventually(flowing, 15)
            at_kill = {worker.batch: worker.items for worker in workers}
            killed_at = time.monotonic()
            victim.kill()

            def new_writes(batches: set[str]) -> list[float]:
                """Frames after the kill showing an item written after it (the item being
                written at the kill may have been acknowledged just before)."""
                return sorted(
                    t for t, b, n in frames if t > killed_at and b in batches and n > at_kill[b] + 1
                )

            async def failed_back() -> str | None:
                return (
                    None if new_writes(failed) else "no new frame for the killed master's batches"
                )

            await eventually(failed_back, 30)
            back_at = new_writes(failed)[0]
            during = [t for t in new_writes(healthy) if t < back_at]
            points = [killed_at, *during, back_at]
            max_gap = max(b - a for a, b in itertools.pairwise(points))
            # The point: batches on the healthy masters kept getting frames meanwhile.
            assert during, "no frame for any healthy batch while the failed shard was down"
            await asyncio.to_thread(cluster.wait_ok)
            for worker in workers:
                worker.stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 40)
            for u in users:
                await all_exact([w for w in watchers if w.user == u], em.get, batches[u])

            async def ready() -> str | None:
                ok, reason = await relay.readiness()
                return None if ok else reason

            await eventually(ready, 15)
        finally:
            for worker in workers:
                worker.stop.set()
            for t in tasks:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            for w in watchers:
                await w.stop()
            await client.aclose()
    print(
        f"\ncluster master SIGKILLed: frames for its {len(failed)} batches back after "
        f"{back_at - killed_at:.2f}s; meanwhile {len(during)} frames for the {len(healthy)} "
        f"healthy batches, longest gap {max_gap:.2f}s; every batch exact "
        f"({sum(worker.items for worker in workers)} items)"
    )


def _port(node: Any) -> int:
    assert node is not None
    return int(node.port)


def _record(w: Watcher, frames: list[tuple[float, str, int]]) -> None:
    """Hook the watcher's per-frame bookkeeping to note (time, batch, processed) of frames."""
    states = w.states

    class Recording(dict[str, dict[str, Any]]):
        def __setitem__(self, key: str, value: dict[str, Any]) -> None:
            frames.append((time.monotonic(), key, int(value["processed"])))
            super().__setitem__(key, value)

    recording = Recording(states)
    w.states = recording
