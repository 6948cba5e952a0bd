"""Redis clients built from `[redis]` config: single node or Cluster, sync or asyncio."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import redis.connection
import redis.sentinel
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from relay.config import RedisConfig, host_port

T = TypeVar("T")

# TCP keepalive on every Redis connection (redis-py 5 leaves it off): a probe after 30 s idle,
# then every 5 s, 3 unanswered probes close the connection. Keeps NAT and firewall mappings
# alive and finds a peer that vanished without closing the connection.
KEEPALIVE: Final[dict[str, Any]] = {
    "socket_keepalive": True,
    "socket_keepalive_options": {
        opt: value
        for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
        if (opt := getattr(socket, name, None)) is not None
    },
}

# A connection that may have been dropped while idle (load balancer, NAT): the errors after
# which an idempotent read is worth one more try on a fresh connection.
STALE_ERRORS: Final[tuple[type[Exception], ...]] = (
    redis.ConnectionError,
    redis.TimeoutError,
    TimeoutError,
)

# Everything a Redis outage can raise: cluster errors do not derive from RedisError.
REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
)

_COMMAND_RE = re.compile(r"'([a-z|\-]+)' command", re.IGNORECASE)


def denied(e: redis.exceptions.NoPermissionError) -> str:
    """What a NOPERM error refused: the command (`xinfo|stream`), else the error's text
    (`No permissions to access a key`)."""
    text = str(e)
    found = _COMMAND_RE.search(text)
    if found:
        return found.group(1).lower()
    return text.removeprefix("NOPERM ").strip() or "a command"


AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


class _AsyncCluster(redis.asyncio.cluster.RedisCluster):
    """RedisCluster that initializes (discovers the nodes) before any command runs.

    redis-py 8's async cluster client resolves a command's policy and slot before it
    initializes, so the first commands of concurrent tasks (the reader's one per shard, the
    first snapshots) race on the seed node's connections: "Connection closed by server",
    even an AttributeError. Here the first command, and the first after a connection loss
    made the client re-initialize, waits for one initialization under a lock.
    """

    _init_lock: asyncio.Lock | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if self._initialize:
                if self._init_lock is None:
                    self._init_lock = asyncio.Lock()
                async with self._init_lock:
                    if self._initialize:
                        await self.initialize()
            return await super().execute_command(*args, **kwargs)
        except AttributeError as e:
            if not closed_connection_race(e):
                raise
            raise redis.ConnectionError(
                f"connection closed during a cluster reconnect ({e})"
            ) from e


def closed_connection_race(e: BaseException) -> bool:
    """redis-py 8's cluster client, while a node fails over, can send on a connection that a
    concurrent task just closed: `'NoneType' object has no attribute 'writelines'` (or another
    attribute of the closed writer/reader). That is a lost connection, not a bug of ours."""
    return isinstance(e, AttributeError) and "'NoneType' object has no attribute" in str(e)


SyncClient = redis.Redis | redis.cluster.RedisCluster


class _SentinelMaster(redis.asyncio.Redis):
    """The master of a Sentinel service; closing it closes the sentinel connections too."""

    sentinel_manager: Any = None  # redis.asyncio.Sentinel (untyped in redis-py)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for client in self.sentinel_manager.sentinels:
                await client.aclose()


def _seeds(cfg: RedisConfig) -> list[tuple[str, int]]:
    """The Cluster seed nodes after url's: `cluster_nodes`."""
    return [host_port(addr, "redis.cluster_nodes") for addr in cfg.cluster_nodes]


def _sentinel_args(
    cfg: RedisConfig, opts: dict[str, Any]
) -> tuple[list[tuple[str, int]], dict[str, Any], dict[str, Any]]:
    """Sentinel addresses, the sentinels' connection options and the master's (from `url`:
    credentials, database, TLS; its host and port are ignored)."""
    master: dict[str, Any] = redis.connection.parse_url(cfg.url)  # type: ignore[no-untyped-call]
    for key in ("host", "port", "path", "connection_class"):
        master.pop(key, None)
    sentinel_opts: dict[str, Any] = {
        "socket_timeout": opts.get("socket_timeout") or 3.0,
        "socket_connect_timeout": opts["socket_connect_timeout"],
    }
    if cfg.url.startswith("rediss://"):  # sentinels of a TLS deployment speak TLS too
        master["ssl"] = True
        sentinel_opts |= {k: v for k, v in master.items() if k.startswith("ssl")}
    if cfg.sentinel_username:
        sentinel_opts["username"] = cfg.sentinel_username
    if cfg.sentinel_password:
        sentinel_opts["password"] = cfg.sentinel_password
    addrs = [host_port(a, "redis.sentinels") for a in cfg.sentinels]
    return addrs, sentinel_opts, master | opts


def async_client(
    cfg: RedisConfig, *, socket_timeout: float | None = 5.0, retries: bool = True
) -> AsyncClient:
    """An asyncio client.

    The stream reader passes a socket timeout longer than its XREAD block and `retries=False`:
    it must see every connection loss itself, to check the stream for a reset or a gap before
    it reads on.
    """
    opts: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 3.0,
        **KEEPALIVE,
    }
    if not retries:
        opts["retry"] = Retry(NoBackoff(), 0)
    if cfg.cluster:
        seeds = [redis.asyncio.cluster.ClusterNode(*addr) for addr in _seeds(cfg)]
        return _AsyncCluster.from_url(cfg.url, startup_nodes=seeds, **opts)
    if cfg.sentinels:
        addrs, sentinel_opts, master_opts = _sentinel_args(cfg, opts)
        sentinel = redis.asyncio.Sentinel(addrs, sentinel_kwargs=sentinel_opts)  # type: ignore[no-untyped-call]
        client: _SentinelMaster = sentinel.master_for(
            cfg.sentinel_service,
            redis_class=_SentinelMaster,
            health_check_interval=30,
            **master_opts,
        )
        client.sentinel_manager = sentinel
        return client
    return redis.asyncio.Redis.from_url(cfg.url, health_check_interval=30, **opts)


def sync_client(cfg: RedisConfig, *, socket_timeout: float = 5.0) -> SyncClient:
    opts: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 3.0,
        **KEEPALIVE,
    }
    if cfg.cluster:
        seeds = [redis.cluster.ClusterNode(*addr) for addr in _seeds(cfg)]  # type: ignore[no-untyped-call]
        return redis.cluster.RedisCluster.from_url(cfg.url, startup_nodes=seeds, **opts)
    if cfg.sentinels:
        addrs, sentinel_opts, master_opts = _sentinel_args(cfg, opts)
        sentinel = redis.sentinel.Sentinel(addrs, sentinel_kwargs=sentinel_opts)  # type: ignore[no-untyped-call]
        master: redis.Redis = sentinel.master_for(cfg.sentinel_service, **master_opts)  # type: ignore[no-untyped-call]
        return master
    return redis.Redis.from_url(cfg.url, **opts)


async def drop_idle_connections(client: AsyncClient) -> None:
    """Close the pooled connections nobody is using: after one turned out dead (dropped by a
    proxy or a NAT while idle), the others that idled as long are likely dead too."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        for node in client.get_nodes():
            await node.disconnect_free_connections()
    else:
        await client.connection_pool.disconnect(inuse_connections=False)


async def read_twice(
    client: AsyncClient,
    read: Callable[[], Awaitable[T]],
    *,
    first_timeout_s: float | None = None,
) -> T:
    """An idempotent read, tried once more on a fresh connection when the first try fails
    with a connection error or a timeout (`first_timeout_s` bounds the first try: a connection
    a NAT silently dropped would otherwise wait for the whole socket timeout).

    redis-py 8 does not do this by itself: a pooled connection that a proxy closed while it
    idled fails the next command at once ("Connection closed by server"), and one a NAT
    black-holed waits for the socket timeout, then fails.
    """

    async def attempt() -> T:
        try:
            return await read()
        except AttributeError as e:  # a cluster pipeline racing a reconnect
            if not closed_connection_race(e):
                raise
            raise redis.ConnectionError(f"connection closed during a reconnect ({e})") from e

    try:
        if first_timeout_s is None:
            return await attempt()
        async with asyncio.timeout(first_timeout_s):
            return await attempt()
    except STALE_ERRORS:
        await drop_idle_connections(client)
    return await attempt()


async def server_identity(client: AsyncClient, key: str) -> tuple[str, str] | None:
    """(run_id, master_replid) of the server that holds `key`: which process, and which
    replication history. Both change when Redis restarts, and the replication id when a
    replica is promoted or a server becomes a replica of another master (it takes on that
    master's history). None when the user may not run INFO (or Redis is older than 7)."""
    try:
        if isinstance(client, redis.asyncio.cluster.RedisCluster):
            node = client.get_node_from_key(key)
            raw: Any = await client.execute_command(
                "INFO", "server", "replication", target_nodes=node
            )
        else:
            raw = await client.execute_command("INFO", "server", "replication")  # type: ignore[no-untyped-call]
    except redis.ResponseError:  # NOPERM, or a Redis before 7 (one INFO section at a time)
        return None
    return str(raw.get("run_id", "")), str(raw.get("master_replid", ""))
