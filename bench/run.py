"""The relay's performance, side by side with what limits it, in one run on this machine.

    python bench/run.py [--quick] [--profile DIR] [--only PHASES]

Everything on loopback: a private redis-server (tests/redis_server.py), the relay as its own
process (`python -m relay.cli serve`, configured with RELAY_* variables), WebSocket clients in
separate processes (bench/wsload.py: raw-socket clients that only count frames, or decode them
for latencies), and the baselines (bench/bare_server.py, bench/naive_relay.py) also as their
own processes, so that every figure of CPU time is one process's own /proc/PID/stat.

Phases (docs/PERFORMANCE.md explains each figure and what limits it):
  ingest     stream entries/s the relay turns into states vs a bare redis-py XREAD drain
  fanout     frames/s delivered to N clients vs bare websockets.broadcast of one frame
  latency    emit-to-client p50/p99/max at 2,000 updates/s over 1,000 users
  conflation one 1,000,000-item batch at full speed: frames received, exact final state
  naive      the same latency workload through a hand-written pub/sub relay; reconnects
  memory     relay RSS per idle authenticated connection
Prints a table, then one JSON line with every figure. --quick: smaller sizes, < 1 minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib
import importlib.metadata
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(BENCH)]

import redis  # noqa: E402
import redis.asyncio  # noqa: E402
from naive_relay import CHANNEL, naive_message  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from wsload import cpu_seconds  # noqa: E402

from relay.auth import mint_token  # noqa: E402
from relay.emitter import SCRIPT, AsyncEmitter  # noqa: E402
from relay.keys import KeySpace  # noqa: E402
from relay.wire import BatchState, progress_frame  # noqa: E402

SECRET = "bench-secret-for-the-progress-relay-0123456789"
PREFIX = "progress"
PY = sys.executable
_redis_server: Any = importlib.import_module("redis_server")  # tests/redis_server.py
RedisServer: Any = _redis_server.RedisServer
free_port: Callable[[], int] = _redis_server.free_port
KEYS = KeySpace(PREFIX, 1)
STREAM = KEYS.stream(0)
PHASES = ("ingest", "latency", "conflation", "naive", "memory", "fanout")


@dataclass(frozen=True)
class Params:
    ingest_entries: int
    ingest_batches: int
    ingest_users: int
    fanout_sizes: tuple[int, ...]
    fanout_users: int  # the N clients belong to this many users (N / users connections each)
    fanout_demand: int  # frames/s the emitter asks for (well above what anyone can deliver)
    fanout_warm_s: float
    fanout_window_s: float
    latency_users: int
    latency_rate: int  # updates/s
    latency_s: float
    conflation_items: int
    conflation_step: int
    memory_conns: int
    workers: int  # client processes
    reconnect_users: int


QUICK = Params(
    ingest_entries=20_000,
    ingest_batches=10_000,
    ingest_users=200,
    fanout_sizes=(200, 1_000),
    fanout_users=1,
    fanout_demand=100_000,
    fanout_warm_s=1.0,
    fanout_window_s=1.5,
    latency_users=1_000,
    latency_rate=2_000,
    latency_s=3.0,
    conflation_items=1_000_000,
    conflation_step=1_000,
    memory_conns=1_000,
    workers=2,
    reconnect_users=4,
)
FULL = Params(
    ingest_entries=200_000,
    ingest_batches=10_000,
    ingest_users=1_000,
    fanout_sizes=(1_000, 10_000),
    fanout_users=1,
    fanout_demand=100_000,
    fanout_warm_s=3.0,
    fanout_window_s=10.0,
    latency_users=1_000,
    latency_rate=2_000,
    latency_s=15.0,
    conflation_items=1_000_000,
    conflation_step=10,
    memory_conns=10_000,
    workers=2,
    reconnect_users=10,
)


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when this process dies (no orphans after a kill)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65_536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return int(want)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


# -- processes --------------------------------------------------------------------------------


class Proc:
    """A child process with its log in the run's directory."""

    def __init__(self, name: str, args: list[str], logdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            args,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - no threads here
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class RelayProc(Proc):
    def __init__(self, redis_url: str, logdir: Path, min_interval_ms: int, name: str) -> None:
        self.port = free_port()
        env = {
            "RELAY_REDIS_URL": redis_url,
            "RELAY_REDIS_PREFIX": PREFIX,
            "RELAY_SERVER_HOST": "127.0.0.1",
            "RELAY_SERVER_PORT": str(self.port),
            "RELAY_AUTH_SECRET": SECRET,
            "RELAY_SERVER_MAX_CONNECTIONS": "50000",
            "RELAY_SERVER_MAX_UNAUTHENTICATED": "50000",
            "RELAY_SERVER_MAX_CONNECTIONS_PER_USER": "50000",
            "RELAY_FANOUT_MIN_INTERVAL_MS": str(min_interval_ms),
            "RELAY_LOG_LEVEL": "warning",
            "RELAY_LOG_FORMAT": "json",
        }
        super().__init__(name, [PY, "-m", "relay.cli", "serve"], logdir, env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if http_get(self.port, "/readyz", 1.0)[0] == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("relay not ready in 20 s")

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in http_get(self.port, "/metrics")[1].splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    async def wait_authenticated(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        key = 'relay_connections{state="authenticated"}'
        while True:
            got = self.metric(key)
            if got >= n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {got} of {n} connections authenticated")
            await asyncio.sleep(0.1)


class LineProc:
    """A child driven by JSON lines on stdin/stdout (bench/wsload.py, bench/bare_server.py)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def spawn(cls, args: list[str], stderr: IO[bytes]) -> LineProc:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,
            limit=256 * 1024 * 1024,
            preexec_fn=die_with_parent,
        )
        return cls(proc)

    async def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.proc.pid} exited")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        await self.send(cmd)
        return await self.recv()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.send({"cmd": "exit"})
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Clients:
    """The WebSocket load: `workers` processes of bench/wsload.py."""

    def __init__(self, procs: list[LineProc]) -> None:
        self.procs = procs

    @classmethod
    async def start(cls, n: int, logdir: Path) -> Clients:
        errlog = (logdir / "wsload.log").open("ab")
        procs = [await LineProc.spawn([PY, str(BENCH / "wsload.py")], errlog) for _ in range(n)]
        return cls(procs)

    async def connect(
        self,
        port: int,
        users: list[str],
        *,
        secret: str | None = SECRET,
        parse: bool = False,
        min_interval_ms: float = 100,
    ) -> int:
        k = len(self.procs)
        replies = await asyncio.gather(
            *(
                p.call(
                    {
                        "cmd": "connect",
                        "host": "127.0.0.1",
                        "port": port,
                        "path": "/ws",
                        "users": users[i::k],
                        "secret": secret,
                        "concurrency": 32,
                        "parse": parse,
                        "min_interval_ms": min_interval_ms,
                    }
                )
                for i, p in enumerate(self.procs)
            )
        )
        opened = sum(int(r["opened"]) for r in replies)
        if opened < len(users):
            raise RuntimeError(f"only {opened} of {len(users)} clients connected: {replies}")
        return opened

    async def all(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(p.call(cmd) for p in self.procs)))

    async def stats(self, latency: bool = False) -> dict[str, Any]:
        replies = await self.all({"cmd": "stats", "latency": latency})
        out: dict[str, Any] = {
            "frames": sum(r["frames"] for r in replies),
            "bytes": sum(r["bytes"] for r in replies),
            "cpu": [r["cpu"] for r in replies],
            "t": time.monotonic(),
            "closed_by_server": sum(r["closed_by_server"] for r in replies),
        }
        if latency:
            for key in ("lat_all", "lat_clean", "lat_edge", "lat_build"):
                out[key] = [x for r in replies for x in r[key]]
        return out

    async def close(self) -> None:
        await self.all({"cmd": "close"})

    async def stop(self) -> None:
        for p in self.procs:
            await p.stop()


def window(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    dt = b["t"] - a["t"]
    return {
        "secs": dt,
        "frames_s": (b["frames"] - a["frames"]) / dt,
        "bytes_s": (b["bytes"] - a["bytes"]) / dt,
        "client_cpu_max": max((cb - ca) / dt for ca, cb in zip(a["cpu"], b["cpu"], strict=True)),
        "client_cpu_sum": sum((cb - ca) / dt for ca, cb in zip(a["cpu"], b["cpu"], strict=True)),
    }


@contextlib.contextmanager
def profiled(pid: int, out: Path | None, seconds: float) -> Iterator[None]:
    """py-spy record the process for `seconds` while the block runs (when out is given)."""
    proc: subprocess.Popen[bytes] | None = None
    if out is not None:
        pyspy = Path(PY).parent / "py-spy"
        args = [str(pyspy), "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "200"]
        args += ["-f", "raw", "-o", str(out), "--nonblocking"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        if proc is not None:
            try:
                proc.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                proc.terminate()


# -- emission helpers -------------------------------------------------------------------------


def entry_fields(batch_id: str, user_id: str, seq: int, now_ms: int) -> dict[str, str]:
    """A stream entry exactly as the emit script writes it (relay/wire.py state_from_fields)."""
    return {
        "v": "1",
        "batch_id": batch_id,
        "user_id": user_id,
        "status": "processing",
        "total": "1000000000",
        "processed": str(seq),
        "successful": str(seq),
        "failed": "0",
        "seq": str(seq),
        "started_at": str(now_ms - 60_000),
        "updated_at": str(now_ms),
        "label": "bench",
    }


async def paced(
    rate: float, seconds: float, tick_s: float, emit: Callable[[int, int], Awaitable[None]]
) -> int:
    """Call emit(first_index, count) every tick so that `rate` items/s go out; returns items."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    while True:
        elapsed = loop.time() - start
        if elapsed >= seconds:
            return sent
        due = int(rate * elapsed) + 1
        if due > sent:
            await emit(sent, due - sent)
            sent = due
        await asyncio.sleep(tick_s)


# -- phases -----------------------------------------------------------------------------------


@dataclass
class Ctx:
    params: Params
    redis_url: str
    logdir: Path
    clients: Clients
    profile_dir: Path | None
    redis_pid: int


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
        tmp = f"{KEYS.tag(0)}:bench-fill"
        n = p.ingest_entries + 1

        async def burst(owners: list[str], gen: int, name: str) -> tuple[float, float]:
            """Append the whole burst at once; seconds and relay CPU seconds to read it all."""
            r.delete(tmp)
            log(f"ingest: filling {p.ingest_entries:,} entries ({name})")
            pipe = r.pipeline(transaction=False)
            for i in range(p.ingest_entries):
                b = i % p.ingest_batches
                seq = gen * 1_000_000 + 1 + i // p.ingest_batches
                fields = entry_fields(f"in-b{b}", owners[b % len(owners)], seq, now)
                pipe.xadd(tmp, fields)  # type: ignore[arg-type]
                if len(pipe) >= 2_000:
                    pipe.execute()
            pipe.execute()
            base = relay.metric("relay_stream_entries_read_total")
            cpu0 = relay.cpu()
            t0 = time.perf_counter()
            profile = ctx.profile_dir / f"ingest-{name}.txt" if ctx.profile_dir else None
            with profiled(relay.pid, profile, max(2.0, p.ingest_entries / 40_000)):
                tx = r.pipeline(transaction=True)
                tx.rename(tmp, STREAM)  # the whole burst appears at once
                tx.xadd(STREAM, entry_fields("wake", "nobody", gen + 2, now))  # type: ignore[arg-type]
                tx.execute()
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
                fields = entry_fields(f"fan-b{g}-{size}", f"fan-u{g}", seqs[g], now)
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


def async_redis(url: str) -> redis.asyncio.Redis:
    """A client that waits for a free connection instead of failing past 64 in flight."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=64, timeout=30)
    return redis.asyncio.Redis(connection_pool=pool)


def now_ms() -> int:
    return int(time.time() * 1000)


def latency_figures(stats: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("lat_clean", "lat_edge", "lat_all", "lat_build"):
        values: list[float] = stats[key]
        out[key] = {
            "n": len(values),
            "p50": pct(values, 50),
            "p99": pct(values, 99),
            "max": max(values, default=float("nan")),
        }
    return out


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


async def conflation(ctx: Ctx, port: int, emitter: AsyncEmitter) -> dict[str, Any]:
    p = ctx.params
    user, batch = "conf-user", f"conf-{time.time_ns()}"
    frames: list[dict[str, Any]] = []
    async with connect(f"ws://127.0.0.1:{port}/ws?token={mint_token(SECRET, user)}") as ws:
        await ws.recv()
        final_seq = asyncio.get_running_loop().create_future()

        async def collect() -> None:
            async for raw in ws:
                frame = json.loads(raw)
                if (
                    frame.get("action") == "batch_progress"
                    and frame["payload"]["batch_id"] == batch
                ):
                    frames.append(frame["payload"])
                    if final_seq.done() and frame["payload"]["seq"] >= final_seq.result():
                        return

        collector = asyncio.create_task(collect())
        calls = p.conflation_items // p.conflation_step
        next_call = 0

        async def worker() -> None:
            nonlocal next_call
            while next_call < calls:
                next_call += 1
                await emitter.incr(batch, user, successful=p.conflation_step)

        t0 = time.perf_counter()
        await emitter.start(batch, user, p.conflation_items, label="conflation")
        await asyncio.gather(*(worker() for _ in range(32)))
        duration = time.perf_counter() - t0
        state = await emitter.get(batch)
        assert state is not None
        final_seq.set_result(state.seq)
        if frames and frames[-1]["seq"] >= state.seq:
            collector.cancel()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(collector, 5)
    last = frames[-1] if frames else {}
    exact = all(
        last.get(k) == getattr(state, k)
        for k in ("status", "total", "processed", "successful", "failed", "seq")
    )
    bound = duration / 0.1 + 2
    return {
        "items": p.conflation_items,
        "calls": calls + 1,
        "incr_step": p.conflation_step,
        "duration_s": duration,
        "updates_s": (calls + 1) / duration,
        "frames": len(frames),
        "bound": bound,
        "last_frame_exact": exact,
        "final_state": state.to_dict(),
    }


async def phase_naive(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params
    port = free_port()
    errlog = (ctx.logdir / "naive.log").open("ab")
    naive = await LineProc.spawn(
        [
            PY,
            str(BENCH / "naive_relay.py"),
            "--port",
            str(port),
            "--redis-url",
            ctx.redis_url,
            "--secret",
            SECRET,
        ],
        errlog,
    )
    client = async_redis(ctx.redis_url)
    states: dict[str, dict[str, Any]] = {}

    async def publish(batch: str, user: str, total: int | None, add: int) -> None:
        await client.publish(CHANNEL + user, state(batch, user, total, add))

    def state(batch: str, user: str, total: int | None, add: int) -> str:
        now = time.time() * 1000
        s = states.get(batch)
        if s is None or total is not None:
            s = states[batch] = {
                "batch_id": batch,
                "user_id": user,
                "status": "pending",
                "total": total or 0,
                "processed": 0,
                "successful": 0,
                "failed": 0,
                "seq": 0,
                "started_at": now,
                "updated_at": now,
                "label": "bench",
            }
        s["successful"] += add
        s["processed"] += add
        s["seq"] += 1
        s["updated_at"] = now
        if s["processed"] > 0:
            s["status"] = "processing"
        if s["total"] > 0 and s["processed"] >= s["total"]:
            s["status"] = "completed"
        return naive_message(s)

    try:
        await naive.recv()

        async def op(calls: list[Step]) -> None:
            pipe = client.pipeline(transaction=False)
            for u, gen, step in calls:
                batch, user = f"nlat-b{u}-{gen}", f"lat-u{u}"
                message = state(batch, user, LATENCY_STEPS - 1 if step == 0 else None, min(step, 1))
                pipe.publish(CHANNEL + user, message)
            await pipe.execute()

        out: dict[str, Any] = {"latency": await run_latency(ctx, port, naive.proc.pid, op, "naive")}
        log(f"naive latency: {out['latency']['lat_clean']}")

        async def start(b: str, u: str) -> None:
            await publish(b, u, 40, 0)

        async def incr(b: str, u: str) -> None:
            await publish(b, u, None, 1)

        out["reconnect"] = await reconnect_test(port, p.reconnect_users, start, incr, "naive")
    finally:
        naive.proc.terminate()
        await naive.proc.wait()
        errlog.close()
        await client.aclose()
    return out


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


# -- report -----------------------------------------------------------------------------------


def machine(redis_url: str) -> dict[str, Any]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    info: Any = redis.Redis.from_url(redis_url).info("server")
    try:
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        loop = "asyncio"

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": sys.version.split()[0],
        "redis": info.get("redis_version"),
        "redis_py": redis.__version__,
        "websockets": importlib.metadata.version("websockets"),
        "loop": loop,
        "kernel": os.uname().release,
    }


def table(res: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str, str, str]] = []

    def add(name: str, ours: str, limit: str, ratio: str, target: str, met: bool | None) -> None:  # noqa: PLR0917
        rows.append((name, ours, limit, ratio, target, "-" if met is None else str(met).lower()))

    if "ingest" in res:
        i = res["ingest"]
        add(
            f"ingest entries/s ({i['entries']:,} entries, {i['batches']:,} batches, "
            f"{i['users']:,} users)",
            f"{i['relay_entries_s']:,.0f}",
            f"{i['xread_entries_s']:,.0f} (XREAD)",
            f"{i['ratio']:.2f}",
            ">= 0.5",
            i["ratio"] >= 0.5,
        )
        add(
            "  same burst, owners not connected (reader only)",
            f"{i['unwatched_entries_s']:,.0f}",
            f"{i['xread_entries_s']:,.0f} (XREAD)",
            f"{i['unwatched_ratio']:.2f}",
            ">= 0.5",
            i["unwatched_ratio"] >= 0.5,
        )
    for f in res.get("fanout", []):
        add(
            f"fan-out frames/s, {f['clients']:,} clients",
            f"{f['relay']['frames_s']:,.0f}",
            f"{f['bare']['frames_s']:,.0f} (broadcast)",
            f"{f['ratio']:.2f}",
            ">= 0.7",
            f["ratio"] >= 0.7,
        )
    if "latency" in res:
        lat = res["latency"]["lat_clean"]
        add(
            "latency p50/p99/max ms (2,000 upd/s, 1,000 users)",
            f"{lat['p50']:.1f}/{lat['p99']:.1f}/{lat['max']:.1f}",
            "",
            "",
            "p99 <= 20",
            lat["p99"] <= 20,
        )
    if "memory" in res:
        m = res["memory"]
        add(
            f"RSS per idle authenticated conn ({m['connections']:,})",
            f"{m['bytes_per_conn'] / 1024:.1f} KB",
            "",
            "",
            "<= 30 KB",
            m["bytes_per_conn"] <= 30 * 1024,
        )
    if "conflation" in res:
        c = res["conflation"]
        add(
            f"conflation: frames for {c['items']:,} items in {c['duration_s']:.1f} s",
            f"{c['frames']} (exact final: {str(c['last_frame_exact']).lower()})",
            f"bound {c['bound']:.0f}",
            "",
            "<= dur/100ms + 2",
            c["frames"] <= c["bound"] and c["last_frame_exact"],
        )
    if "naive" in res and "latency" in res:
        ours, naive = res["latency"], res["naive"]["latency"]
        ratio = ours["cpu_us_per_delivered"] / naive["cpu_us_per_delivered"]
        add(
            "CPU us per delivered update vs naive pub/sub relay",
            f"{ours['cpu_us_per_delivered']:.1f}",
            f"{naive['cpu_us_per_delivered']:.1f} (naive)",
            f"{ratio:.2f}",
            "<= 0.33",
            ratio <= 1 / 3,
        )
        nl = naive["lat_clean"]
        add(
            "naive relay latency p50/p99/max ms",
            f"{ours['lat_clean']['p99']:.1f} (p99)",
            f"{nl['p50']:.1f}/{nl['p99']:.1f}/{nl['max']:.1f}",
            "",
            "",
            None,
        )
    if "reconnect" in res and "naive" in res:
        ours_rc, naive_rc = res["reconnect"], res["naive"]["reconnect"]
        add(
            f"reconnect mid-batch: final states lost ({ours_rc['clients']} clients)",
            f"{ours_rc['final_state_lost']}",
            f"{naive_rc['final_state_lost']} (naive; "
            f"{naive_rc['updates_never_seen']} updates never seen)",
            "",
            "0",
            ours_rc["final_state_lost"] == 0,
        )
    head = ("measurement", "relay", "limit / baseline", "ratio", "target", "met")
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(6)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(head, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def compact(res: dict[str, Any]) -> dict[str, Any]:
    """The JSON line: drop raw sample lists, round floats."""

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, float):
            return round(v, 3)
        return v

    return walk(res)  # type: ignore[no-any-return]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    params = QUICK if args.quick else FULL
    for item in args.set or ():
        key, _, value = item.partition("=")
        kind = type(getattr(params, key))
        parsed: Any = tuple(int(v) for v in value.split(",")) if kind is tuple else kind(value)
        params = replace(params, **{key: parsed})
    phases = set(args.only.split(",")) if args.only else set(PHASES)
    fd_limit = raise_fd_limit()
    logdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    profile_dir: Path | None = args.profile
    log(f"logs in {logdir}; fd limit {fd_limit}")
    server = RedisServer().start()
    clients = await Clients.start(params.workers, logdir)
    ctx = Ctx(params, server.url, logdir, clients, profile_dir, server._proc.pid)
    res: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "params": asdict(params),
        "machine": machine(server.url),
    }
    t0 = time.perf_counter()
    try:
        if "ingest" in phases:
            log("phase ingest")
            res["ingest"] = await phase_ingest(ctx)
        if phases & {"latency", "conflation"}:
            log("phase latency / conflation / reconnect")
            res.update(await phase_latency_conflation(ctx, phases))
        if "naive" in phases:
            log("phase naive relay")
            res["naive"] = await phase_naive(ctx)
        if "memory" in phases:
            log("phase memory")
            res["memory"] = await phase_memory(ctx)
        if "fanout" in phases:
            res["fanout"] = []
            for size in params.fanout_sizes:
                log(f"phase fan-out {size}")
                res["fanout"].append(await phase_fanout(ctx, size))
    finally:
        await clients.stop()
        server.stop()
    res["secs"] = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--profile", metavar="DIR", help="py-spy record the relay into DIR")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a size (see Params)"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    if args.profile:
        args.profile = Path(args.profile).resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    try:
        uvloop: Any = importlib.import_module("uvloop")
        res: dict[str, Any] = uvloop.run(run(args))
    except ImportError:
        res = asyncio.run(run(args))
    print(table(res))
    print(json.dumps(compact(res), sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
