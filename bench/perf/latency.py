"""Latency at 2,000 updates/s over 1,000 users (9-step batches through the emit script), the
reconnect test, and the phase that runs them (with conflation) against one relay process."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from websockets.asyncio.client import ClientConnection, connect
from wsload import cpu_seconds

from perf.conflation import conflation
from perf.harness import (
    KEYS,
    PREFIX,
    SECRET,
    RelayProc,
    async_redis,
    latency_figures,
    log,
    paced,
    profiled,
    window,
)
from perf.params import Ctx
from relay.auth import mint_token
from relay.emitter import SCRIPT, AsyncEmitter

Step = tuple[int, int, int]  # (user index, batch generation, step within the batch)
LATENCY_STEPS = 9  # start(total=8), then 8 x incr(1): the 8th completes the batch


async def run_latency(
    ctx: Ctx, port: int, pid: int, op: Callable[[list[Step]], Awaitable[None]], tag: str
) -> dict[str, Any]:
    """2,000 updates/s spread evenly over the users (each user every users/rate s)."""
    p = ctx.params
    users = [f"lat-u{i}" for i in range(p.latency_users)]
    await ctx.clients.connect(port, users, parse=True, min_interval_ms=100)
    await asyncio.sleep(0.5)
    steps = [0] * len(users)
    gens = [0] * len(users)

    async def emit(first: int, count: int) -> None:
        calls = []
        for i in range(first, first + count):
            u = i % len(users)
            calls.append((u, gens[u], steps[u]))
            steps[u] += 1
            if steps[u] == LATENCY_STEPS:
                steps[u] = 0
                gens[u] += 1
        await op(calls)

    await ctx.clients.all({"cmd": "record"})
    a, cpu_a = await ctx.clients.stats(), cpu_seconds(pid)
    others_a = (cpu_seconds(), cpu_seconds(ctx.redis_pid))
    info = redis.Redis.from_url(ctx.redis_url)
    stats_a: Any = info.info("commandstats")
    profile = ctx.profile_dir / f"latency-{tag}.txt" if ctx.profile_dir else None
    with profiled(pid, profile, p.latency_s):
        sent = await paced(p.latency_rate, p.latency_s, 0.005, emit)
    await asyncio.sleep(1.0)
    b, cpu_b = await ctx.clients.stats(latency=True), cpu_seconds(pid)
    others_b = (cpu_seconds(), cpu_seconds(ctx.redis_pid))
    stats_b: Any = info.info("commandstats")
    info.close()
    calls = {
        k.removeprefix("cmdstat_"): v["calls"] - stats_a.get(k, {}).get("calls", 0)
        for k, v in stats_b.items()
        if v["calls"] - stats_a.get(k, {}).get("calls", 0) > 100
    }
    await ctx.clients.close()
    w = window(a, b)
    delivered = b["frames"] - a["frames"]
    return {
        "updates": sent,
        "delivered": delivered,
        "server_cpu_s": cpu_b - cpu_a,
        "cpu_us_per_delivered": (cpu_b - cpu_a) / max(1, delivered) * 1e6,
        "redis_calls": calls,
        "cpu_util": {
            "server": (cpu_b - cpu_a) / w["secs"],
            "emitter": (others_b[0] - others_a[0]) / w["secs"],
            "redis": (others_b[1] - others_a[1]) / w["secs"],
            "clients": w["client_cpu_sum"],
        },
        **latency_figures(b),
    }


async def reconnect_test(
    port: int,
    n_users: int,
    start: Callable[[str, str], Awaitable[None]],
    incr: Callable[[str, str], Awaitable[None]],
    tag: str,
) -> dict[str, Any]:
    """Each client leaves mid-batch and comes back (half of them after the batch ended)."""
    steps, every_s = 40, 0.025
    finals: list[dict[str, Any] | None] = []
    missed = 0

    async def client(i: int) -> None:
        nonlocal missed
        user, batch = f"rc-{tag}-u{i}", f"rc-{tag}-b{i}"
        url = f"ws://127.0.0.1:{port}/ws?token={mint_token(SECRET, user)}"
        seen: set[int] = set()
        last: dict[str, Any] | None = None

        async def read(ws: ClientConnection, until: Callable[[dict[str, Any]], bool]) -> None:
            nonlocal last
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(steps * every_s + 3):
                    async for raw in ws:
                        frame = json.loads(raw)
                        if frame.get("action") != "batch_progress":
                            continue
                        payload = frame["payload"]
                        if payload["batch_id"] != batch:
                            continue
                        seen.add(int(payload["seq"]))
                        last = payload
                        if until(payload):
                            return

        async with connect(url) as ws:
            await ws.recv()  # auth_success
            await ready.wait()
            await read(ws, lambda pl: pl["processed"] >= 10)
        await asyncio.sleep(0.3 if i % 2 == 0 else 1.5)
        async with connect(url) as ws:
            await ws.recv()
            await read(ws, lambda pl: pl["status"] == "completed")
        finals.append(last)
        missed += (steps + 1) - len(seen)

    ready = asyncio.Event()
    tasks = [asyncio.create_task(client(i)) for i in range(n_users)]
    await asyncio.sleep(0.5)
    for i in range(n_users):
        await start(f"rc-{tag}-b{i}", f"rc-{tag}-u{i}")
    ready.set()
    for _ in range(steps):
        await asyncio.gather(*(incr(f"rc-{tag}-b{i}", f"rc-{tag}-u{i}") for i in range(n_users)))
        await asyncio.sleep(every_s)
    await asyncio.gather(*tasks)
    wrong = sum(
        1 for f in finals if f is None or f["processed"] != steps or f["status"] != "completed"
    )
    return {"clients": n_users, "final_state_lost": wrong, "updates_never_seen": missed}


async def phase_latency_conflation(ctx: Ctx, phases: set[str]) -> dict[str, Any]:
    p = ctx.params
    out: dict[str, Any] = {}
    relay = RelayProc(ctx.redis_url, ctx.logdir, 100, "relay-latency")
    client = async_redis(ctx.redis_url)
    emitter = AsyncEmitter(client, prefix=PREFIX)
    try:
        if "latency" in phases:
            sha = await client.script_load(SCRIPT)

            async def op(calls: list[Step]) -> None:
                # the emit script, one pipeline per tick (keeps the harness's CPU low)
                pipe = client.pipeline(transaction=False)
                for u, gen, step in calls:
                    batch, user = f"lat-b{u}-{gen}", f"lat-u{u}"
                    pairs = ["successful", "1"] if step else ["total", str(LATENCY_STEPS - 1)]
                    op_name = "incr" if step else "start"
                    argv = [op_name, batch, user, "86400000", "3600000", "100000", *pairs]
                    keys = KEYS.op_keys(batch, user)
                    pipe.evalsha(sha, len(keys), *keys, *argv)
                await pipe.execute()

            out["latency"] = await run_latency(ctx, relay.port, relay.pid, op, "relay")
            log(f"latency: {out['latency']['lat_clean']}")

            async def start(b: str, u: str) -> None:
                await emitter.start(b, u, 40)

            async def incr(b: str, u: str) -> None:
                await emitter.incr(b, u, successful=1)

            out["reconnect"] = await reconnect_test(
                relay.port, p.reconnect_users, start, incr, "relay"
            )
        if "conflation" in phases:
            out["conflation"] = await conflation(ctx, relay.port, emitter)
    finally:
        relay.stop()
        await client.aclose()
    return out
