"""Redis fixtures. Tests only touch keys under their own `prefix`, on a server we spawned
(or TEST_REDIS_URL); nothing here ever FLUSHes or runs KEYS."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis_server import RedisCluster, RedisServer, RedisUnavailable


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if url := os.environ.get("TEST_REDIS_URL"):
        yield url
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def _pattern(prefix: str) -> str:
    return f"*{{{prefix}:*"  # keys look like {PREFIX:SHARD}:...


@pytest.fixture
def redis_client(redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
        for batch in _batches(list(client.scan_iter(match=_pattern(prefix), count=500))):
            client.unlink(*batch)
    finally:
        client.close()


@pytest.fixture
async def aredis(redis_url: str, prefix: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
        keys = [k async for k in client.scan_iter(match=_pattern(prefix), count=500)]
        for batch in _batches(keys):
            await client.unlink(*batch)
    finally:
        await client.aclose()


def _batches(keys: list[Any], size: int = 500) -> Iterator[list[Any]]:
    return (keys[i : i + size] for i in range(0, len(keys), size))


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    """make(**kwargs) -> a started private RedisServer(**kwargs); all stopped at teardown."""
    servers: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        server = RedisServer(**kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    try:
        cluster = RedisCluster().start()
    except RedisUnavailable as e:
        pytest.skip(f"no Redis cluster: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def relay_factory(redis_url: str, prefix: str) -> AsyncIterator[Callable[..., Any]]:
    """start(**sections) -> a started in-process Relay on a free port; shut down at teardown."""
    from relay_harness import make_config  # noqa: PLC0415

    from relay.server import Relay  # noqa: PLC0415

    relays: list[Relay] = []

    async def start(**sections: dict[str, Any]) -> Relay:
        relay = Relay(make_config(redis_url, prefix, **sections))
        await relay.start()
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        await relay.shutdown()
