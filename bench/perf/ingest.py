"""Ingest: stream entries/s the relay turns into states vs a bare redis-py XREAD drain."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import redis

from perf.harness import STREAM, RelayProc, async_redis, entry_fields, log, profiled
from perf.params import Ctx


async def phase_ingest(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params
    r = redis.Redis.from_url(ctx.redis_url)
    now = int(time.time() * 1000)
    r.xadd(STREAM, entry_fields("seed", "nobody", 1, now))  # type: ignore[arg-type]
    relay = RelayProc(ctx.redis_url, ctx.logdir, 100, "relay-ingest")
    try:
        users = [f"in-u{i}" for i in range(p.ingest_users)]
        await ctx.clients.connect(relay.port, users)
        await relay.wait_authenticated(len(users))
        n = p.ingest_entries

        async def burst(owners: list[str], gen: int, name: str) -> tuple[float, float]:
            """Append the whole burst while the relay is stopped (SIGSTOP), so that it finds it
            all at once when it resumes; seconds and relay CPU seconds to read it all. (The
            same stream: a burst renamed into place would be another history to the reader.)"""
            base = relay.metric("relay_stream_entries_read_total")
            os.kill(relay.pid, signal.SIGSTOP)
            try:
                log(f"ingest: filling {p.ingest_entries:,} entries ({name})")
                pipe = r.pipeline(transaction=False)
                for i in range(p.ingest_entries):
                    b = i % p.ingest_batches
                    seq = gen * 1_000_000 + 1 + i // p.ingest_batches
                    fields = entry_fields(f"in-b{b}", owners[b % len(owners)], seq, now)
                    pipe.xadd(STREAM, fields)  # type: ignore[arg-type]
                    if len(pipe) >= 2_000:
                        pipe.execute()
                pipe.execute()
            finally:
                cpu0 = relay.cpu()
                t0 = time.perf_counter()
                os.kill(relay.pid, signal.SIGCONT)
            profile = ctx.profile_dir / f"ingest-{name}.txt" if ctx.profile_dir else None
            with profiled(relay.pid, profile, max(2.0, p.ingest_entries / 40_000)):
                while relay.metric("relay_stream_entries_read_total") < base + n:
                    if time.perf_counter() - t0 > 300:
                        raise RuntimeError("relay did not read the burst in 300 s")
                    await asyncio.sleep(0.02)
                secs = time.perf_counter() - t0
            return secs, relay.cpu() - cpu0

        secs, cpu = await burst(users, 0, "watched")
        frames = relay.metric("relay_frames_sent_total")
        off_secs, off_cpu = await burst(
            [f"off-u{i}" for i in range(p.ingest_users)], 1, "unwatched"
        )
    finally:
        await ctx.clients.close()
        relay.stop()
    # the limit: a bare redis-py XREAD drain of the same entries, nothing done with them
    client = async_redis(ctx.redis_url)
    last: bytes | str = "0-0"
    got = 0
    t0 = time.perf_counter()
    while got < n:
        reply: Any = await client.xread({STREAM: last}, count=1_000)
        entries = reply[0][1]
        got += len(entries)
        last = entries[-1][0]
    bare_secs = time.perf_counter() - t0
    await client.aclose()
    r.close()
    relay_rate, bare_rate = n / secs, n / bare_secs
    return {
        "entries": n,
        "batches": p.ingest_batches,
        "users": p.ingest_users,
        "relay_entries_s": relay_rate,
        "xread_entries_s": bare_rate,
        "ratio": relay_rate / bare_rate,
        "relay_cpu_util": cpu / secs,
        "relay_us_per_entry": cpu / n * 1e6,
        "frames_sent": frames,
        "unwatched_entries_s": n / off_secs,
        "unwatched_ratio": n / off_secs / bare_rate,
        "unwatched_us_per_entry": off_cpu / n * 1e6,
    }
