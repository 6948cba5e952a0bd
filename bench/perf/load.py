"""Load: the relay and the hand-written baseline side by side under a steady offered load.

The workload (issue 10): `users` users, one connection each (first-message auth, pings
answered), one batch per user at a time (a new one when the last completes), W updates/s
round-robin over the users; each update is the batch's absolute state, written with the emit
script's `set` op (total `steps`, processed = successful = k; the last one completes it),
pipelined per 5 ms tick from this process. The baseline gets the same states as JSON on its
pub/sub channel. Update i goes to user i % users, as step k of batch generation g, all derived
from i, so the final state of every batch is known from the number of updates sent.

Overload runs offer more than the emit path of one Python worker can write, so their states are
generated inside Redis by one small script call per tick (the same stream fields the emit
script writes; PUBLISH of the same JSON for the baseline). The generator writes no batch hashes,
so a trim past a lagging reader could not be resynced: its stream keeps 1,000,000 entries.

Figures per run: CPU per delivered frame (the server process's utime + stime in the window /
frames counted at the clients in the window), latency (client receive wall time - the state's
`updated_at`) p50/p99/max of the frames received in the window, relay_reader_lag_ms sampled every
second, the client-side lag per second (median latency of the frames received in that second),
and whether every batch's last frame equals its final state ("exact").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio
from wsload import cpu_seconds

from perf.harness import (
    BENCH,
    KEYS,
    PY,
    SECRET,
    STREAM,
    Clients,
    LineProc,
    RelayProc,
    async_redis,
    free_port,
    log,
    paced,
    pct,
    profiled,
)
from perf.params import Ctx
from relay.emitter import SCRIPT

NAIVE_CHANNEL = "naive:user:"
TICK_S = 0.005
FINALS_TIMEOUT_S = 20.0
LAG_SAMPLE_S = 1.0  # relay_reader_lag_ms from /metrics (each scrape costs the relay ~1 ms)

# One call per tick: updates first .. first+count-1 as stream entries (what the emit script
# appends) or as the baseline's JSON messages. ARGV: first, count, users, steps, run tag, mode.
GENERATE = """
local t = redis.call('TIME')
local now = string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))
local first, count, users, steps = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4])
local tag, mode = ARGV[5], ARGV[6]
for i = first, first + count - 1 do
  local u = i % users
  local n = math.floor(i / users)
  local k = n % steps + 1
  local batch = string.format('%s-b%d-%d', tag, u, math.floor(n / steps))
  local user = string.format('%s-u%d', tag, u)
  local status = 'processing'
  if k == steps then status = 'completed' end
  if mode == 'stream' then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', '1000000', '*', 'v', '1', 'batch_id', batch,
      'user_id', user, 'status', status, 'total', steps, 'processed', k, 'successful', k,
      'failed', 0, 'seq', k, 'started_at', now, 'updated_at', now, 'label', 'bench')
  else
    redis.call('PUBLISH', KEYS[1] .. user, cjson.encode({batch_id = batch, user_id = user,
      status = status, total = steps, processed = k, successful = k, failed = 0, seq = k,
      started_at = tonumber(now), updated_at = tonumber(now), label = 'bench'}))
  end
end
return count
"""


@dataclass(frozen=True)
class Run:
    """One configuration: `server` is "relay" or "naive"; min_interval_ms only for the relay."""

    name: str
    server: str
    rate: int
    min_interval_ms: int = 100
    pinned: bool = False
    overload: bool = False


_runs = itertools.count(1)


def _tag() -> str:
    return f"ld{os.getpid() % 1000}r{next(_runs)}"


def expected_finals(sent: int, users: int, steps: int, tag: str) -> dict[str, list[Any]]:
    """The final (processed, status) of every batch, from the number of updates sent."""
    out: dict[str, list[Any]] = {}
    for u in range(users):
        n = sent // users + (1 if u < sent % users else 0)
        for gen in range((n + steps - 1) // steps):
            k = steps if (gen + 1) * steps <= n else n - gen * steps
            out[f"{tag}-b{u}-{gen}"] = [k, "completed" if k == steps else "processing"]
    return out


async def run_load(ctx: Ctx, run: Run) -> dict[str, Any]:
    p = ctx.params
    tag = _tag()
    users = [f"{tag}-u{u}" for u in range(p.load_users)]
    steps = p.load_steps
    cpus_all = os.sched_getaffinity(0)
    pin = run.pinned and len(cpus_all) >= 2
    server_cpus = {max(cpus_all)} if pin else None  # the server alone is held to one core
    client = async_redis(ctx.redis_url)
    relay: RelayProc | None = None
    naive: LineProc | None = None
    errlog = (ctx.logdir / "naive-load.log").open("ab")
    try:
        if run.server == "relay":
            relay = RelayProc(
                ctx.redis_url, ctx.logdir, run.min_interval_ms, f"relay-{run.name}", server_cpus
            )
            port, pid = relay.port, relay.pid
        else:
            port = free_port()
            args = [PY, str(BENCH / "naive_relay.py"), "--port", str(port)]
            args += ["--redis-url", ctx.redis_url, "--secret", SECRET]
            naive = await LineProc.spawn(args, errlog)
            if server_cpus is not None:
                os.sched_setaffinity(naive.proc.pid, server_cpus)
            await naive.recv()
            pid = naive.proc.pid
        await ctx.clients.connect(port, users, parse=True, first_message=True)
        if relay is not None:
            await relay.wait_authenticated(len(users))
        else:
            await asyncio.sleep(1.0)  # the baseline subscribes each user's channel
        emit = await _emitter(client, run, len(users), steps, tag)
        seconds = p.load_warm_s + p.load_window_s
        lag: list[tuple[float, float]] = []
        stop = asyncio.Event()

        async def sample_lag() -> None:
            t0 = time.monotonic()
            while not stop.is_set():
                if relay is not None:
                    with contextlib.suppress(OSError):  # a busy relay may not answer in time
                        value = await asyncio.to_thread(relay.metric, "relay_reader_lag_ms")
                        lag.append((round(time.monotonic() - t0, 2), value))
                await asyncio.sleep(LAG_SAMPLE_S)

        sampler = asyncio.create_task(sample_lag())
        emitter = asyncio.create_task(paced(run.rate, seconds, TICK_S, emit))
        await asyncio.sleep(p.load_warm_s)
        await ctx.clients.all({"cmd": "record"})
        a, cpu_a, wall_a = await ctx.clients.stats(), _cpu(pid), time.time() * 1000
        profile = ctx.profile_dir / f"load-{run.name}-{run.server}.txt" if ctx.profile_dir else None
        with profiled(pid, profile, p.load_window_s):
            sent = await emitter
        b, cpu_b, wall_b = await ctx.clients.stats(), _cpu(pid), time.time() * 1000
        died = (
            relay.proc.poll() if relay else naive.proc.returncode if naive else None
        ) is not None
        stop.set()
        await sampler
        exact, wrong, drain_s = await _finals(ctx, sent, len(users), steps, tag)
        stats = await ctx.clients.stats(latency=True)
    finally:
        await ctx.clients.close()
        if relay is not None:
            relay.stop()
        if naive is not None:
            with contextlib.suppress(ProcessLookupError):
                naive.proc.terminate()
            await naive.proc.wait()
        errlog.close()
        await client.aclose()
    window_s = (b["t"] - a["t"]) or 1e-9
    delivered = b["frames"] - a["frames"]
    samples = list(zip(stats["lat_all"], stats["lat_t"], strict=True))
    lat = [x for x, t in samples if wall_a <= t <= wall_b]
    per_second: dict[int, list[float]] = {}
    for x, t in samples:
        per_second.setdefault(int((t - wall_a) // 1000), []).append(x)
    lag_values = [v for t, v in lag if t >= p.load_warm_s]
    out = {
        "run": run.name,
        "server": run.server,
        "rate": run.rate,
        "min_interval_ms": run.min_interval_ms if run.server == "relay" else None,
        "pinned": pin,
        "updates_sent": sent,
        "delivered": delivered,
        "frames_s": delivered / window_s,
        "cpu_util": (cpu_b - cpu_a) / window_s,
        "cpu_us_per_frame": (cpu_b - cpu_a) / max(1, delivered) * 1e6,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "max_ms": max(lat, default=float("nan")),
        "reader_lag_max_ms": max(lag_values, default=float("nan")),
        "reader_lag_ms": lag,
        "client_lag_ms": {s: statistics.median(v) for s, v in sorted(per_second.items())},
        "client_lag_max_ms": max(
            (statistics.median(v) for s, v in per_second.items() if s >= 0), default=float("nan")
        ),
        "exact": exact,
        "batches_wrong": wrong,
        "drain_s": drain_s,
        "pongs": stats.get("pongs"),
        "server_died": died,
    }
    log(
        f"load {run.name} {run.server} at {run.rate:,}/s: {out['frames_s']:,.0f} frames/s, "
        f"{out['cpu_us_per_frame']:.1f} us/frame, p50/p99 {out['p50_ms']:.1f}/"
        f"{out['p99_ms']:.1f} ms, reader lag max {out['reader_lag_max_ms']:.0f} ms, exact {exact}"
    )
    return out


def _cpu(pid: int) -> float:
    """The process's CPU seconds; NaN once it has exited (the baseline can be disconnected by
    Redis under overload: pub/sub output buffer limit)."""
    try:
        return cpu_seconds(pid)
    except OSError:
        return float("nan")


async def _emitter(client: redis.asyncio.Redis, run: Run, users: int, steps: int, tag: str) -> Any:
    """The per-tick emit function for paced(): emit.lua `set`, PUBLISH, or the generator."""
    if run.overload:
        generate = await client.script_load(GENERATE)
        key, mode = (STREAM, "stream") if run.server == "relay" else (NAIVE_CHANNEL, "publish")

        async def emit_generated(first: int, count: int) -> None:
            await client.evalsha(generate, 1, key, first, count, users, steps, tag, mode)

        return emit_generated
    if run.server == "relay":
        sha = await client.script_load(SCRIPT)

        async def emit_set(first: int, count: int) -> None:
            pipe = client.pipeline(transaction=False)
            for i in range(first, first + count):
                u, n = i % users, i // users
                k = n % steps + 1
                batch, user = f"{tag}-b{u}-{n // steps}", f"{tag}-u{u}"
                argv = ["set", batch, user, "86400000", "3600000", "100000"]
                argv += ["total", str(steps), "processed", str(k), "successful", str(k)]
                keys = KEYS.op_keys(batch, user)
                pipe.evalsha(sha, len(keys), *keys, *argv)
            await pipe.execute()

        return emit_set

    async def emit_publish(first: int, count: int) -> None:
        now = time.time() * 1000
        pipe = client.pipeline(transaction=False)
        for i in range(first, first + count):
            u, n = i % users, i // users
            k = n % steps + 1
            user = f"{tag}-u{u}"
            state = {
                "batch_id": f"{tag}-b{u}-{n // steps}",
                "user_id": user,
                "status": "completed" if k == steps else "processing",
                "total": steps,
                "processed": k,
                "successful": k,
                "failed": 0,
                "seq": k,
                "started_at": now,
                "updated_at": now,
                "label": "bench",
            }
            pipe.publish(NAIVE_CHANNEL + user, json.dumps(state))
        await pipe.execute()

    return emit_publish


async def _finals(ctx: Ctx, sent: int, users: int, steps: int, tag: str) -> tuple[bool, int, float]:
    """Wait until every batch's last frame is its final state: (exact, batches wrong, secs)."""
    want = expected_finals(sent, users, steps, tag)
    t0 = time.monotonic()
    wrong = len(want)
    while True:
        got: dict[str, list[Any]] = {}
        for reply in await ctx.clients.all({"cmd": "finals"}):
            got.update(reply)
        wrong = sum(1 for batch, final in want.items() if got.get(batch) != final)
        if not wrong or time.monotonic() - t0 > FINALS_TIMEOUT_S:
            return not wrong, wrong, time.monotonic() - t0
        await asyncio.sleep(0.25)


def runs_for(rates: tuple[int, ...], pinned_rate: int) -> list[Run]:
    """The side-by-side configurations (the overload run is added once capacity is known)."""
    out: list[Run] = []
    for rate in rates:
        label = f"{rate // 1000}k" if rate % 1000 == 0 else str(rate)
        out += [
            Run(f"{label}", "relay", rate, 100),
            Run(f"{label}", "naive", rate),
            Run(f"{label}-0ms", "relay", rate, 0),
        ]
    label = f"{pinned_rate // 1000}k-pinned"
    out += [
        Run(label, "relay", pinned_rate, 100, pinned=True),
        Run(label, "naive", pinned_rate, pinned=True),
    ]
    return out


def capacity(results: list[dict[str, Any]], rate: int) -> float | None:
    """The relay's one-frame-per-update capacity: frames per second of relay CPU in the
    min_interval 0 runs at `rate` (every update is a frame there), median over repeats."""
    per_cpu = [
        r["frames_s"] / r["cpu_util"]
        for r in results
        if r["server"] == "relay"
        and r["min_interval_ms"] == 0
        and r["rate"] == rate
        and not r["pinned"]
        and r["cpu_util"] > 0
    ]
    return statistics.median(per_cpu) if per_cpu else None


async def phase_load(ctx: Ctx) -> dict[str, Any]:
    """Every configuration `load_repeats` times, interleaved (relay, baseline, relay 0 ms, ...);
    the overload run at `overload_factor` x capacity once capacity has been measured."""
    clients = await Clients.start(1, ctx.logdir)  # the workload's clients live in one process
    try:
        return await _phase_load(replace(ctx, clients=clients))
    finally:
        await clients.stop()


async def _phase_load(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params
    results: list[dict[str, Any]] = []
    keep = set(p.load_only.split(",")) if p.load_only else None
    base = [r for r in runs_for(p.load_rates, max(p.load_rates)) if keep is None or r.name in keep]
    cap_rate = max(p.load_rates)
    for rep in range(p.load_repeats):
        log(f"load: repeat {rep + 1} of {p.load_repeats}")
        for run in base:
            results.append({**await run_load(ctx, run), "repeat": rep})
        cap = capacity(results, cap_rate)
        if cap is not None and (keep is None or "overload" in keep):
            rate = int(min(p.overload_max_rate, p.overload_factor * cap))
            for server in ("relay", "naive"):
                run = Run("overload", server, rate, 100, overload=True)
                results.append({**await run_load(ctx, run), "repeat": rep, "capacity": cap})
    return {"runs": results, "summary": summarise(results)}


def _median_of(rs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over repeats per (run, server)."""
    keys: list[tuple[str, str]] = []
    for r in results:
        if (r["run"], r["server"]) not in keys:
            keys.append((r["run"], r["server"]))
    out = []
    for name, server in keys:
        rs = [r for r in results if r["run"] == name and r["server"] == server]
        med = {
            k: statistics.median(r[k] for r in rs)
            for k in (
                "rate",
                "frames_s",
                "cpu_util",
                "cpu_us_per_frame",
                "p50_ms",
                "p99_ms",
                "max_ms",
                "reader_lag_max_ms",
                "client_lag_max_ms",
            )
        }
        out.append(
            {
                "run": name,
                "server": server,
                "repeats": len(rs),
                "min_interval_ms": rs[0]["min_interval_ms"],
                "pinned": rs[0]["pinned"],
                "exact_all": all(r["exact"] for r in rs),
                "batches_wrong_max": max(r["batches_wrong"] for r in rs),
                **med,
                # each repeat offers overload_factor x the capacity measured in that repeat
                "capacity": _median_of(rs, "capacity"),
                "factor": statistics.median(r["rate"] / r["capacity"] for r in rs)
                if all(r.get("capacity") for r in rs)
                else None,
                "server_died": any(r.get("server_died") for r in rs),
            }
        )
    return out
