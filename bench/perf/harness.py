"""The process harness of the benchmark: child processes (Redis, the relay, the baselines, the
WebSocket load), their CPU and memory, and small helpers shared by the phases."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent.parent
BENCH = ROOT / "bench"
for _p in (str(ROOT), str(ROOT / "tests"), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import redis  # noqa: E402
import redis.asyncio  # noqa: E402
from wsload import cpu_seconds  # noqa: E402

from relay.keys import KeySpace  # noqa: E402

SECRET = "bench-secret-for-the-progress-relay-0123456789"
PREFIX = "progress"
PY = sys.executable
_redis_server: Any = importlib.import_module("redis_server")  # tests/redis_server.py
RedisServer: Any = _redis_server.RedisServer
free_port: Callable[[], int] = _redis_server.free_port
KEYS = KeySpace(PREFIX, 1)
STREAM = KEYS.stream(0)


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
    def __init__(
        self,
        redis_url: str,
        logdir: Path,
        min_interval_ms: int,
        name: str,
        cpus: set[int] | None = None,
    ) -> None:
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
        if cpus is not None:  # pinned: before the relay starts any thread
            os.sched_setaffinity(self.pid, cpus)
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
        first_message: bool = False,
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
                        "first_message": first_message,
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
            for key in ("lat_all", "lat_clean", "lat_edge", "lat_build", "lat_t"):
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
