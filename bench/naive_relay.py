"""The baseline for bench/run.py: the progress relay people write by hand.

    python bench/naive_relay.py --port P --redis-url URL --secret S [--path /ws]

- Workers PUBLISH every update, as one JSON message, on the owner's channel `naive:user:<id>`
  (see `naive_message` below; bench/run.py is the worker).
- The relay verifies the JWT from `?token=` (or a first {"type": "auth"} message), SUBSCRIBEs
  the user's channel on one shared pub/sub connection, and its listener, for every message,
  parses it, builds the browser's batch_progress frame and awaits a send to each of the user's
  sockets in turn.
- No stream, no snapshot, no throttling: what is published while a client is away is gone.
Prints {"ready": true} on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import redis.asyncio
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

CHANNEL = "naive:user:"


def naive_message(state: dict[str, Any]) -> str:
    """What the hand-written worker publishes for every update."""
    return json.dumps(state)


def iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


async def main(port: int, path: str, redis_url: str, secret: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe("naive:control")  # listen() needs at least one subscription
    sockets: dict[str, set[ServerConnection]] = {}

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        query = parse_qs(urlsplit(ws.request.path).query)
        try:
            # `?token=`, or first-message auth: {"type": "auth", "token": ...}
            token = query["token"][0] if "token" in query else json.loads(await ws.recv())["token"]
            claims = jwt.decode(token, secret, algorithms=["HS256"])
        except (KeyError, TypeError, ValueError, jwt.InvalidTokenError):
            await ws.close(4003, "invalid token")
            return
        user = str(claims["sub"])
        await ws.send(json.dumps({"action": "auth_success", "user_id": user}))
        conns = sockets.setdefault(user, set())
        if not conns:
            await pubsub.subscribe(CHANNEL + user)
        conns.add(ws)
        try:
            await ws.wait_closed()
        finally:
            conns.discard(ws)
            if not conns:
                del sockets[user]
                await pubsub.unsubscribe(CHANNEL + user)

    async def listener() -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            user = message["channel"].decode()[len(CHANNEL) :]
            state = json.loads(message["data"])
            total, processed = state["total"], state["processed"]
            pct = 100.0 if state["status"] == "completed" else 0.0
            if total > 0 and state["status"] != "completed":
                pct = round(min(100.0, 100.0 * processed / total), 2)
            frame = json.dumps(
                {
                    "action": "batch_progress",
                    "payload": {
                        **state,
                        "progress_percentage": pct,
                        "updated_at": iso(state["updated_at"]),
                        "rate": None,
                        "eta_seconds": None,
                    },
                    "timestamp": iso(datetime.now(UTC).timestamp() * 1000),
                }
            )
            for ws in list(sockets.get(user, ())):
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(frame)

    async with serve(
        handler, "127.0.0.1", port, ping_interval=None, compression=None, backlog=1024
    ):
        task = asyncio.create_task(listener())
        print(json.dumps({"ready": True}), flush=True)
        await task


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/ws")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    coro = main(args.port, args.path, args.redis_url, args.secret)
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)
