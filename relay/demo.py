"""`relay demo`: Redis (embedded if none answers), the relay, simulated workers and a live page,
all in one process on one port. Nothing here is reachable from `relay serve`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import sys
import uuid
from contextlib import AsyncExitStack
from importlib import resources
from typing import Final
from urllib.parse import parse_qs

import redis
from msgspec.structs import replace
from websockets.http11 import Request

from relay.auth import mint_token
from relay.config import HMAC_ALGORITHMS, AuthConfig, Config, load_config
from relay.emitter import AsyncEmitter
from relay.errors import RelayError
from relay.logs import configure
from relay.redis_client import async_client
from relay.server import Relay, Route, RouteReply

USERS: Final = ("alice", "bob", "carol")
SIZES: Final = (20, 50, 120, 300, 800, 2000)
KINDS: Final = ("Photo upload", "Video transcode", "CSV import", "Thumbnail render", "Backup")
FAIL_RATE: Final = 0.05
LANES_PER_USER: Final = 2  # batches a user has running at the same time
TICK_S: Final = 0.2
TOKEN_TTL_S: Final = 300
PING_TIMEOUT_S: Final = 1.0
WORKERS_STOP_S: Final = 5.0


def run_demo(args: argparse.Namespace) -> int:
    cfg = load_config(args.config or os.environ.get("RELAY_CONFIG") or None)
    configure("warning", cfg.log.format)  # keep the terminal for the URL and the status line
    try:
        return asyncio.run(_main(cfg, args.port, config_secret=args.config_secret))
    except RelayError as e:
        print(f"relay demo: {e}", file=sys.stderr)
        return 1


async def _main(cfg: Config, port: int, *, config_secret: bool = False) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        redis_note = f"redis: {cfg.redis.url}"
        if not await _answers_ping(cfg):
            from relay.embedded import EmbeddedRedis  # noqa: PLC0415

            embedded = await stack.enter_async_context(EmbeddedRedis())
            cfg = replace(cfg, redis=replace(cfg.redis, url=embedded.url, cluster=False))
            redis_note = f"redis: embedded at {embedded.url} (pid {embedded.pid})"
        cfg = _demo_config(cfg, port, config_secret=config_secret)
        relay = Relay(cfg, routes=_routes(cfg))
        try:
            await relay.start()
        except OSError as e:
            msg = f"cannot listen on 127.0.0.1:{port}: {e.strerror} (try --port 0)"
            raise RelayError(msg) from e
        stack.push_async_callback(relay.shutdown)
        client = async_client(cfg.redis)
        stack.push_async_callback(client.aclose)
        emitter = AsyncEmitter(
            client,
            prefix=cfg.redis.prefix,
            shards=cfg.redis.shards,
            active_s=cfg.retention.active_s,
            finished_s=cfg.retention.finished_s,
        )
        workers = asyncio.create_task(_simulate(emitter, stop))
        print(f"relay demo: open http://127.0.0.1:{relay.port}/", flush=True)
        print(
            f"relay demo: running on port {relay.port}; {redis_note}; key prefix "
            f"{cfg.redis.prefix}; users {', '.join(USERS)}; Ctrl-C to stop",
            flush=True,
        )
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({workers, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not stop.is_set():  # the workers only end on their own on an error (Redis went away)
            error = workers.exception()
            while isinstance(error, BaseExceptionGroup):
                error = error.exceptions[0]
            print(f"relay demo: workers stopped: {error!r}", file=sys.stderr)
            return 1
        print("relay demo: stopping", flush=True)
        workers.cancel()
        await asyncio.wait({workers}, timeout=WORKERS_STOP_S)
    return 0


async def _answers_ping(cfg: Config) -> bool:
    client = async_client(cfg.redis, socket_timeout=PING_TIMEOUT_S)
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            return bool(await client.ping())
    except (redis.RedisError, OSError, TimeoutError):
        return False
    finally:
        with contextlib.suppress(redis.RedisError, OSError):
            await client.aclose()


def _demo_config(cfg: Config, port: int, *, config_secret: bool = False) -> Config:
    """Private key prefix, local-only listener, short retention, and its own random secret:
    the demo page hands tokens to anyone on localhost, so it never signs with a configured
    (perhaps production) secret unless asked to (`relay demo --config-secret`)."""
    auth = cfg.auth
    if not (config_secret and set(auth.algorithms) & HMAC_ALGORITHMS and auth.secret):
        auth = AuthConfig(secret=secrets.token_urlsafe(32))
    return replace(
        cfg,
        redis=replace(cfg.redis, prefix=f"demo-{secrets.token_hex(4)}"),
        server=replace(cfg.server, host="127.0.0.1", port=port, allowed_origins=[]),
        auth=auth,
        retention=replace(cfg.retention, active_s=3600, finished_s=600),
    )


def _routes(cfg: Config) -> dict[str, Route]:
    static = resources.files("relay") / "static"
    page = (static / "demo.html").read_text("utf-8").replace("__WS_PATH__", cfg.server.path)
    script = (static / "client.js").read_bytes()

    def token(request: Request) -> RouteReply:
        user = parse_qs(request.path.partition("?")[2]).get("user", [""])[0]
        if user not in USERS:
            body = {"error": f"user must be one of {', '.join(USERS)}"}
            return 400, "application/json", json.dumps(body).encode()
        reply = {"token": _mint(cfg.auth, user), "user": user, "expires_in": TOKEN_TTL_S}
        return 200, "application/json", json.dumps(reply).encode()

    return {
        "/": lambda _r: (200, "text/html; charset=utf-8", page.encode()),
        "/client.js": lambda _r: (200, "text/javascript; charset=utf-8", script),
        "/demo/token": token,
    }


def _mint(auth: AuthConfig, user: str) -> str:
    """A token the configured verifier accepts (same claims as `relay token`)."""
    extra: dict[str, object] = dict(auth.required_claims)
    if auth.audience:
        extra["aud"] = auth.audience
    if auth.issuer:
        extra["iss"] = auth.issuer
    if auth.user_claim != "sub":
        extra[auth.user_claim] = user
    algorithm = next(a for a in auth.algorithms if a in HMAC_ALGORITHMS)
    return mint_token(auth.secret, user, ttl_s=TOKEN_TTL_S, algorithm=algorithm, extra=extra)


# -- simulated workers ------------------------------------------------------------------------


async def _simulate(emitter: AsyncEmitter, stopping: asyncio.Event) -> None:
    """Every user runs LANES_PER_USER batches at a time, a new one starting when one ends.

    The loops also watch `stopping`: a cancellation that lands inside a Redis call can be
    swallowed by the client library, and shutdown must not depend on it.
    """
    sim = _Simulation(emitter, stopping)
    async with asyncio.TaskGroup() as group:
        for user in USERS:
            for lane in range(LANES_PER_USER):
                # bob's second lane cancels its first batch midway, so a cancel shows early
                group.create_task(sim.lane(user, first_cancel=user == "bob" and lane == 1))


class _Simulation:
    def __init__(self, emitter: AsyncEmitter, stopping: asyncio.Event) -> None:
        self.emitter = emitter
        self.stopping = stopping
        self.rng = random.Random()

    async def lane(self, user: str, *, first_cancel: bool) -> None:
        await asyncio.sleep(self.rng.uniform(0, 3))  # stagger the starts
        number = 0
        while not self.stopping.is_set():
            number += 1
            cancel = (first_cancel and number == 1) or self.rng.random() < 0.05
            await self.batch(user, cancel=cancel)
            await asyncio.sleep(self.rng.uniform(1, 4))

    async def batch(self, user: str, *, cancel: bool) -> None:
        """One batch through the real SDK: start, items (~5% fail), auto-complete or cancel."""
        emitter, rng = self.emitter, self.rng
        batch_id = str(uuid.uuid4())
        total = rng.choice(SIZES)
        await emitter.start(batch_id, user, total, label=f"{rng.choice(KINDS)} · {total:,} files")
        await asyncio.sleep(rng.uniform(0.5, 2))  # a moment in `pending`
        rate = total / rng.uniform(8, 40)  # items per second: 8 s to 40 s per batch
        stop_at = int(total * rng.uniform(0.3, 0.7)) if cancel else total
        loop = asyncio.get_running_loop()
        started, done = loop.time(), 0
        while done < stop_at:
            await asyncio.sleep(TICK_S * rng.uniform(0.2, 2.5))  # uneven speed
            target = min(stop_at, int(rate * (loop.time() - started)))
            for index in range(done, target):
                if self.stopping.is_set():
                    return
                await emitter.item(batch_id, user, f"item-{index}", ok=rng.random() >= FAIL_RATE)
            done = max(done, target)
        if cancel:
            await emitter.finish(batch_id, user, "cancelled")
