"""Helpers for end-to-end tests: an in-process relay on port 0 and real WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect

from relay.auth import mint_token
from relay.config import Config
from relay.server import Relay

SECRET = "test-secret-for-the-relay-e2e-tests-32b"


def make_config(redis_url: str, prefix: str, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "redis": {"url": redis_url, "prefix": prefix},
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"secret": SECRET},
        "lifecycle": {"shutdown_timeout_s": 3.0},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return msgspec.convert(data, Config)


def token(user: str, ttl_s: float = 3600, **extra: object) -> str:
    return mint_token(SECRET, user, ttl_s=ttl_s, extra=dict(extra) or None)


def ws_url(relay: Relay, query: str = "") -> str:
    return f"ws://127.0.0.1:{relay.port}{relay.config.server.path}{query}"


async def open_client(relay: Relay, user: str | None = None, **kwargs: Any) -> ClientConnection:
    """Connect; with `user`, authenticate by first message and consume auth_success."""
    ws = await connect(ws_url(relay), open_timeout=5, **kwargs)
    if user is not None:
        await ws.send(json.dumps({"type": "auth", "token": token(user)}))
        frame = await recv_json(ws)
        assert frame == {"action": "auth_success", "user_id": user}, frame
    return ws


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        raw = await ws.recv()
    data: dict[str, Any] = json.loads(raw)
    return data


async def collect_until(
    ws: ClientConnection,
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """Receive frames until `done(frame)` is true; fail after `timeout` seconds."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; last frames: {frames[-3:]}"
        frame = await recv_json(ws, left)
        frames.append(frame)
        if done(frame):
            return frames


def progress(frame: dict[str, Any], batch_id: str | None = None) -> dict[str, Any] | None:
    """The payload of a batch_progress frame (for `batch_id` if given), else None."""
    if frame.get("action") != "batch_progress":
        return None
    payload: dict[str, Any] = frame["payload"]
    if batch_id is not None and payload["batch_id"] != batch_id:
        return None
    return payload


def http_status(url: str) -> int:
    """GET url: the status code, or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback test URL
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


async def wait_http(url: str, expected: int, timeout: float = 20.0) -> None:
    """Poll GET url until it answers `expected`; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := await asyncio.to_thread(http_status, url)) != expected:
        assert loop.time() < deadline, f"{url} stayed {got}, wanted {expected}"
        await asyncio.sleep(0.05)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_relay(
    redis_url: str, prefix: str, **sections: dict[str, Any]
) -> AsyncIterator[Relay]:
    """A started in-process relay on `redis_url` (any Redis: TLS, ACL user, Sentinel...)."""
    relay = Relay(make_config(redis_url, prefix, **sections))
    await relay.start()
    try:
        yield relay
    finally:
        await relay.shutdown()
