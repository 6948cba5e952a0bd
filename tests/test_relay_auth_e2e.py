"""Authentication over real sockets: every documented close code and HTTP status."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from relay_harness import open_client, recv_json, token, ws_url
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.server import Relay

Factory = Callable[..., Any]


async def closed_with(ws: Any, timeout: float = 10.0) -> int | None:
    """Read until the connection closes; return the close code."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as e:
            return e.rcvd.code if e.rcvd else None


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (json.dumps({"action": "ping"}), 4002),
        (json.dumps({"type": "auth", "token": "not-a-jwt"}), 4003),
        ("this is not json", 4004),
        (json.dumps({"type": "auth", "token": 42}), 4004),
    ],
)
async def test_first_message_failures(relay_factory: Factory, first: str, code: int) -> None:
    relay: Relay = await relay_factory()
    ws = await open_client(relay)
    await ws.send(first)
    frame = await recv_json(ws)
    assert frame["action"] == "auth_error" and frame["message"]
    assert await closed_with(ws) == code


async def test_auth_timeout(relay_factory: Factory) -> None:
    relay: Relay = await relay_factory(auth={"auth_timeout_s": 0.3})
    ws = await open_client(relay)
    assert (await recv_json(ws))["action"] == "auth_error"
    assert await closed_with(ws) == 4001


async def test_expired_token_refused(relay_factory: Factory) -> None:
    relay: Relay = await relay_factory()
    ws = await open_client(relay)
    await ws.send(json.dumps({"type": "auth", "token": token("u", ttl_s=-10)}))
    assert (await recv_json(ws))["action"] == "auth_error"
    assert await closed_with(ws) == 4003


@pytest.mark.parametrize("where", ["header", "query"])
async def test_handshake_auth(relay_factory: Factory, where: str) -> None:
    relay: Relay = await relay_factory()
    t = token("hank")
    if where == "header":
        ws = await connect(ws_url(relay), additional_headers={"Authorization": f"Bearer {t}"})
    else:
        ws = await connect(ws_url(relay, f"?token={t}"))
    assert await recv_json(ws) == {"action": "auth_success", "user_id": "hank"}
    await ws.close()


@pytest.mark.parametrize("where", ["header", "query"])
async def test_handshake_auth_invalid_is_401(relay_factory: Factory, where: str) -> None:
    relay: Relay = await relay_factory()
    with pytest.raises(InvalidStatus) as info:
        if where == "header":
            await connect(ws_url(relay), additional_headers={"Authorization": "Bearer bad.token.x"})
        else:
            await connect(ws_url(relay, "?token=bad"))
    assert info.value.response.status_code == 401


async def test_token_expiry_closes_4005(relay_factory: Factory) -> None:
    relay: Relay = await relay_factory()
    ws = await connect(ws_url(relay))
    await ws.send(json.dumps({"type": "auth", "token": token("exp", ttl_s=1.5)}))
    assert (await recv_json(ws))["action"] == "auth_success"
    assert await closed_with(ws) == 4005


async def test_refresh_prevents_expiry(relay_factory: Factory) -> None:
    relay: Relay = await relay_factory(fanout={"heartbeat_s": 0.5})
    ws = await connect(ws_url(relay))
    await ws.send(json.dumps({"type": "auth", "token": token("ref", ttl_s=1.5)}))
    assert (await recv_json(ws))["action"] == "auth_success"
    await ws.send(json.dumps({"type": "auth", "token": token("ref", ttl_s=60)}))
    # Heartbeats keep arriving well past the first token's expiry (1.5 s + margin).
    loop = asyncio.get_running_loop()
    until = loop.time() + 3.5
    while loop.time() < until:
        frame = await recv_json(ws)
        assert frame["action"] in {"ping", "auth_success"}
    await ws.close()


async def test_refresh_for_another_user_closes_4003(relay_factory: Factory) -> None:
    relay: Relay = await relay_factory()
    ws = await open_client(relay, "first")
    await ws.send(json.dumps({"type": "auth", "token": token("second")}))
    assert await closed_with(ws) == 4003


async def test_oversized_message_closes_1009(relay_factory: Factory) -> None:
    relay: Relay = await relay_factory()
    ws = await open_client(relay, "big")
    await ws.send(json.dumps({"action": "pong", "pad": "x" * 5000}))
    assert await closed_with(ws) == 1009


async def test_non_json_after_auth_closes_4004(relay_factory: Factory) -> None:
    relay: Relay = await relay_factory()
    ws = await open_client(relay, "nj")
    await ws.send("{nope")
    assert await closed_with(ws) == 4004


async def test_per_user_limit(relay_factory: Factory) -> None:
    relay: Relay = await relay_factory(server={"max_connections_per_user": 2})
    a = await open_client(relay, "lim")
    b = await open_client(relay, "lim")
    c = await connect(ws_url(relay))
    await c.send(json.dumps({"type": "auth", "token": token("lim")}))
    assert await closed_with(c) == 4029
    await asyncio.gather(a.close(), b.close())


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback test URL
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_http_routes(relay_factory: Factory) -> None:
    relay: Relay = await relay_factory()
    base = f"http://127.0.0.1:{relay.port}"
    status, _ = await asyncio.to_thread(_get, base + "/healthz")
    assert status == 200
    status, body = await asyncio.to_thread(_get, base + "/metrics")
    assert status == 200 and "relay_frames_sent_total" in body
    status, _ = await asyncio.to_thread(_get, base + "/nope")
    assert status == 404
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        status, body = await asyncio.to_thread(_get, base + "/readyz")
        if status == 200:
            break
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.05)
    assert json.loads(body)["ready"] is True


async def test_disallowed_origin_is_403(relay_factory: Factory) -> None:
    relay: Relay = await relay_factory(server={"allowed_origins": ["https://app.example"]})
    with pytest.raises(InvalidStatus) as info:
        await connect(ws_url(relay), origin="https://evil.example")  # type: ignore[arg-type]
    assert info.value.response.status_code == 403
    ok = await connect(ws_url(relay), origin="https://app.example")  # type: ignore[arg-type]
    await ok.close()


async def test_refused_connections_do_not_eat_the_unauthenticated_budget(
    relay_factory: Factory,
) -> None:
    relay: Relay = await relay_factory(
        server={"max_connections_per_user": 1, "max_unauthenticated": 2}
    )
    keep = await open_client(relay, "solo")
    for _ in range(4):
        extra = await connect(ws_url(relay))
        await extra.send(json.dumps({"type": "auth", "token": token("solo")}))
        assert await closed_with(extra) == 4029
    other = await open_client(relay, "someone-else")  # not refused with 503
    await asyncio.gather(keep.close(), other.close())
