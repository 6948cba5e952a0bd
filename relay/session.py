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
from relay.core.deadlines import take_and_schedule
from relay.core.delivery import Outbox
from relay.core.ratelimit import MessageBucket
from relay.errors import AuthFailed, error_fields
from relay.pacer import now_ms
from relay.redis_client import REDIS_ERRORS
from relay.wire import (
    PONG_TEXT,
    AuthError,
    AuthSuccess,
    BadClientFrame,
    BatchState,
    ClientAuth,
    ClientFrame,
    ClientPing,
    encode,
    parse_client_frame,
    ws_text,
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
MESSAGE_TOO_BIG: Final = 1009

# An auth message may carry any token the handshake accepts (an 8 KiB header line, as the
# WebSocket library limits it) plus its JSON envelope; other client frames are held to
# fanout.max_message_bytes.
AUTH_MESSAGE_MAX_BYTES: Final = 8192 + 256

CLOSE_GRACE_S: Final = 5.0  # how long a close handshake may take before the socket is aborted
SNAPSHOT_CHUNK: Final = 100  # snapshot frames written per step (then the loop runs others)

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
        self.closing = False
        self.counted = False  # counted as authenticated by the relay
        self.frames_sent = 0  # written since the sweeper last looked
        self._task: asyncio.Task[None] | None = None  # the snapshot, later a wait for a drain
        self._live = False  # snapshot written: frames may be written as they come
        self._draining = False  # the socket's buffer is over its limit: a task waits
        # Loop ms since when the socket's buffer has held data without ever emptying (None: it
        # is empty). The buffer only grows in _flush, which looks before and after each write,
        # so no emptying goes unseen: a client that reads a trickle cannot reset it.
        self.waiting_since: float | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._opened = asyncio.get_running_loop().time()  # one clock: the loop's
        self._bucket = MessageBucket(relay.config.fanout.max_client_messages_per_s)

    # -- fan-out side ---------------------------------------------------------------------------

    def wake(self, now: float | None = None) -> None:
        """Something may be due (at loop ms `now`): write it now."""
        self.write_due(now_ms() if now is None else now)

    def write_due(self, now: float) -> None:
        """Like websockets.broadcast, write what is due right here when the socket takes it (no
        task per connection, no task switch per frame); a frame held by the throttle registers
        its deadline with the relay's one timer (relay.pacer), which calls this again then.
        Only a full socket gets a task, which waits for it to drain (meanwhile newer states
        merge in the outbox)."""
        if self._live and not self._draining:
            self._flush(now)
            if self._draining:
                self._task = asyncio.create_task(self._drain())

    def _flush(self, now: float) -> None:
        """Write every due frame without awaiting, register the next deadline; mark the socket
        draining when it is full."""
        pacer = self.relay.pacer
        frames, rearm = take_and_schedule(self.outbox, pacer.deadlines, self, now)
        if rearm:
            pacer.arm()
        if not frames:
            return
        ws = self.ws
        transport = ws.transport
        if ws.protocol.state is not State.OPEN or transport is None or transport.is_closing():
            return
        self.buffer_check()
        try:
            # Server frames are unmasked and the relay never fragments nor compresses: a frame
            # is its header and the text, written in one call (websockets' own writes, pings
            # and close, also go out whole, so frames never interleave).
            if len(frames) == 1:
                transport.write(ws_text(frames[0]))
            else:
                transport.write(b"".join(map(ws_text, frames)))
        except Exception as e:  # the transport is going away; the read loop will end
            log.debug("write_failed", error=repr(e))
            return
        self.frames_sent += len(frames)  # the sweeper adds it to the metric (no lock per write)
        self._draining = ws.paused
        if self.waiting_since is None and self.buffer_check():
            self.waiting_since = now

    async def _drain(self) -> None:
        """The socket's buffer is over its limit: wait until it drains, then write what is due
        (the sweeper closes it when data waits over write_timeout_s)."""
        try:
            await self.ws.drain()
        except (ConnectionClosed, OSError):
            return
        self._draining = False
        self.wake()

    def unsent_bytes(self) -> int:
        transport = self.ws.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return buffered + self.outbox.pending_bytes

    def buffer_check(self) -> bool:
        """Does the socket's buffer hold data? Forgets `waiting_since` when it is empty."""
        transport = self.ws.transport
        if transport is not None and transport.get_write_buffer_size() > 0:
            return True
        self.waiting_since = None
        return False

    def waiting_ms(self, now: float) -> float:
        """How long (loop ms) the socket's buffer has held data without emptying."""
        if self.waiting_since is None or not self.buffer_check():
            return 0.0
        return now - self.waiting_since

    # -- life -----------------------------------------------------------------------------------

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(conn_id=self.id, peer=_peer(self.ws))
        self.relay.track(self, authenticated=False)
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
            # frames wait in the outbox until the snapshot has been written.
            fanout.join(claims.user_id, self)
            self.relay.track(self, authenticated=True)
            # auth_success only once the snapshot is in hand: a client that hears it may reset
            # its reconnect backoff, which must not happen while Redis is down.
            try:
                states = await self.relay.read_snapshot(claims.user_id)
            except REDIS_ERRORS as e:
                log.warning("snapshot_failed", **error_fields(e))
                self.relay.redis_failed(e)
                await self._close_reading(TRY_AGAIN_LATER, "snapshot unavailable, retry later")
                return
            await self.ws.send(encode(AuthSuccess(claims.user_id)), text=True)
            log.info("connection_opened", via="handshake" if self.claims else "first_message")
            self._schedule_expiry(claims)
            self._task = asyncio.create_task(self._start(states))
            await self._read_loop()
        except ConnectionClosed:
            pass
        finally:
            self.relay.pacer.forget(self)
            if self._task is not None:
                self._task.cancel()
            if self._expiry is not None:
                self._expiry.cancel()
            if self.user_id is not None:
                self.relay.fanout.leave(self.user_id, self)
            self.relay.untrack(self)
            code = close_code(self.ws)
            self.relay.metrics.closed(code)
            log.info(
                "connection_closed",
                code=code,
                duration_s=round(asyncio.get_running_loop().time() - self._opened, 3),
            )

    async def _first_message_auth(self) -> Claims | None:
        try:
            async with asyncio.timeout(self.relay.config.auth.auth_timeout_s):
                message = await self.ws.recv()
        except TimeoutError:
            await self._refuse(AuthFailed(AUTH_TIMEOUT, "authentication timeout", "timeout"))
            return None
        frame = self._parse(message)
        if isinstance(frame, int):  # MESSAGE_TOO_BIG
            await self._close_reading(MESSAGE_TOO_BIG, "message too big")
            return None
        if isinstance(frame, str):
            await self._refuse(AuthFailed(BAD_FORMAT, frame, "bad_format"))
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
        self.relay.metrics.auth_failed(e.reason)
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
            if not self._bucket.take(asyncio.get_running_loop().time()):
                log.info("client_flood", rate_per_s=self._bucket.rate)
                await self._close_reading(POLICY_VIOLATION, "too many messages")
                return
            frame = self._parse(message)
            if isinstance(frame, int):  # MESSAGE_TOO_BIG
                await self._close_reading(MESSAGE_TOO_BIG, "message too big")
                return
            if isinstance(frame, str):
                await self._close_reading(BAD_FORMAT, frame)
                return
            if isinstance(frame, ClientAuth):
                await self._refresh(frame.token)
            elif isinstance(frame, ClientPing):
                self.outbox.control(PONG_TEXT)
                self.wake()
            # pong and other well-formed objects are ignored

    def _parse(self, message: str | bytes) -> ClientFrame | str | int:
        """The client frame; or why it is not one (str, close 4004); or MESSAGE_TOO_BIG when it
        is over max_message_bytes and not an auth message (the library enforces only the auth
        message's larger cap)."""
        try:
            frame: ClientFrame | str = parse_client_frame(message)
        except BadClientFrame as e:
            frame = str(e)
        limit = self.relay.config.fanout.max_message_bytes
        if isinstance(frame, ClientAuth) or len(message) * 4 <= limit:  # n chars <= 4n bytes
            return frame
        size = len(message) if isinstance(message, bytes) else len(message.encode())
        return MESSAGE_TOO_BIG if size > limit else frame

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

    async def _start(self, snapshot: list[BatchState]) -> None:
        """Write the snapshot, then go live: from then on frames are written as they come
        (write_due) and when the relay's one timer says they are due."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionClosed, OSError):
            await self._send_snapshot(loop, snapshot)
            self._live = True
            self.wake()

    async def _send_snapshot(
        self, loop: asyncio.AbstractEventLoop, states: list[BatchState]
    ) -> None:
        """Write the snapshot (most recently updated first) in chunks, each only once the
        socket has taken the previous one: a large snapshot never fills the buffer of a client
        that reads it promptly, and never holds the event loop for long. Live frames queued
        meanwhile go out with the chunks (a batch's newest state replaces its snapshot frame)."""
        assert self.user_id is not None
        fanout = self.relay.fanout
        for start in range(0, len(states), SNAPSHOT_CHUNK):
            now = loop.time() * 1000
            chunk = states[start : start + SNAPSHOT_CHUNK]
            fanout.snapshot(self.user_id, self, chunk, now, time.time() * 1000)
            self._flush(now)
            if self._draining:
                await self.ws.drain()
                self._draining = False
            else:
                await asyncio.sleep(0)

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


def close_code(ws: ServerConnection) -> int:
    """The close code of the connection as the server saw it: the one it sent when it closed
    first, the peer's when the peer did, 1006 when no close frame went either way.
    (`ws.close_code` is always the peer's.)"""
    proto = ws.protocol
    if proto.close_sent is not None and not proto.close_rcvd_then_sent:
        return proto.close_sent.code
    if proto.close_rcvd is not None:
        return proto.close_rcvd.code
    return 1006


def _peer(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
    except (TypeError, ValueError):
        return "?"
    return f"{host}:{port}"
