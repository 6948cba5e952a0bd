"""Throughput and memory of the emit script, next to pipelined XADD and the previous script.

    python bench/emit.py [--redis-url URL] [--scale S] [--reporter-items N] [--reporter-procs P]

One run, one Redis (a private redis-server unless --redis-url is given), these measurements:

  - `XADD` of a 12-field entry like the script's: the stream append every change ends with;
  - the previous script (bench/baseline_emit.lua, relay/lua/emit.lua as of commit 6c708cf, kept
    as a file so the comparison runs anywhere) and the current one, taking turns in 5 rounds
    (best round kept): `item` with free-form ids (`item-123456`), `item` with numbered ids, `set`;
  - `items` with numbered ids in calls of 1, 10, 100 and 500 outcomes (and 500 free-form);
  - the reporter: N numbered items (default 10,000,000) through `Emitter.reporter` from P worker
    processes, wall time and the batch's Redis memory (`MEMORY USAGE` of its keys);
  - bytes per item of free-form ids (the item-outcome hash) and numbered ids (the bitmaps).

The Redis-side measurements send pre-encoded commands over raw sockets (4 connections, each
pipelining a window of commands, replies parsed by hiredis), as `redis-benchmark -P` does, so
they measure Redis and the script rather than Python: "ops/s" is what one Redis core sustained.
`cpu us/call` is Redis' own `usec_per_call` (INFO commandstats). Prints a table, the three goals
of issue 11 as met / not met, and one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import hiredis
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from relay.emitter import SCRIPT, Emitter  # noqa: E402 - needs the repository root on sys.path
from relay.keys import KeySpace  # noqa: E402

BASELINE_SCRIPT = (Path(__file__).parent / "baseline_emit.lua").read_text()
STREAM_MAXLEN = "100000"  # the emitter's default, so every measurement trims alike
TTL = ["86400000", "3600000", STREAM_MAXLEN]
USER = "bench-user"
CONNECTIONS = 4
ROUNDS = 5  # previous and current script take turns

# goals of issue 11
GOAL_ITEMS_500 = 500_000  # outcomes/s in calls of 500
GOAL_BYTES = 4_000_000  # a 10,000,000-item numbered batch
GOAL_REPORTER_S = 60.0
GOAL_ITEM_RATIO = 2.0  # single `item` vs the previous script


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


def resp(*args: str | bytes) -> bytes:
    """One command in the Redis protocol."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def blast(host: str, port: int, commands: list[bytes], window: int) -> float:
    """Send `commands` over CONNECTIONS sockets, `window` in flight per socket; seconds."""
    shares = [commands[i::CONNECTIONS] for i in range(CONNECTIONS)]
    errors: list[str] = []

    def run(share: list[bytes]) -> None:
        with socket.create_connection((host, port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = hiredis.Reader()
            for first in range(0, len(share), window):
                chunk = share[first : first + window]
                sock.sendall(b"".join(chunk))
                replies = 0
                while replies < len(chunk):
                    reply = reader.gets()
                    if reply is False:
                        data = sock.recv(1 << 20)
                        if not data:
                            raise ConnectionError("redis closed the connection")
                        reader.feed(data)
                        continue
                    if isinstance(reply, hiredis.ReplyError) and len(errors) < 5:
                        errors.append(str(reply))
                    replies += 1

    threads = [threading.Thread(target=run, args=(s,)) for s in shares if s]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"benchmark commands failed: {errors}")
    return secs


class Bench:
    def __init__(self, url: str, prefix: str) -> None:
        self.r = redis.Redis.from_url(url)
        kwargs = self.r.connection_pool.connection_kwargs
        self.host, self.port = kwargs.get("host", "127.0.0.1"), int(kwargs.get("port", 6379))
        self.prefix = prefix
        self.keys = KeySpace(prefix)
        self.sha = self.r.script_load(SCRIPT)
        self.old_sha = self.r.script_load(BASELINE_SCRIPT)

    def evalsha(self, op: str, batch_id: str, pairs: list[str], *, old: bool = False) -> bytes:
        keys = self.keys.op_keys(batch_id, USER)
        if old:
            keys = keys[:4]
        sha = self.old_sha if old else self.sha
        return resp("EVALSHA", sha, str(len(keys)), *keys, op, batch_id, USER, *TTL, *pairs)

    def cpu_us(self, run: Callable[[], float]) -> tuple[float, float]:
        """(seconds, Redis usec per EVALSHA/XADD call) of one measurement."""
        self.r.config_resetstat()
        secs = run()
        stats = self.r.info("commandstats")
        # scripts' inner commands count in their own stats too: EVALSHA alone when it ran
        top = stats.get("cmdstat_evalsha") or stats.get("cmdstat_xadd") or {}
        calls, usec = top.get("calls", 0), top.get("usec", 0)
        return secs, usec / max(calls, 1)

    def measure(self, commands: list[bytes], window: int) -> tuple[float, float]:
        return self.cpu_us(lambda: blast(self.host, self.port, commands, window))

    def memory(self, batch_id: str) -> int:
        keys = self.keys.op_keys(batch_id, USER)
        names = [keys[0], keys[1], keys[4], keys[5]]  # batch, items hash, seen, failed
        return sum(int(self.r.memory_usage(k, samples=0) or 0) for k in names)

    def cleanup(self) -> None:
        keys: list[Any] = list(self.r.scan_iter(match=f"*{{{self.prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            self.r.unlink(*keys[i : i + 500])


def xadd_commands(prefix: str, n: int) -> list[bytes]:
    stream = f"{{{prefix}:0}}:raw"
    now = str(int(time.time() * 1000))
    return [
        resp(
            "XADD",
            stream,
            "MAXLEN",
            "~",
            STREAM_MAXLEN,
            "*",
            "v",
            "1",
            "batch_id",
            f"{prefix}-batch",
            "user_id",
            USER,
            "status",
            "processing",
            "total",
            "1000000",
            "processed",
            str(i),
            "successful",
            str(i),
            "failed",
            "0",
            "seq",
            str(i + 1),
            "started_at",
            now,
            "updated_at",
            now,
            "label",
            "bench",
        )
        for i in range(n)
    ]


def chunks(ids: Iterator[str] | list[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for i in ids:
        batch.append(i)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _reporter_worker(where: tuple[str, str, str], ids: range, go: Any, out: Any) -> None:
    url, prefix, batch_id = where
    client = redis.Redis.from_url(url)
    emitter = Emitter(client, prefix=prefix)
    go.wait(60)
    t0 = time.perf_counter()
    with emitter.reporter(batch_id, USER) as r:
        item = r.item
        for i in ids:
            item(str(i), ok=i % 20 != 3)  # 5% failed
    out.put(time.perf_counter() - t0)
    client.close()


def bench_reporter(url: str, bench: Bench, n: int, procs: int) -> dict[str, Any]:
    batch_id = "reporter"
    Emitter(bench.r, prefix=bench.prefix).start(batch_id, USER, n)
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    per = -(-n // procs)
    workers = [
        ctx.Process(
            target=_reporter_worker,
            args=((url, bench.prefix, batch_id), range(w * per, min(n, (w + 1) * per)), go, out),
        )
        for w in range(procs)
    ]
    for w in workers:
        w.start()
    time.sleep(1.0)  # imports
    t0 = time.perf_counter()
    go.set()
    for _ in workers:
        out.get(timeout=600)
    secs = time.perf_counter() - t0
    for w in workers:
        w.join(30)
    state = Emitter(bench.r, prefix=bench.prefix).get(batch_id)
    if (
        state is None
        or state.processed != n
        or state.failed != sum(1 for i in range(n) if i % 20 == 3)
    ):
        raise SystemExit(f"reporter benchmark lost or doubled outcomes: {state}")
    memory = bench.memory(batch_id)
    return {
        "items": n,
        "procs": procs,
        "secs": round(secs, 2),
        "items_s": round(n / secs),
        "bytes": memory,
        "bytes_per_item": round(memory / n, 4),
        "flushes": state.seq - 1,
    }


def run(url: str, scale: float, reporter_items: int, reporter_procs: int) -> dict[str, Any]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    bench = Bench(url, prefix)
    rows: dict[str, dict[str, Any]] = {}

    def row(
        name: str, commands: list[bytes], outcomes: int, window: int, best: bool = False
    ) -> None:
        secs, cpu = bench.measure(commands, window)
        if best and name in rows and rows[name]["ops_s"] >= len(commands) / secs:
            rows[name]["rounds"] += 1
            return
        rounds = rows[name]["rounds"] + 1 if name in rows else 1
        rows[name] = {
            "rounds": rounds,
            "calls": len(commands),
            "outcomes": outcomes,
            "secs": round(secs, 3),
            "ops_s": round(len(commands) / secs),
            "items_s": round(outcomes / secs),
            "cpu_us_per_call": round(cpu, 2),
        }

    try:
        info = bench.r.info("server")
        n = int(100_000 * scale)
        # warm-up: script cache, connections, allocator
        warm = [bench.evalsha("item", "warm", ["item_id", f"w{i}", "ok", "1"]) for i in range(2000)]
        blast(bench.host, bench.port, warm, 64)
        row("XADD, 12 fields", xadd_commands(prefix, 2 * n), 2 * n, 64)
        # the previous and the current script take turns, ROUNDS times (the machine's load
        # changes over a run); each row keeps its best round
        per_round = max(1, n // ROUNDS)
        for turn in range(ROUNDS):
            ids = range(turn * per_round, (turn + 1) * per_round)
            for kind, item_id in (("free-form", "item-{}"), ("numbered", "{}"), ("set", "")):
                for old in (True, False):
                    tag = "previous" if old else "current"
                    if kind == "set":
                        name, batch = f"{tag}: set", f"{tag}-set"
                        calls = [
                            bench.evalsha("set", batch, ["processed", str(i + 1)], old=old)
                            for i in ids
                        ]
                    else:
                        name, batch = f"{tag}: item, {kind} ids", f"{tag}-{kind}"
                        calls = [
                            bench.evalsha(
                                "item", batch, ["item_id", item_id.format(i), "ok", "1"], old=old
                            )
                            for i in ids
                        ]
                    row(name, calls, len(calls), 64, best=True)
        for size, total in ((1, n), (10, 5 * n), (100, 10 * n), (500, 20 * n)):
            calls = [
                bench.evalsha(
                    "items",
                    f"items-{size}",
                    [w for i in ids for w in (i, "1" if int(i) % 20 != 3 else "0")],
                )
                for ids in chunks((str(i) for i in range(total)), size)
            ]
            row(f"items x{size}, numbered ids", calls, total, max(1, 64 // size))
        total = 20 * n
        calls = [
            bench.evalsha("items", "items-free", [w for i in ids for w in (f"item-{i}", "1")])
            for ids in chunks((str(1_000_000 + i) for i in range(total)), 500)
        ]
        row("items x500, free-form ids", calls, total, 1)
        free_bytes = bench.memory("items-free") / total
        numbered_bytes = bench.memory("items-500") / (20 * n)
        old_free_bytes = bench.memory("previous-free-form") / n
        bench.cleanup()
        reporter = bench_reporter(url, bench, reporter_items, reporter_procs)
    finally:
        bench.cleanup()
        bench.r.close()
    xadd = rows["XADD, 12 fields"]["ops_s"]
    for r in rows.values():
        r["vs_xadd"] = round(r["items_s"] / xadd, 3)
    current, previous = rows["current: item, free-form ids"], rows["previous: item, free-form ids"]
    item_ratio = current["ops_s"] / previous["ops_s"]
    cpu_ratio = previous["cpu_us_per_call"] / max(current["cpu_us_per_call"], 0.01)
    return {
        "redis_version": info.get("redis_version"),
        "scale": scale,
        "rows": rows,
        "reporter": reporter,
        "bytes_per_item": {
            "free_form": round(free_bytes, 2),
            "numbered": round(numbered_bytes, 4),
            "free_form_previous": round(old_free_bytes, 2),
        },
        "item_vs_previous": round(item_ratio, 2),
        "item_cpu_vs_previous": round(cpu_ratio, 2),
        "goals": {
            "items_x500_per_s": [
                rows["items x500, numbered ids"]["items_s"],
                GOAL_ITEMS_500,
                rows["items x500, numbered ids"]["items_s"] >= GOAL_ITEMS_500,
            ],
            "reporter_10m_bytes": [
                reporter["bytes"],
                GOAL_BYTES,
                reporter["items"] >= 10_000_000 and reporter["bytes"] <= GOAL_BYTES,
            ],
            "reporter_10m_secs": [
                reporter["secs"],
                GOAL_REPORTER_S,
                reporter["items"] >= 10_000_000 and reporter["secs"] <= GOAL_REPORTER_S,
            ],
            "item_vs_previous": [
                round(item_ratio, 2),
                GOAL_ITEM_RATIO,
                item_ratio >= GOAL_ITEM_RATIO,
            ],
        },
    }


def report(f: dict[str, Any]) -> None:
    print(f"redis {f['redis_version']}, scale {f['scale']}, {CONNECTIONS} pipelined connections")
    head = ("measurement", "calls", "ops/s", "items/s", "vs XADD", "cpu us/call")
    print(f"{head[0]:<34} {head[1]:>9} {head[2]:>9} {head[3]:>10} {head[4]:>8} {head[5]:>12}")
    for name, r in f["rows"].items():
        print(
            f"{name:<34} {r['calls']:>9,} {r['ops_s']:>9,} {r['items_s']:>10,} "
            f"{r['vs_xadd']:>8.3f} {r['cpu_us_per_call']:>12.2f}"
        )
    rep = f["reporter"]
    vs_xadd = rep["items_s"] / f["rows"]["XADD, 12 fields"]["ops_s"]
    print(
        f"{'reporter, numbered ids':<34} {rep['flushes']:>9,} {'':>9} {rep['items_s']:>10,} "
        f"{vs_xadd:>8.3f}   ({rep['items']:,} items, {rep['procs']} processes, {rep['secs']} s)"
    )
    b = f["bytes_per_item"]
    print(
        f"bytes per item: free-form {b['free_form']} (previous script "
        f"{b['free_form_previous']}), numbered {b['numbered']}; reporter batch "
        f"{rep['bytes']:,} bytes ({rep['bytes_per_item']} per item)"
    )
    print(
        f"single item (free-form ids) vs previous script: {f['item_vs_previous']}x ops/s, "
        f"{f['item_cpu_vs_previous']}x less Redis CPU per call"
    )
    labels = {
        "items_x500_per_s": "items in calls of 500 >= 500,000/s",
        "reporter_10m_bytes": "10M numbered items <= 4 MB",
        "reporter_10m_secs": "10M numbered items through the reporter <= 60 s",
        "item_vs_previous": "single item >= 2x the previous script",
    }
    for key, (got, goal, met) in f["goals"].items():
        verdict = "met" if met else "NOT MET"
        print(f"goal: {labels[key]:<50} {got:>12,} (goal {goal:,}): {verdict}")
    print(json.dumps(f, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the Redis-side runs")
    parser.add_argument("--reporter-items", type=int, default=10_000_000)
    parser.add_argument("--reporter-procs", type=int, default=2)
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.reporter_items < 1 or args.reporter_procs < 1:
        parser.error("--scale, --reporter-items and --reporter-procs must be positive")
    server: Server | None = None
    url: str | None = args.redis_url
    if url is None:
        server = private_server()
        if server is None:
            parser.error("no private redis-server available: pass --redis-url")
        url = server.url
    try:
        figures = run(url, args.scale, args.reporter_items, args.reporter_procs)
    finally:
        if server is not None:
            server.stop()
    figures["redis"] = "private" if server is not None else "given"
    report(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
