"""Redis behind a proxy that misbehaves on idle connections, as cloud load balancers and NATs
do: one closes connections idle for a few seconds, one silently stops forwarding them.

The relay's stream reader keeps its connection busy (XREAD BLOCK 2000), but the pooled
connection used for snapshots and /readyz idles. After the idle period the first /readyz must
be 200 and the first client must get its snapshot (no 1013).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from relay_harness import open_client, progress, recv_json, running_relay
from tcp_proxy import Mode, TcpProxy
from test_faults_redis import eventually

from relay.emitter import AsyncEmitter

IDLE_S = 3.5  # above the reader's 2 s XREAD block, so only the pooled connection idles out


@pytest.fixture(params=["close", "drop"])
async def proxy(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[TcpProxy]:
    port = int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    mode: Mode = request.param
    p = await TcpProxy(port, idle_s=IDLE_S, mode=mode).start()
    yield p
    await p.stop()


async def test_first_readyz_and_snapshot_after_idle_succeed(
    proxy: TcpProxy, aredis: redis.asyncio.Redis, prefix: str
) -> None:
    em = AsyncEmitter(aredis, prefix=prefix)
    batch = str(uuid.uuid4())
    await em.start(batch, "ann", 3)
    async with running_relay(f"redis://127.0.0.1:{proxy.port}/0", prefix) as relay:
        assert await relay.readiness() == (True, "ok")
        ws = await open_client(relay, "ann")
        assert progress(await recv_json(ws), batch) is not None
        await ws.close()
        idled = proxy.idled

        async def pool_idled_out() -> str | None:
            return None if proxy.idled > idled else "no connection idled out yet"

        await eventually(pool_idled_out, 3 * IDLE_S)
        started = time.monotonic()
        ready = await relay.readiness()
        ready_s = time.monotonic() - started
        assert ready == (True, "ok")
        started = time.monotonic()
        ws = await open_client(relay, "ann")
        frame = await recv_json(ws, 10)
        snapshot_s = time.monotonic() - started
        assert progress(frame, batch) is not None, frame
        await em.item(batch, "ann", "i1", ok=True)
        live = progress(await recv_json(ws, 10), batch)
        assert live is not None and live["processed"] == 1
        await ws.close()
    print(
        f"\n{proxy.mode} after idle: /readyz {ready_s * 1000:.0f} ms, snapshot "
        f"{snapshot_s * 1000:.0f} ms; {proxy.idled} connections idled out of {proxy.connections}"
    )
