"""The relay process: HTTP routes and WebSocket accept, the reader, the sweeper, shutdown.

relay = Relay(config)        # Relay(config, routes={"/": handler}) adds extra HTTP GET routes
await relay.start()          # binds (port 0 picks a free port: relay.port)
await relay.serve_forever()  # until relay.shutdown() (SIGTERM/SIGINT in `relay serve`)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping
from http import HTTPStatus
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qs

import redis
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from relay.acl import missing_relay_commands
from relay.auth import Claims, TokenVerifier
from relay.config import Config
from relay.core.fanout import FanOut
from relay.errors import AuthFailed, describe, error_fields
from relay.keys import KeySpace
from relay.metrics import CONTENT_TYPE, Metrics
from relay.pacer import Pacer, now_ms
from relay.reader import BLOCK_MS, StreamReader
from relay.redis_client import REDIS_ERRORS, AsyncClient, async_client, denied, read_twice
from relay.session import (
    AUTH_MESSAGE_MAX_BYTES,
    SERVICE_RESTART,
    TOO_SLOW,
    TRY_AGAIN_LATER,
    Session,
)
from relay.snapshot import read_snapshot
from relay.wire import PING_TEXT, BatchState

log = structlog.get_logger("relay.server")

SWEEP_EVERY_S: Final = 0.25
STARTUP_POSITION_TIMEOUT_S: Final = 3.0
PRUNE_EVERY_S: Final = 60.0
PRUNE_IDLE_MS: Final = 600_000.0  # batches quiet for 10 min leave per-connection memory
READY_PING_TIMEOUT_S: Final = 1.0
# A snapshot's first try on a pooled connection; a dead one is then replaced and tried again.
SNAPSHOT_FIRST_TRY_S: Final = 2.0
READY_ERRORS: Final[tuple[type[Exception], ...]] = (*REDIS_ERRORS, TimeoutError)
RESYNC_ATTEMPTS: Final = 5

# An extra HTTP route (e.g. the demo page): a websockets Response, or (status, content_type, body).
RouteReply: TypeAlias = Response | tuple[int, str, bytes]
Route: TypeAlias = Callable[[Request], RouteReply]


class Relay:
    def __init__(self, config: Config, *, routes: Mapping[str, Route] | None = None) -> None:
        self.config = config
        self.routes: dict[str, Route] = dict(routes or {})
        self.metrics = Metrics()
        self.fanout = FanOut()
        self.pacer = Pacer()  # the one timer of every connection's throttle
        self.verifier = TokenVerifier.from_config(
            config.auth, on_jwks_fetch=self.metrics.jwks_fetched
        )
        self.keys = KeySpace(config.redis.prefix, config.redis.shards)
        self._redis: AsyncClient = async_client(config.redis)
        self._reader_redis: AsyncClient = async_client(
            config.redis, socket_timeout=BLOCK_MS / 1000 + 10, retries=False
        )
        self.reader = StreamReader(
            self._reader_redis,
            self.keys,
            self._on_state,
            self.metrics,
            on_gap=self._on_gap,
            watching=self.fanout.watches,
        )
        self.sessions: set[Session] = set()
        self._authenticated = 0
        # Claims of a handshake-authenticated upgrade, until its handler picks them up; weak, so
        # an upgrade that websockets refuses after process_request leaves nothing behind.
        self._handshake_claims: weakref.WeakKeyDictionary[ServerConnection, Claims] = (
            weakref.WeakKeyDictionary()
        )
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._denied: list[str] = []  # commands Redis refused us (ACL), until they pass again
        self._stopped = asyncio.Event()
        self.port = 0

    # -- wiring -----------------------------------------------------------------------------------

    def _on_state(self, state: BatchState) -> None:
        self.fanout.publish(state, now_ms(), time.time() * 1000)

    def _on_gap(self, shard: int, reset: bool) -> None:
        """The stream lost entries we had not read: re-read every connected user's batches from
        their hashes. After a reset (Redis lost its data, batches restart at seq 1) accept any
        seq again first; after a trim seqs go on, and keeping them keeps frames from going back."""
        if reset:
            self.fanout.forget_seqs()
        self.spawn(self._resync())

    async def read_snapshot(self, user_id: str) -> list[BatchState]:
        """The user's live batches, most recently updated first, at most snapshot_max_batches."""
        return await read_twice(  # once more on a fresh connection if the pooled one is dead
            self._redis,
            lambda: read_snapshot(
                self._redis,
                self.keys,
                user_id,
                limit=self.config.fanout.snapshot_max_batches,
                now_ms=int(time.time() * 1000),
            ),
            first_timeout_s=SNAPSHOT_FIRST_TRY_S,
        )

    async def _resync(self) -> None:
        users = self.fanout.user_ids()
        for attempt in range(RESYNC_ATTEMPTS):
            failed: list[str] = []
            for user_id in users:
                try:
                    states = await self.read_snapshot(user_id)
                except REDIS_ERRORS as e:
                    self.redis_failed(e)
                    log.warning(
                        "resync_failed", user_id=user_id, attempt=attempt, **error_fields(e)
                    )
                    failed.append(user_id)
                    continue
                for state in states:
                    self._on_state(state)
            if not failed:
                return
            users = failed
            await asyncio.sleep(0.2 * 2**attempt)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background task that is kept referenced until it ends."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def track(self, session: Session, *, authenticated: bool) -> None:
        if authenticated:
            if not session.counted:
                session.counted = True
                self._authenticated += 1
        else:
            self.sessions.add(session)
        self._update_gauges()

    def untrack(self, session: Session) -> None:
        self.sessions.discard(session)
        self._collect(session)
        if session.counted:
            session.counted = False
            self._authenticated -= 1
        self._update_gauges()

    def _collect(self, session: Session) -> None:
        """Move a session's frame counts into the metrics (counted locally: no lock per write)."""
        if session.outbox.merged:
            self.metrics.frames_merged.inc(session.outbox.merged)
            session.outbox.merged = 0
        if session.frames_sent:
            self.metrics.frames_sent.inc(session.frames_sent)
            session.frames_sent = 0

    def _update_gauges(self) -> None:
        self.metrics.connections.labels("authenticated").set(self._authenticated)
        self.metrics.connections.labels("pending").set(len(self.sessions) - self._authenticated)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config.server
        origins: list[str | None] | None = None
        if cfg.allowed_origins:
            origins = [*cfg.allowed_origins, None]  # non-browser clients send no Origin
        # Find the streams' tails before accepting anyone: a client's snapshot and the live
        # entries after it then always meet. With Redis down, start anyway (/readyz says 503).
        self.spawn(self.reader.run())
        if self.verifier.jwks is not None:
            self.spawn(self.verifier.jwks.run())
        self.spawn(self._check_permissions())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STARTUP_POSITION_TIMEOUT_S):
                await self.reader.positioned.wait()
        try:
            self._server = await self._listen(origins)
        except OSError:
            for task in list(self._tasks):
                task.cancel()
            raise
        sockets = list(self._server.sockets)
        self.port = sockets[0].getsockname()[1] if sockets else cfg.port
        self.spawn(self._sweeper())
        self.spawn(self._heartbeat())
        log.info("relay_started", host=cfg.host, port=self.port, path=cfg.path)

    async def _listen(self, origins: list[str | None] | None) -> Server:
        cfg = self.config.server
        return await serve(
            self._handle,
            cfg.host,
            cfg.port,
            process_request=self._process_request,
            origins=origins,  # type: ignore[arg-type]
            # An auth message may carry any token the handshake accepts; the session holds
            # every other client frame to max_message_bytes (1009).
            max_size=max(self.config.fanout.max_message_bytes, AUTH_MESSAGE_MAX_BYTES),
            max_queue=16,
            ping_interval=None,  # the relay sends its own {"action":"ping"}
            close_timeout=2.0,
            open_timeout=cfg.handshake_timeout_s,  # also bounds a slowloris' trickled headers
            compression=None,
            server_header="progress-relay",
        )

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: self.spawn(self.shutdown()))

    async def shutdown(self) -> None:
        """Stop accepting, close every connection with 1012, bounded wait, then abort."""
        if self._stopping.is_set():
            await self._stopped.wait()
            return
        self._stopping.set()
        log.info("relay_stopping", connections=len(self.sessions))
        loop = asyncio.get_running_loop()
        timeout = self.config.lifecycle.shutdown_timeout_s
        deadline = loop.time() + timeout  # one budget for the whole shutdown
        if self._server is not None:
            self._server.close(close_connections=False)
        sessions = list(self.sessions)
        if sessions:
            closing = [
                asyncio.create_task(s.close(SERVICE_RESTART, "server restarting")) for s in sessions
            ]
            _done, pending = await asyncio.wait(closing, timeout=timeout)
            for s in sessions:
                if s.ws.transport is not None and not s.ws.transport.is_closing():
                    s.ws.transport.abort()
            for task in pending:
                task.cancel()
        if self._server is not None:
            try:
                async with asyncio.timeout_at(max(loop.time() + 0.1, deadline)):
                    await self._server.wait_closed()
            except TimeoutError:
                log.warning("handlers_still_running_at_shutdown")
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await self._redis.aclose()
        await self._reader_redis.aclose()
        self.pacer.close()
        log.info("relay_stopped")
        self._stopped.set()

    # -- HTTP and handshake -----------------------------------------------------------------------

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        if path == "/healthz":
            return conn.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            ready, reason = await self.readiness()
            body = json.dumps({"ready": ready, "reason": reason}) + "\n"
            return _response(
                conn,
                HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                body,
                "application/json",
            )
        if path == "/metrics":
            await self.readiness()  # sets relay_ready for this scrape
            return _response(conn, HTTPStatus.OK, self.metrics.render().decode(), CONTENT_TYPE)
        if path != self.config.server.path:
            route = self.routes.get(path)
            if route is None:
                return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")
            return _route_response(conn, route(request))
        if self._stopping.is_set():
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        if not self.reader.positioned.is_set():
            # Until the reader knows where the streams end, a snapshot could miss the entries
            # written between its read and the reader's start: serve nobody yet.
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "not ready: waiting for Redis\n")
        server_cfg = self.config.server
        if len(self.sessions) >= server_cfg.max_connections:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        if len(self.sessions) - self._authenticated >= server_cfg.max_unauthenticated:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        if len(request.headers.get_all("Authorization")) > 1:
            self.metrics.auth_failed("malformed")
            return conn.respond(HTTPStatus.UNAUTHORIZED, "more than one Authorization header\n")
        token = _handshake_token(request.headers, query)
        if token is not None:
            try:
                self._handshake_claims[conn] = await self.verifier.verify_async(token)
            except AuthFailed as e:
                self.metrics.auth_failed(e.reason)
                status = (
                    HTTPStatus.SERVICE_UNAVAILABLE  # no JWKS keys yet: the token may be fine
                    if e.code == TRY_AGAIN_LATER
                    else HTTPStatus.UNAUTHORIZED
                )
                return conn.respond(status, f"{e.message}\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        claims = self._handshake_claims.pop(ws, None)
        self.metrics.connections_total.inc()
        session = Session(self, ws, claims)
        if self._stopping.is_set():
            await session.close(SERVICE_RESTART, "server restarting")
            return
        await session.run()

    async def readiness(self) -> tuple[bool, str]:
        ready, reason = await self._readiness()
        self.metrics.ready.set(1 if ready else 0)
        return ready, reason

    async def _readiness(self) -> tuple[bool, str]:
        if self._stopping.is_set():
            return False, "shutting down"
        try:
            async with asyncio.timeout(READY_PING_TIMEOUT_S):
                await read_twice(
                    self._redis, self._redis.ping, first_timeout_s=READY_PING_TIMEOUT_S / 2
                )
                if self._denied:  # a refused command was seen: is it still refused?
                    self._denied = await missing_relay_commands(self._redis, self.keys)
        except redis.exceptions.NoPermissionError as e:
            return False, f"redis permission denied: {denied(e)}"
        except READY_ERRORS as e:
            return False, f"redis unreachable: {describe(e)}"
        if self._denied:
            return False, f"redis permission denied: {', '.join(self._denied)}"
        if not self.reader.healthy:
            return False, self.reader.problem or "stream reader is not running"
        if self.verifier.jwks is not None and not self.verifier.jwks.loaded:
            return False, "no JWKS key set loaded yet"
        return True, "ok"

    def redis_failed(self, e: Exception) -> None:
        """A snapshot or resync failed: remember a refused command for /readyz."""
        if isinstance(e, redis.exceptions.NoPermissionError):
            what = denied(e)
            if what not in self._denied:
                self._denied = [*self._denied, what]

    async def _check_permissions(self) -> None:
        """At start: say at once (log, /readyz) when the Redis user may not run a command the
        relay needs, instead of when the first client's snapshot fails."""
        try:
            missing = await missing_relay_commands(self._redis, self.keys)
        except REDIS_ERRORS:
            return  # unreachable: /readyz says so; the reader keeps trying
        if missing:
            log.error("redis_permission_denied", missing=missing)
            self._denied = missing

    # -- periodic work ----------------------------------------------------------------------------

    async def _sweeper(self) -> None:
        """Close slow consumers (4008), publish conflation counts and event-loop lag."""
        loop = asyncio.get_running_loop()
        fanout_cfg = self.config.fanout
        expected = loop.time() + SWEEP_EVERY_S
        next_prune = loop.time() + PRUNE_EVERY_S
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            now = loop.time()
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY_S
                self.fanout.prune(now * 1000, time.time() * 1000, PRUNE_IDLE_MS)
            self.metrics.loop_lag.set(max(0.0, now - expected))
            expected = now + SWEEP_EVERY_S
            write_timeout_ms = fanout_cfg.write_timeout_s * 1000
            max_buffer = fanout_cfg.max_buffer_bytes
            for s in list(self.sessions):
                if s.frames_sent or s.outbox.merged:
                    self._collect(s)
                if s.closing or s.user_id is None:
                    continue
                # The socket's buffer only fills in Session._flush, which notes when it stops
                # being empty (waiting_since): a session with nothing waiting there can only be
                # over the limit through its outbox (no call into the transport per session).
                if s.waiting_since is None and s.outbox.pending_bytes <= max_buffer:
                    continue
                stuck = s.waiting_ms(now * 1000) > write_timeout_ms
                if stuck or s.unsent_bytes() > max_buffer:
                    self.metrics.slow_disconnects.inc()
                    log.info("slow_consumer", conn_id=s.id, user_id=s.user_id, stuck=stuck)
                    self.spawn(s.close(TOO_SLOW, "too slow"))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.config.fanout.heartbeat_s)
            for s in list(self.sessions):
                if s.user_id is not None and not s.closing:
                    s.outbox.control(PING_TEXT)
                    s.wake()


def _handshake_token(headers: Headers, query: str) -> str | None:
    given = headers.get_all("Authorization")  # headers.get() raises on duplicates
    auth = given[0] if given else None
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return auth  # not a bearer token: verify() refuses it with a clear reason
    values = parse_qs(query).get("token")
    return values[0] if values else None


def _response(conn: ServerConnection, status: HTTPStatus, body: str, content_type: str) -> Response:
    response = conn.respond(status, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    return response


def _route_response(conn: ServerConnection, reply: RouteReply) -> Response:
    if isinstance(reply, Response):
        return reply
    status, content_type, body = reply
    response = _response(conn, HTTPStatus(status), "", content_type)
    del response.headers["Content-Length"]
    response.headers["Content-Length"] = str(len(body))
    response.body = body
    return response
