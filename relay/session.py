"""One WebSocket connection's life: auth, snapshot, live frames, token expiry, close.

The decisions (what is due, in which order) live in relay.core; this module is the I/O glue
that moves frames between a websockets connection and its Outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import TYPE_CHECKING, Final

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from relay.auth import Claims
from relay.core.delivery import Outbox
from relay.core.ratelimit import MessageBucket
from relay.errors import AuthFailed
from relay.redis_client import REDIS_ERRORS
from relay.wire import (
    PONG_TEXT,
    AuthError,
    AuthSuccess,
    BadClientFrame,
    ClientAuth,
    ClientPing,
    encode,
    parse_client_frame,
)

if TYPE_CHECKING:
    from relay.server import Relay

log = structlog.get_logger("relay.session")

# Close codes (docs/PROTOCOL.md).
AUTH_TIMEOUT: Final = 4001
NOT_AUTH_MESSAGE: Final = 4002
INVALID_TOKEN: Final = 4003
BAD_FORMAT: Final = 4004
TOKEN_EXPIRED: Final = 4005
TOO_SLOW: Final = 4008
TOO_MANY_FOR_USER: Final = 4029
POLICY_VIOLATION: Final = 1008  # client frames over fanout.max_client_messages_per_s
TRY_AGAIN_LATER: Final = 1013
SERVICE_RESTART: Final = 1012

CLOSE_GRACE_S: Final = 5.0  # how long a close handshake may take before the socket is aborted

_ids = itertools.count(1)


class Session:
    """Subscriber of the fan-out for one connection (see relay.core.fanout.Subscriber)."""

    def __init__(self, relay: Relay, ws: ServerConnection, claims: Claims | None) -> None:
        self.relay = relay
        self.ws = ws
        self.id = next(_ids)
        self.claims = claims
        self.user_id: str | None = None
        self.outbox = Outbox(relay.config.fanout.min_interval_ms)
        self.write_started: float | None = None  # monotonic s when the current write began
        self.closing = False
        self.counted = False  # counted as authenticated by the relay
        self.frames_sent = 0  # written since the sweeper last looked
        self._wake = asyncio.Event()
        self._live = False  # snapshot offered: frames may be written
        self._draining = False  # the socket's buffer is over its limit: the writer waits
        self._expiry: asyncio.TimerHandle | None = None
        self._opened = time.monotonic()
        self._bucket = MessageBucket(relay.config.fanout.max_client_messages_per_s)

    # -- fan-out side ---------------------------------------------------------------------------

    def wake(self, now: float | None = None) -> None:
        """Something may be due. Like websockets.broadcast, write it right here when the
        socket takes it (no task switch per frame); the writer task handles deadlines and
        sockets whose buffer is full (meanwhile newer states merge in the outbox)."""
        if self._live and not self._draining:
            self._flush(_now_ms() if now is None else now)
        if self._draining or self.outbox.waiting():
            self._wake.set()

    def _flush(self, now: float) -> None:
        """Write every due frame without awaiting; mark the socket draining when it is full."""
        frames = self.outbox.take_due(now)
        if not frames:
            return
        ws = self.ws
        if ws.protocol.state is not State.OPEN:
            return
        try:
            for frame in frames:
                ws.protocol.send_text(frame)
            ws.send_data()
        except Exception as e:  # the transport is going away; the read loop will end
            log.debug("write_failed", error=repr(e))
            return
        self.frames_sent += len(frames)  # the sweeper adds it to the metric (no lock per write)
        self._draining = ws.paused

    def unsent_bytes(self) -> int:
        transport = self.ws.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return buffered + self.outbox.pending_bytes

    # -- life -----------------------------------------------------------------------------------

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(conn_id=self.id, peer=_peer(self.ws))
        self.relay.track(self, authenticated=False)
        writer: asyncio.Task[None] | None = None
        try:
            claims = self.claims or await self._first_message_auth()
            if claims is None or self.closing:
                return
            self.user_id = claims.user_id
            structlog.contextvars.bind_contextvars(user_id=self.user_id)
            fanout = self.relay.fanout
            if (
                fanout.connections_of(claims.user_id)
                >= self.relay.config.server.max_connections_per_user
            ):
                await self._close_reading(TOO_MANY_FOR_USER, "too many connections for this user")
                return
            # Join before the first await, so that racing connects cannot pass the limit; live
            # frames wait in the outbox until the snapshot has been offered.
            fanout.join(claims.user_id, self)
            self.relay.track(self, authenticated=True)
            await self.ws.send(encode(AuthSuccess(claims.user_id)), text=True)
            log.info("connection_opened", via="handshake" if self.claims else "first_message")
            self._schedule_expiry(claims)
            try:
                states = await self.relay.store.batches_for(claims.user_id)
            except REDIS_ERRORS as e:
                log.warning("snapshot_failed", error=repr(e))
                await self._close_reading(TRY_AGAIN_LATER, "snapshot unavailable, retry later")
                return
            self._live = True
            fanout.snapshot(claims.user_id, self, states, _now_ms(), time.time() * 1000)
            writer = asyncio.create_task(self._writer())
            await self._read_loop()
        except ConnectionClosed:
            pass
        finally:
            if writer is not None:
                writer.cancel()
            if self._expiry is not None:
                self._expiry.cancel()
            if self.user_id is not None:
                self.relay.fanout.leave(self.user_id, self)
            self.relay.untrack(self)
            code = self.ws.close_code if self.ws.close_code is not None else 1006
            self.relay.metrics.closes.labels(str(code)).inc()
            log.info(
                "connection_closed",
                code=code,
                duration_s=round(time.monotonic() - self._opened, 3),
            )

    async def _first_message_auth(self) -> Claims | None:
        try:
            async with asyncio.timeout(self.relay.config.auth.auth_timeout_s):
                message = await self.ws.recv()
        except TimeoutError:
            await self._refuse(AuthFailed(AUTH_TIMEOUT, "authentication timeout", "timeout"))
            return None
        try:
            frame = parse_client_frame(message)
        except BadClientFrame as e:
            await self._refuse(AuthFailed(BAD_FORMAT, str(e), "bad_format"))
            return None
        if not isinstance(frame, ClientAuth):
            await self._refuse(
                AuthFailed(NOT_AUTH_MESSAGE, "first message must be an auth message", "not_auth")
            )
            return None
        try:
            return await self.relay.verifier.verify_async(frame.token)
        except AuthFailed as e:
            await self._refuse(e)
            return None

    async def _refuse(self, e: AuthFailed) -> None:
        self.relay.metrics.auth_failures.labels(e.reason).inc()
        log.info("auth_failed", reason=e.reason, code=e.code)
        if self.closing:
            return
        try:
            await self.ws.send(encode(AuthError(e.message)), text=True)
        except ConnectionClosed:
            return
        await self._close_reading(e.code, e.message)

    async def _read_loop(self) -> None:
        async for message in self.ws:
            if not self._bucket.take(time.monotonic()):
                log.info("client_flood", rate_per_s=self._bucket.rate)
                await self._close_reading(POLICY_VIOLATION, "too many messages")
                return
            try:
                frame = parse_client_frame(message)
            except BadClientFrame as e:
                await self._close_reading(BAD_FORMAT, str(e))
                return
            if isinstance(frame, ClientAuth):
                await self._refresh(frame.token)
            elif isinstance(frame, ClientPing):
                self.outbox.control(PONG_TEXT)
                self.wake()
            # pong and other well-formed objects are ignored

    async def _refresh(self, token: str) -> None:
        """In-band token refresh: same user extends the connection; another user is refused."""
        try:
            claims = await self.relay.verifier.verify_async(token)
        except AuthFailed as e:
            await self._refuse(e)
            return
        if claims.user_id != self.user_id:
            await self._refuse(AuthFailed(INVALID_TOKEN, "token is for another user", "other_user"))
            return
        self._schedule_expiry(claims)
        self.outbox.control(encode(AuthSuccess(claims.user_id)))
        self.wake()

    def _schedule_expiry(self, claims: Claims) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        delay = claims.exp + self.relay.config.auth.leeway_s - time.time()
        self._expiry = loop.call_later(max(0.0, delay), self._expired)

    def _expired(self) -> None:
        self.relay.spawn(self.close(TOKEN_EXPIRED, "token expired"))

    async def _writer(self) -> None:
        """Write what the outbox says is due; sleep until the next deadline or a wake-up."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionClosed, OSError):
            await self._write_loop(loop)

    async def _write_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            self._wake.clear()
            if self._draining:
                self.write_started = loop.time()  # the sweeper closes it after write_timeout_s
                await self.ws.drain()
                self.write_started = None
                self._draining = False
            now = loop.time() * 1000
            self._flush(now)
            if self._draining:
                continue
            deadline = self.outbox.next_due()
            if deadline is None:
                await self._wake.wait()
            else:
                try:
                    async with asyncio.timeout(max(0.0, (deadline - now) / 1000)):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _close_reading(self, code: int, reason: str) -> None:
        """Close from the task that reads the connection, and keep reading (discarding) until it
        is closed: websockets stops reading the socket while unread messages pile up (a flood),
        and the peer's closing frame behind them would never be seen (1006 after close_timeout).
        """
        closing = asyncio.create_task(self.close(code, reason))
        with contextlib.suppress(ConnectionClosed):
            async for _ in self.ws:
                pass
        await closing

    async def close(self, code: int, reason: str) -> None:
        """Close with `code`; a peer that does not complete the handshake in time is aborted."""
        if self.closing:
            return
        self.closing = True
        self.outbox.clear()
        try:
            async with asyncio.timeout(CLOSE_GRACE_S):
                await self.ws.close(code, reason)
        except TimeoutError:
            if self.ws.transport is not None:
                self.ws.transport.abort()


def _now_ms() -> float:
    return asyncio.get_running_loop().time() * 1000


def _peer(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
    except (TypeError, ValueError):
        return "?"
    return f"{host}:{port}"
