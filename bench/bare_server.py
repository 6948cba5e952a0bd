"""The fan-out limit for bench/run.py: bare `websockets.broadcast` of one pre-encoded frame.

    python bench/bare_server.py --port P [--path /ws]

No auth, no Redis, no per-connection state: every open connection gets the same frame as
fast as the event loop can write it. Like the relay's conflation, a connection whose transport
already holds more than 64 KiB is skipped for that round (plain broadcast would buffer without
bound). Driven over stdin, one JSON command per line, each answered with one JSON line:
  {"cmd": "count"}                    open connections
  {"cmd": "blast", "seconds": S, "frame": TEXT}   broadcast TEXT for S seconds
  {"cmd": "exit"}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve

SKIP_ABOVE_BYTES = 64 * 1024


async def main(port: int, path: str) -> None:
    conns: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        if ws.request is not None and not ws.request.path.startswith(path):
            return
        conns.add(ws)
        try:
            await ws.wait_closed()
        finally:
            conns.discard(ws)

    async def blast(seconds: float, frame: str) -> dict[str, Any]:
        message = frame.encode()
        end = time.monotonic() + seconds
        rounds = 0
        sent = 0
        while time.monotonic() < end:
            ready = [
                c
                for c in conns
                if c.transport is not None
                and c.transport.get_write_buffer_size() <= SKIP_ABOVE_BYTES
            ]
            broadcast(ready, message, text=True)
            rounds += 1
            sent += len(ready)
            await asyncio.sleep(0)
        return {"rounds": rounds, "sent": sent}

    async with serve(
        handler,
        "127.0.0.1",
        port,
        max_queue=16,
        ping_interval=None,
        compression=None,
        backlog=1024,
    ):
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = await reader.readline()
            if not line:
                return
            cmd: dict[str, Any] = json.loads(line)
            reply: dict[str, Any]
            if cmd["cmd"] == "count":
                reply = {"open": len(conns)}
            elif cmd["cmd"] == "blast":
                reply = await blast(float(cmd["seconds"]), str(cmd["frame"]))
            else:
                return
            print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/ws")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.port, args.path))
    except ImportError:
        asyncio.run(main(args.port, args.path))
