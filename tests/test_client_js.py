"""The shipped browser client (relay/static/client.js) under trouble, run in Node against a real
relay (issue 9, items 2, 5 and 6). Skipped without Node 20+ (`node` on PATH)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from relay_harness import SECRET, make_config, ws_url
from test_faults_redis import eventually

from relay.emitter import AsyncEmitter
from relay.server import Relay
from relay.session import SERVICE_RESTART

Factory = Callable[..., Any]
HARNESS = Path(__file__).parent / "js" / "client_harness.mjs"
NODE = shutil.which("node")


def _node_major() -> int:
    if NODE is None:
        return 0
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=False)
    return int(out.stdout.strip().lstrip("v").split(".")[0] or 0)


pytestmark = pytest.mark.skipif(_node_major() < 20, reason="needs Node.js 20+ on PATH")


class NodeClient:
    """client.js in a Node process; `events` fills with what its callbacks reported."""

    def __init__(self, url: str, user: str, **env: object) -> None:
        self.url, self.user, self.env = url, user, env
        self.events: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reading: asyncio.Task[None] | None = None

    async def start(self) -> NodeClient:
        assert NODE is not None
        env = {"RELAY_URL": self.url, "SECRET": SECRET, "USER_ID": self.user, "PATH": "/usr/bin"}
        env |= {k: str(v) for k, v in self.env.items()}
        flags = ["--experimental-websocket"] if _node_major() < 22 else []
        self.proc = await asyncio.create_subprocess_exec(
            NODE, *flags, str(HARNESS), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._reading = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.events.append(json.loads(line))

    async def wait(self, timeout: float = 60) -> None:
        assert self.proc is not None and self._reading is not None
        async with asyncio.timeout(timeout):
            await self._reading
            await self.proc.wait()
        assert self.proc.returncode == 0, await self._stderr()
        assert self.events[-1]["event"] == "done", self.events[-3:]

    async def _stderr(self) -> str:
        assert self.proc is not None and self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading

    def count(self, event: str, status: str | None = None) -> int:
        return sum(
            1
            for e in self.events
            if e["event"] == event and (status is None or e.get("status") == status)
        )

    def shown(self) -> dict[str, Any]:
        """What the page shows now: the last onChange's batches."""
        changes = [e for e in self.events if e["event"] == "change"]
        return changes[-1]["batches"] if changes else {}


@pytest.fixture
async def node_client() -> Any:
    clients: list[NodeClient] = []

    async def start(url: str, user: str, **env: object) -> NodeClient:
        client = await NodeClient(url, user, **env).start()
        clients.append(client)
        return client

    yield start
    for c in clients:
        await c.stop()


async def test_redis_down_one_client_backs_off(
    redis_server_factory: Factory, prefix: str, node_client: Any
) -> None:
    """Item 2: with Redis down, one tab makes a handful of attempts, not one every 250 ms."""
    server = redis_server_factory()
    relay = Relay(make_config(server.url, prefix))
    await relay.start()
    try:
        server.kill()
        client = await node_client(ws_url(relay), "ann", RUN_S=15)
        await client.wait()
        attempts = client.count("status", "connecting")
        print(f"\n{attempts} attempts in 15 s with Redis down")
        assert 2 <= attempts <= 6, client.events
        assert client.count("status", "connected") == 0  # never claimed to be connected
    finally:
        await relay.shutdown()


async def test_backoff_survives_a_relay_that_accepts_then_closes(node_client: Any) -> None:
    """Item 2, the client's part: auth_success followed by a close at once (what a relay did
    while Redis was down) must not reset the backoff: it resets after 10 s of being up."""
    client = await node_client("ws://127.0.0.1:9/never", "bob", RUN_S=10, FAKE_FLAP=1)
    await client.wait()
    attempts = client.count("status", "connecting")
    print(f"\n{attempts} attempts in 10 s against a flapping relay")
    assert attempts <= 6, attempts


async def test_token_refresh_with_a_browser_clock_400s_ahead(
    relay_factory: Factory, node_client: Any
) -> None:
    """Item 5: a skewed clock made the client fetch tokens in a tight loop (559 in 8 s)."""
    relay: Relay = await relay_factory()
    client = await node_client(ws_url(relay), "cat", RUN_S=8, TTL_S=60, CLOCK_SKEW_S=400)
    await client.wait()
    tokens = client.count("token")
    print(f"\n{tokens} token fetches in 8 s with the clock 400 s ahead")
    assert tokens == 1, tokens
    assert client.count("status", "connected") == 1
    assert client.count("status", "reconnecting") == 0


async def test_token_is_refreshed_in_band_before_it_expires(
    relay_factory: Factory, node_client: Any
) -> None:
    relay: Relay = await relay_factory()
    # lifetime 12 s: refreshed after 6 s (half of it, as the 30 s margin is larger), and the
    # connection outlives the first token (no 4005, no reconnect)
    client = await node_client(ws_url(relay), "dan", RUN_S=10, TTL_S=12, CLOCK_SKEW_S=-300)
    await client.wait()
    assert client.count("token") == 2, client.events
    assert client.count("status", "connected") == 2  # the first, then the refresh's answer
    assert client.count("status", "reconnecting") == 0


async def test_client_follows_redis_that_lost_its_data(
    redis_server_factory: Factory, prefix: str, node_client: Any
) -> None:
    """Item 6: after Redis lost its data the relay sends restarted seqs (the client must show
    them), and a new connection's snapshot replaces what the client knew."""
    server = redis_server_factory()
    relay = Relay(make_config(server.url, prefix))
    await relay.start()
    client_redis = redis.asyncio.Redis.from_url(server.url)
    try:
        em = AsyncEmitter(client_redis, prefix=prefix)
        kept, lost = str(uuid.uuid4()), str(uuid.uuid4())
        await em.start(kept, "eli", 10)
        for i in range(5):
            await em.item(kept, "eli", f"i{i}")
        await em.start(lost, "eli", 3)
        client = await node_client(ws_url(relay), "eli", RUN_S=40)

        async def shows(expect: dict[str, dict[str, Any]]) -> str | None:
            got = client.shown()
            return None if got == expect else f"shows {got}"

        await eventually(
            lambda: shows(
                {
                    kept: {"status": "processing", "seq": 6, "processed": 5},
                    lost: {"status": "pending", "seq": 1, "processed": 0},
                }
            ),
            15,
        )
        await asyncio.to_thread(server.restart)  # no persistence: Redis comes back empty
        await eventually(
            lambda: asyncio.sleep(0, None if relay.metrics.stream_gaps._value.get() else "no gap"),
            15,
        )
        await client_redis.aclose()
        client_redis = redis.asyncio.Redis.from_url(server.url)
        em = AsyncEmitter(client_redis, prefix=prefix)
        await em.start(kept, "eli", 10)
        await em.item(kept, "eli", "j0")  # kept restarts: seq 2 < the 6 the client saw
        await eventually(
            lambda: shows(
                {
                    kept: {"status": "processing", "seq": 2, "processed": 1},
                    lost: {"status": "pending", "seq": 1, "processed": 0},
                }
            ),
            15,
        )
        for s in list(relay.sessions):  # the relay restarts: the client reconnects
            await s.close(SERVICE_RESTART, "restart")
        await eventually(
            lambda: shows({kept: {"status": "processing", "seq": 2, "processed": 1}}), 15
        )
        assert client.count("status", "connected") == 2
    finally:
        await client_redis.aclose()
        await relay.shutdown()
