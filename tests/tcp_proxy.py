"""A small TCP proxy for tests that misbehaves like cloud load balancers and NATs do.

Each connection that sees no bytes in either direction for `idle_s` is, by `mode`:
- "close": closed on both sides (a load balancer's idle timeout),
- "drop": silently black-holed: what either side sends is read and discarded, nothing is
  forwarded and nothing is closed (a NAT that forgot the mapping).
New connections always work. `idled` counts the connections that idled out. `retarget` moves
the proxy to another server, closing every current connection. `hold()` ... `release()` is a
network black hole that heals: nothing is forwarded meanwhile (new connections included) and
nothing is lost or closed; afterwards what waited flows on, as TCP retransmission would have it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Coroutine
from typing import Any, Literal, Self

Mode = Literal["close", "drop"]


class _Link:
    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client, self.server = client, server
        self.last = asyncio.get_running_loop().time()
        self.dead = False  # black-holed


class TcpProxy:
    def __init__(self, target_port: int, *, idle_s: float = math.inf, mode: Mode = "close") -> None:
        self.target_port = target_port
        self.idle_s = idle_s
        self.mode = mode
        self.port = 0
        self.idled = 0
        self.connections = 0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def hold(self) -> None:
        """Black-hole every connection, current and new, until release()."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._spawn(self._sweep())
        return self

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        await asyncio.gather(
            self._pipe(link, reader, up_writer), self._pipe(link, up_reader, writer)
        )
        self._links.discard(link)

    async def _pipe(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(65536):
                if link.dead:
                    continue
                await self._flowing.wait()  # held: the peers' data waits (backpressure)
                link.last = loop.time()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not link.dead:
                writer.close()

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.05)
            now = loop.time()
            for link in list(self._links):
                if link.dead or now - link.last < self.idle_s:
                    continue
                self.idled += 1
                if self.mode == "close":
                    link.client.close()
                    link.server.close()
                else:
                    link.dead = True

    def retarget(self, target_port: int) -> None:
        """Send new connections to `target_port` and close the current ones (what a failover
        behind a fixed address, e.g. a virtual IP, looks like to clients)."""
        self.target_port = target_port
        for link in list(self._links):
            link.client.close()
            link.server.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self._links:
            link.client.close()
            link.server.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._handlers:  # closed links end their handlers
            await asyncio.wait(list(self._handlers), timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
