"""Fan-out: frames/s delivered to N clients vs bare websockets.broadcast of one frame."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from wsload import cpu_seconds

from perf.harness import (
    BENCH,
    PY,
    STREAM,
    LineProc,
    RelayProc,
    async_redis,
    entry_fields,
    free_port,
    now_ms,
    paced,
    profiled,
    window,
)
from perf.params import Ctx
from relay.wire import BatchState, progress_frame

BATCHES = 64  # per user


async def phase_fanout(ctx: Ctx, size: int) -> dict[str, Any]:
    p = ctx.params
    groups = min(p.fanout_users, size)
    per_update = size // groups
    rate = max(10.0, p.fanout_demand / per_update)  # updates/s
    users = [f"fan-u{i % groups}" for i in range(size)]
    result: dict[str, Any] = {"clients": size, "users": groups, "updates_s_offered": rate}

    relay = RelayProc(ctx.redis_url, ctx.logdir, 0, f"relay-fanout-{size}")
    r = async_redis(ctx.redis_url)
    try:
        await ctx.clients.connect(relay.port, users)
        await relay.wait_authenticated(size)
        seqs = [0] * groups

        async def emit(first: int, count: int) -> None:
            now = int(time.time() * 1000)
            pipe = r.pipeline(transaction=False)
            for i in range(first, first + count):
                g = i % groups
                seqs[g] += 1
                # Updates cycle over BATCHES batches: the reader sends only the newest state
                # per batch of one read, so one batch would measure that conflation instead.
                batch = f"fan-b{g}-{size}-{seqs[g] % BATCHES}"
                fields = entry_fields(batch, f"fan-u{g}", seqs[g], now)
                pipe.xadd(STREAM, fields, maxlen=100_000, approximate=True)  # type: ignore[arg-type]
            await pipe.execute()

        total_s = p.fanout_warm_s + p.fanout_window_s + 0.5
        emitter = asyncio.create_task(paced(rate, total_s, 0.01, emit))
        await asyncio.sleep(p.fanout_warm_s)
        a, cpu_a = await ctx.clients.stats(), relay.cpu()
        merged_a = relay.metric("relay_frames_merged_total")
        profile = ctx.profile_dir / f"fanout-{size}.txt" if ctx.profile_dir else None
        with profiled(relay.pid, profile, p.fanout_window_s):
            await asyncio.sleep(p.fanout_window_s)
        b, cpu_b = await ctx.clients.stats(), relay.cpu()
        merged_b = relay.metric("relay_frames_merged_total")
        updates = await emitter
        w = window(a, b)
        result["relay"] = {
            **w,
            "server_cpu": (cpu_b - cpu_a) / w["secs"],
            "merged_s": (merged_b - merged_a) / w["secs"],
            "updates_sent": updates,
        }
    finally:
        await ctx.clients.close()
        relay.stop()
        await r.aclose()

    port = free_port()
    errlog = (ctx.logdir / f"bare-{size}.log").open("ab")
    bare = await LineProc.spawn([PY, str(BENCH / "bare_server.py"), "--port", str(port)], errlog)
    try:
        await bare.recv()  # ready
        await ctx.clients.connect(port, users, secret=None)
        frame = progress_frame(
            BatchState(
                batch_id="3f0c8a1e-5b7d-4c1e-9a2b-6d8e0f1a2b3c",
                user_id="fan-u0",
                status="processing",
                total=1_000_000,
                processed=123_456,
                successful=123_000,
                failed=456,
                seq=123_457,
                started_at=now_ms() - 60_000,
                updated_at=now_ms(),
                label="bench",
            ),
            rate=2057.6,
            eta_seconds=426.0,
        ).decode()
        await bare.send(
            {"cmd": "blast", "seconds": p.fanout_warm_s + p.fanout_window_s + 0.3, "frame": frame}
        )
        await asyncio.sleep(p.fanout_warm_s)
        a, cpu_a = await ctx.clients.stats(), cpu_seconds(bare.proc.pid)
        await asyncio.sleep(p.fanout_window_s)
        b, cpu_b = await ctx.clients.stats(), cpu_seconds(bare.proc.pid)
        blast = await bare.recv()
        w = window(a, b)
        result["bare"] = {**w, "server_cpu": (cpu_b - cpu_a) / w["secs"], **blast}
        result["frame_bytes"] = len(frame)
    finally:
        await ctx.clients.close()
        await bare.stop()
        errlog.close()
    result["ratio"] = result["relay"]["frames_s"] / result["bare"]["frames_s"]
    return result
