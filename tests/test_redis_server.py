"""The Redis test helpers themselves: spawn, kill, restart, AOF reload, cluster."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.cluster
from redis_server import RedisCluster, RedisServer, cluster_info

Factory = Callable[..., RedisServer]


def test_spawned_server_answers_ping(redis_server_factory: Factory) -> None:
    server = redis_server_factory()
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert server.port != 6379
    with server.client() as c:
        assert c.ping()
        assert c.config_get("save") == {"save": ""}  # redis-py decodes CONFIG GET anyway


def test_context_manager_stops_and_cleans_up() -> None:
    with RedisServer() as server, server.client() as c:
        assert c.ping()
    assert not server.running
    assert not server.dir.exists()


def test_start_failure_reports_log_tail() -> None:
    server = RedisServer(extra_args=["--no-such-directive", "x"])
    with pytest.raises(RuntimeError, match="no-such-directive"):
        server.start()
    assert not server.running
    server.stop()


def _kill_restart(server: RedisServer, key: bytes) -> Any:
    with server.client() as c:
        c.set(key, b"v")
    port = server.port
    server.kill()
    assert not server.running
    with server.client(socket_timeout=1.0, retries=0) as c, pytest.raises(redis.ConnectionError):
        c.ping()
    server.restart()
    assert server.port == port
    with server.client() as c:
        return c.get(key)


def test_kill_restart_with_aof_keeps_data(redis_server_factory: Factory, prefix: str) -> None:
    server = redis_server_factory(appendonly=True)
    assert _kill_restart(server, f"{{{prefix}:0}}:k".encode()) == b"v"


def test_kill_restart_without_aof_loses_data(redis_server_factory: Factory, prefix: str) -> None:
    server = redis_server_factory()
    assert _kill_restart(server, f"{{{prefix}:0}}:k".encode()) is None


def test_prefix_shape(prefix: str) -> None:
    assert re.fullmatch(r"t[0-9a-f]{12}", prefix)


def test_session_server_sync(redis_client: redis.Redis, prefix: str) -> None:
    redis_client.set(f"{{{prefix}:0}}:k", b"v")
    assert redis_client.get(f"{{{prefix}:0}}:k") == b"v"


async def test_session_server_async(aredis: redis.asyncio.Redis, prefix: str) -> None:
    await aredis.set(f"{{{prefix}:0}}:k", b"v")
    assert await aredis.get(f"{{{prefix}:0}}:k") == b"v"


@pytest.mark.slow
def test_cluster_serves_keys_on_every_node(redis_cluster: RedisCluster, prefix: str) -> None:
    for server in redis_cluster.servers:
        with server.client() as c:
            assert cluster_info(c)["cluster_state"] == "ok"
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url)
    try:
        keys = [f"{{{prefix}:{shard}}}:k" for shard in range(32)]
        for k in keys:
            client.set(k, k.encode())
        assert [client.get(k) for k in keys] == [k.encode() for k in keys]
    finally:
        client.close()
    for server in redis_cluster.servers:  # the keys landed on every master
        with server.client() as c:
            assert any(c.scan_iter(match=f"*{{{prefix}:*"))
