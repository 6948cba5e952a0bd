"""Memory: relay RSS per idle authenticated connection."""

from __future__ import annotations

import asyncio
from typing import Any

from perf.harness import RelayProc
from perf.params import Ctx


async def phase_memory(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params
    relay = RelayProc(ctx.redis_url, ctx.logdir, 100, "relay-memory")
    try:
        await asyncio.sleep(1.0)
        before = relay.rss_kb()
        users = [f"mem-u{i}" for i in range(p.memory_conns)]
        await ctx.clients.connect(relay.port, users)
        await relay.wait_authenticated(len(users))
        await asyncio.sleep(2.0)
        after = relay.rss_kb()
    finally:
        await ctx.clients.close()
        relay.stop()
    return {
        "connections": p.memory_conns,
        "rss_before_kb": before,
        "rss_after_kb": after,
        "bytes_per_conn": (after - before) * 1024 / p.memory_conns,
    }
