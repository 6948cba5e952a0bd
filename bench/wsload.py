"""A WebSocket load process for bench/run.py: many raw-socket clients that count frames.

    python bench/wsload.py        (driven by bench/run.py over stdin/stdout, one JSON per line)

The clients are plain asyncio Protocols (uvloop when installed) that speak just enough of
RFC 6455 to do the handshake (`?token=` in the URL) and walk the server's unmasked frames: a
frame costs a few bytecodes here, so the load side stays far below the server it measures.
In `parse` mode each batch_progress frame is decoded and its emit-to-receive latency recorded
(receive wall time minus the frame's `updated_at`, which is Redis TIME on this machine).

Commands (JSON objects on stdin; each answered with one JSON line on stdout):
  {"cmd": "connect", "host", "port", "path", "users": [...], "secret": S | null,
   "concurrency": C, "parse": bool, "min_interval_ms": F, "first_message": bool}
      (first_message: the token goes in a first {"type": "auth"} frame instead of `?token=`;
      every client answers the server's {"action": "ping"} with a pong)
  {"cmd": "record"}                  reset latency samples and start recording
  {"cmd": "stats", "latency": bool}  counters (+ latency samples and receive times when asked)
  {"cmd": "finals"}                  the last (processed, status) seen per batch_id
  {"cmd": "close"}                   abort every connection (RST, no TIME_WAIT)
  {"cmd": "exit"}
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import struct
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import msgspec  # noqa: E402

from relay.auth import mint_token  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
LINGER_RST = struct.pack("ii", 1, 0)
_decode = msgspec.json.Decoder().decode
TERMINAL = frozenset({"completed", "failed", "cancelled"})
MASK = b"\x00\x00\x00\x00"  # client frames must be masked; a zero key leaves the text as is
PING = b'"action":"ping"'
PONG = b'{"action":"pong"}'


def client_frame(text: bytes) -> bytes:
    """A masked text frame (client to server), payloads < 64 KiB."""
    n = len(text)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0xFE]) + n.to_bytes(2, "big")
    return head + MASK + text


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def iso_to_ms(text: str) -> float:
    return datetime.fromisoformat(text).timestamp() * 1000.0


class Load:
    def __init__(self) -> None:
        self.conns: list[Client] = []
        self.frames = 0
        self.bytes = 0
        self.opened = 0
        self.closed_by_server = 0
        self.parse = False
        self.recording = False
        self.min_interval_ms = 100.0
        self.lat_all: list[float] = []
        self.lat_clean: list[float] = []  # not possibly held back by throttling
        self.lat_edge: list[float] = []  # first (seq 1) and terminal frames only
        self.lat_build: list[float] = []  # updated_at -> the frame's timestamp (built)
        self.lat_t: list[float] = []  # receive wall time (ms) of each lat_all sample
        self.pongs = 0
        self.last: dict[str, dict[str, Any]] = {}  # batch_id -> last payload seen

    def on_text(self, client: Client, data: bytes) -> None:
        if b'"batch_progress"' not in data:
            return
        now = time.time() * 1000.0
        frame = _decode(data)
        payload: dict[str, Any] = frame["payload"]
        batch_id: str = payload["batch_id"]
        self.last[batch_id] = payload
        prev = client.seen.get(batch_id)
        client.seen[batch_id] = now
        if not self.recording:
            return
        lat = now - iso_to_ms(payload["updated_at"])
        self.lat_all.append(lat)
        self.lat_t.append(now)
        self.lat_build.append(iso_to_ms(frame["timestamp"]) - iso_to_ms(payload["updated_at"]))
        if prev is None or now - prev >= self.min_interval_ms:
            self.lat_clean.append(lat)
        if payload["seq"] == 1 or payload["status"] in TERMINAL:
            self.lat_edge.append(lat)


class Client(asyncio.Protocol):
    __slots__ = ("auth", "buf", "load", "open", "request", "seen", "transport", "upgraded")

    def __init__(
        self, load: Load, request: bytes, upgraded: asyncio.Future[bool], auth: bytes = b""
    ) -> None:
        self.load = load
        self.request = request
        self.auth = auth  # a first-message auth frame to send once upgraded
        self.upgraded = upgraded
        self.open = False
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.seen: dict[str, float] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_result(False)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        load = self.load
        load.bytes += len(data)
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            ok = data.startswith(b"HTTP/1.1 101")
            if not self.upgraded.done():
                self.upgraded.set_result(ok)
            if not ok:
                if self.transport is not None:
                    self.transport.abort()
                return
            self.open = True
            if self.auth and self.transport is not None:
                self.transport.write(self.auth)
            data = data[end + 4 :]
        n = len(data)
        i = 0
        parse = load.parse
        while i + 2 <= n:
            b1 = data[i + 1] & 0x7F
            if b1 < 126:
                start = i + 2
                length = b1
            elif b1 == 126:
                if i + 4 > n:
                    break
                start = i + 4
                length = int.from_bytes(data[i + 2 : i + 4], "big")
            else:
                if i + 10 > n:
                    break
                start = i + 10
                length = int.from_bytes(data[i + 2 : i + 10], "big")
            end = start + length
            if end > n:
                break
            opcode = data[i] & 0x0F
            if opcode == 1 or opcode == 2:  # noqa: PLR1714 - two int compares beat a tuple
                load.frames += 1
                if parse:
                    load.on_text(self, data[start:end])
                if length < 40 and PING in data[start:end] and self.transport is not None:
                    self.transport.write(client_frame(PONG))
                    load.pongs += 1
            elif opcode == 8:
                load.closed_by_server += 1
                if self.transport is not None:
                    self.transport.abort()
                return
            i = end
        if i < n:
            self.buf = data[i:]


async def connect(load: Load, cmd: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host: str = cmd["host"]
    port: int = cmd["port"]
    path: str = cmd["path"]
    secret: str | None = cmd.get("secret")
    load.parse = bool(cmd.get("parse", False))
    load.min_interval_ms = float(cmd.get("min_interval_ms", 100))
    first_message = bool(cmd.get("first_message", False))
    sem = asyncio.Semaphore(int(cmd.get("concurrency", 50)))
    failed = 0
    t0 = time.perf_counter()

    async def one(user: str) -> None:
        nonlocal failed
        token = mint_token(secret, user, ttl_s=7200) if secret else ""
        query = f"?token={token}" if secret and not first_message else ""
        auth = b""
        if secret and first_message:
            auth = client_frame(json.dumps({"type": "auth", "token": token}).encode())
        request = (
            f"GET {path}{query} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        async with sem:
            for attempt in range(5):
                upgraded: asyncio.Future[bool] = loop.create_future()
                try:
                    _, client = await loop.create_connection(
                        functools.partial(Client, load, request, upgraded, auth), host, port
                    )
                    async with asyncio.timeout(20):
                        ok = await upgraded
                except (OSError, TimeoutError):
                    ok = False
                    client = None
                if ok and client is not None:
                    load.conns.append(client)
                    load.opened += 1
                    return
                if client is not None and client.transport is not None:
                    client.transport.abort()
                await asyncio.sleep(0.05 * (attempt + 1))
            failed += 1

    await asyncio.gather(*(one(u) for u in cmd["users"]))
    return {"opened": load.opened, "failed": failed, "secs": time.perf_counter() - t0}


def stats(load: Load, with_latency: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "frames": load.frames,
        "bytes": load.bytes,
        "cpu": cpu_seconds(),
        "t": time.time(),
        "open": sum(1 for c in load.conns if c.transport is not None),
        "closed_by_server": load.closed_by_server,
        "pongs": load.pongs,
    }
    if with_latency:
        out["lat_t"] = load.lat_t
        out["lat_all"] = load.lat_all
        out["lat_clean"] = load.lat_clean
        out["lat_edge"] = load.lat_edge
        out["lat_build"] = load.lat_build
    return out


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    load = Load()
    while True:
        line = await reader.readline()
        if not line:
            return
        cmd: dict[str, Any] = json.loads(line)
        name = cmd["cmd"]
        reply: dict[str, Any]
        if name == "connect":
            reply = await connect(load, cmd)
        elif name == "record":
            load.lat_all, load.lat_clean, load.lat_edge, load.lat_build = [], [], [], []
            load.lat_t = []
            load.recording = True
            reply = {"ok": True}
        elif name == "stats":
            reply = stats(load, bool(cmd.get("latency")))
        elif name == "close":
            for c in load.conns:
                if c.transport is not None:
                    c.transport.abort()
            load.conns.clear()
            await asyncio.sleep(0.1)
            reply = {"ok": True}
        elif name == "finals":
            reply = {b: [p["processed"], p["status"]] for b, p in load.last.items()}
        elif name == "exit":
            return
        else:
            reply = {"error": f"unknown command {name}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
