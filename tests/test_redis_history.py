"""The relay notices when Redis is not the same Redis: a replica promoted after it missed the
last writes is another history, even where its stream has grown past the relay's position.

Behind a fixed address (a TCP proxy standing in for a virtual IP or a DNS failover): the
replica is detached (it misses what follows), the old master takes more writes that the relay
delivers, the detached node is promoted and written to, and the address moves to it. Its
seqs are lower than the lost ones the clients saw; clients must end on its state anyway.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import partial

import pytest
import redis.asyncio
import structlog
from redis_server import RedisServer
from relay_harness import running_relay
from tcp_proxy import TcpProxy
from test_faults_redis import Watcher, all_exact, eventually
from test_redis_acl import relay_rules

from relay.acl import RELAY_COMMANDS
from relay.emitter import AsyncEmitter

BATCHES = 4


@pytest.mark.parametrize("info", [True, False], ids=["with-info", "info-refused"])
async def test_promoted_replica_that_missed_writes_is_a_new_history(
    redis_server_factory: Callable[..., RedisServer], info: bool
) -> None:
    """The reconnect finds the last entry the relay read missing from a stream that holds
    older ones, whether or not the relay's user may run INFO (which also shows another
    server here, but the stream is the stronger proof: same data survives a restart)."""
    old = redis_server_factory()
    new = redis_server_factory(extra_args=["--replicaof", "127.0.0.1", str(old.port)])
    prefix = f"t{uuid.uuid4().hex[:12]}"
    rules = relay_rules(prefix, [*RELAY_COMMANDS, *(["info"] if info else [])])
    for server in (old, new):  # ACL users are not replicated
        with server.client() as admin:
            admin.execute_command("ACL", "SETUSER", "relay", "on", ">pw", *rules)
    proxy = await TcpProxy(old.port).start()
    old_client = redis.asyncio.Redis.from_url(old.url)
    new_client = redis.asyncio.Redis.from_url(new.url)
    old_em = AsyncEmitter(old_client, prefix=prefix)
    new_em = AsyncEmitter(new_client, prefix=prefix)
    batches = [str(uuid.uuid4()) for _ in range(BATCHES)]
    try:
        relay_url = f"redis://relay:pw@127.0.0.1:{proxy.port}/0"
        with structlog.testing.capture_logs() as logs:
            async with running_relay(relay_url, prefix) as relay:
                watcher = Watcher(f"ws://127.0.0.1:{relay.port}/ws", "ann", reconnect=True).start()
                try:
                    for b in batches:
                        await old_em.start(b, "ann", 20)
                        for i in range(5):
                            await old_em.item(b, "ann", f"i{i}", ok=True)
                    await all_exact([watcher], old_em.get, batches)
                    assert await old_client.wait(1, 5000) == 1  # replica in sync
                    # Detach the replica: it keeps its data and misses everything from here on.
                    await new_client.replicaof("NO", "ONE")
                    for (
                        b
                    ) in batches:  # lost writes: the clients see them, the new master never will
                        for i in range(5, 12):
                            await old_em.item(b, "ann", f"i{i}", ok=True)
                    await all_exact([watcher], old_em.get, batches)
                    lost_seq = {b: watcher.states[b]["seq"] for b in batches}
                    for b in batches:  # the new master's own history: fewer items, lower seqs
                        for i in range(20, 22):
                            await new_em.item(b, "ann", f"i{i}", ok=False)
                    for b in batches:
                        state = await new_em.get(b)
                        assert state is not None and state.seq < lost_seq[b]
                    gaps = relay.metrics.stream_gaps._value.get()
                    proxy.retarget(
                        new.port
                    )  # the failover: the address now leads to the new master
                    old.kill()

                    async def gap_seen() -> str | None:
                        seen = relay.metrics.stream_gaps._value.get()
                        return None if seen > gaps else "no history change noticed yet"

                    await eventually(gap_seen, 10)
                    await all_exact([watcher], new_em.get, batches)
                    for b in batches:
                        assert (
                            watcher.states[b]["processed"] == 7
                        )  # 5 items, then 2 on the new master
                        assert watcher.states[b]["failed"] == 2
                finally:
                    await watcher.stop()
    finally:
        await old_client.aclose()
        await new_client.aclose()
        await proxy.stop()
    changed = [e for e in logs if e["event"] == "redis_history_changed"]
    assert changed, "the reconnect did not notice another history"
    assert changed[0]["reason"] == "last entry read is gone"
    print(
        f"\n[{changed[0]['reason']}] promoted replica that missed 7 items per batch: "
        f"{BATCHES} batches back to the new "
        f"master's state (seq {lost_seq[batches[0]]} seen, new master at "
        f"{watcher.states[batches[0]]['seq']}), reconnects {watcher.connects}"
    )


async def test_server_that_became_a_replica_of_the_real_master(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """Sentinel's failover seen through the old master's address: the master dies, its replica
    is promoted and takes writes, the old master comes back empty at the same address (a
    reset: the relay knows nothing), then becomes a replica of the real master and loads its
    data without the relay's connection closing. The replication id tells the relay that the
    data under it changed: it re-reads the batches instead of replaying the stream."""
    old = redis_server_factory()
    new = redis_server_factory(extra_args=["--replicaof", "127.0.0.1", str(old.port)])
    prefix = f"t{uuid.uuid4().hex[:12]}"
    proxy = await TcpProxy(old.port).start()
    old_client = redis.asyncio.Redis.from_url(old.url)
    new_client = redis.asyncio.Redis.from_url(new.url)
    new_em = AsyncEmitter(new_client, prefix=prefix)
    batches = [str(uuid.uuid4()) for _ in range(BATCHES)]
    try:
        with structlog.testing.capture_logs() as logs:
            async with running_relay(f"redis://127.0.0.1:{proxy.port}/0", prefix) as relay:
                watcher = Watcher(f"ws://127.0.0.1:{relay.port}/ws", "ann", reconnect=True).start()
                try:
                    old_em = AsyncEmitter(old_client, prefix=prefix)
                    for b in batches:
                        await old_em.start(b, "ann", 20)
                        for i in range(5):
                            await old_em.item(b, "ann", f"i{i}", ok=True)
                    await all_exact([watcher], old_em.get, batches)
                    assert await old_client.wait(1, 5000) == 1
                    await new_client.replicaof("NO", "ONE")  # promoted
                    old.kill()
                    for b in batches:  # the real master moves on; the relay cannot see it
                        for i in range(5, 8):
                            await new_em.item(b, "ann", f"i{i}", ok=True)
                    old.start()  # same address, no persistence: empty

                    def changes() -> list[str]:
                        return [e["reason"] for e in logs if e["event"] == "redis_history_changed"]

                    async def noticed(reason: str) -> str | None:
                        return None if reason in changes() else f"history changes {changes()}"

                    await eventually(partial(noticed, "server restarted"), 10)
                    with old.client() as c:  # (old_client's connection died with the kill)
                        c.execute_command("REPLICAOF", "127.0.0.1", new.port)
                    await eventually(partial(noticed, "replication id changed"), 15)
                    await all_exact([watcher], new_em.get, batches)
                    for b in batches:
                        assert watcher.states[b]["processed"] == 8
                finally:
                    await watcher.stop()
    finally:
        await old_client.aclose()
        await new_client.aclose()
        await proxy.stop()
    print(f"\nold master back empty, then a replica of the real one: history changes {changes()}")
