"""Throughput of the emit script against the raw stream append it wraps.

    python bench/emit.py [--redis-url URL] [--n N] [--concurrency C]

Measures, in one run and against one Redis:
  - `AsyncEmitter.item` with C concurrent tasks over N distinct item ids (one batch);
  - raw `XADD` of a 12-field entry like the script's, from C concurrent tasks, one command
    in flight per task (the same concurrency style as the emitter);
  - the same `XADD`, pipelined: each task sends pipelines of --pipeline commands.
Prints a table, the ratios, and one JSON line with the figures. Without --redis-url it spawns
a private redis-server (tests/redis_server.py); with one, it only touches its own keys.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio
from redis.typing import EncodableT, FieldT

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from relay.emitter import AsyncEmitter  # noqa: E402 - needs the repository root on sys.path

STREAM_MAXLEN = 100_000  # the emitter's default, so both sides trim alike


class Server(Protocol):
    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...


def private_server() -> Server | None:
    """A started private redis-server, or None when tests/redis_server.py is not usable."""
    try:
        module = importlib.import_module("redis_server")
        server: Server = module.RedisServer().start()
    except Exception as e:  # no helper module, no redis-server binary...
        print(f"cannot start a private redis-server: {e}", file=sys.stderr)
        return None
    return server


async def run_tasks(
    n: int, concurrency: int, step: int, work: Callable[[int, int], Awaitable[None]]
) -> float:
    """Run work(first, count) over [0, n) in chunks of `step` from `concurrency` tasks; secs."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < n:
            first = next_index
            count = min(step, n - first)
            next_index += count
            await work(first, count)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


def entry(prefix: str, i: int) -> dict[FieldT, EncodableT]:
    """A 12-field entry shaped like the script's (same names, similar sizes)."""
    now = str(int(time.time() * 1000))
    return {
        "v": "1",
        "batch_id": f"{prefix}-batch",
        "user_id": "bench-user",
        "status": "processing",
        "total": "1000000",
        "processed": str(i),
        "successful": str(i),
        "failed": "0",
        "seq": str(i + 1),
        "started_at": now,
        "updated_at": now,
        "label": "bench",
    }


async def bench_item(client: redis.asyncio.Redis, prefix: str, n: int, c: int) -> float:
    emitter = AsyncEmitter(client, prefix=prefix, stream_maxlen=STREAM_MAXLEN)
    await emitter.start("batch", "bench-user", n, label="bench")
    for i in range(min(200, n)):  # warm-up: script cache, connections (not counted)
        await emitter.item("warmup", "bench-user", f"w{i}")

    async def work(first: int, count: int) -> None:
        await emitter.item("batch", "bench-user", f"item-{first}")

    secs = await run_tasks(n, c, 1, work)
    state = await emitter.get("batch")
    if state is None or state.processed != n:
        raise SystemExit(f"emit benchmark lost updates: {state}")
    return secs


async def bench_xadd(
    client: redis.asyncio.Redis, prefix: str, n: int, c: int, pipeline: int
) -> float:
    stream = f"{{{prefix}:0}}:raw"
    for i in range(min(200, n)):  # warm-up
        await client.xadd(f"{stream}-warmup", entry(prefix, i))

    async def one(first: int, count: int) -> None:
        await client.xadd(
            stream,
            entry(prefix, first),
            maxlen=STREAM_MAXLEN,
            approximate=True,
        )

    async def piped(first: int, count: int) -> None:
        pipe = client.pipeline(transaction=False)
        for i in range(first, first + count):
            pipe.xadd(stream, entry(prefix, i), maxlen=STREAM_MAXLEN, approximate=True)
        await pipe.execute()

    if pipeline <= 1:
        return await run_tasks(n, c, 1, one)
    return await run_tasks(n, c, pipeline, piped)


async def cleanup(client: redis.asyncio.Redis, prefix: str) -> None:
    keys: list[Any] = [k async for k in client.scan_iter(match=f"*{{{prefix}:*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.unlink(*keys[i : i + 500])


async def measure(url: str, n: int, c: int, pipeline: int) -> dict[str, Any]:
    client = redis.asyncio.Redis.from_url(url, decode_responses=False)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    try:
        info = await client.info("server")
        item_s = await bench_item(client, f"{prefix}a", n, c)
        xadd_s = await bench_xadd(client, f"{prefix}b", n, c, 1)
        piped_s = await bench_xadd(client, f"{prefix}c", n, c, pipeline)
    finally:
        for p in ("a", "b", "c"):
            await cleanup(client, f"{prefix}{p}")
        await client.aclose()
    return {
        "n": n,
        "concurrency": c,
        "pipeline": pipeline,
        "redis_version": info.get("redis_version"),
        "item_ops_s": round(n / item_s),
        "xadd_ops_s": round(n / xadd_s),
        "xadd_pipelined_ops_s": round(n / piped_s),
        "item_vs_xadd": round(xadd_s / item_s, 3),  # ratio of the ops/s figures
        "item_vs_xadd_pipelined": round(piped_s / item_s, 3),
        "secs": {
            "item": round(item_s, 3),
            "xadd": round(xadd_s, 3),
            "xadd_pipelined": round(piped_s, 3),
        },
    }


def report(figures: dict[str, Any]) -> None:
    rows = [
        ("AsyncEmitter.item (Lua script)", figures["item_ops_s"], figures["secs"]["item"]),
        ("XADD, 12 fields", figures["xadd_ops_s"], figures["secs"]["xadd"]),
        (
            f"XADD, 12 fields, pipelined x{figures['pipeline']}",
            figures["xadd_pipelined_ops_s"],
            figures["secs"]["xadd_pipelined"],
        ),
    ]
    print(f"n={figures['n']} concurrency={figures['concurrency']} redis={figures['redis_version']}")
    print(f"{'operation':<36} {'ops/s':>10} {'secs':>8}")
    for name, ops, secs in rows:
        print(f"{name:<36} {ops:>10,} {secs:>8.3f}")
    print(f"ratio item / XADD:           {figures['item_vs_xadd']:.3f}")
    print(f"ratio item / XADD pipelined: {figures['item_vs_xadd_pipelined']:.3f}")
    print(json.dumps(figures, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    parser.add_argument("--n", type=int, default=20_000, help="operations per measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent asyncio tasks")
    parser.add_argument("--pipeline", type=int, default=50, help="XADDs per pipeline")
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.pipeline < 1:
        parser.error("--n, --concurrency and --pipeline must be positive")
    server: Server | None = None
    url: str | None = args.redis_url
    if url is None:
        server = private_server()
        if server is None:
            parser.error("no private redis-server available: pass --redis-url")
        url = server.url
    try:
        figures = asyncio.run(measure(url, args.n, args.concurrency, args.pipeline))
    finally:
        if server is not None:
            server.stop()
    figures["redis"] = "private" if server is not None else "given"
    report(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
