"""The worker-facing SDK: report batch progress through the atomic Lua script.

    from redis import Redis
    from relay.emitter import Emitter

    progress = Emitter(Redis())
    progress.start("b-1", "user-7", total=3, label="Import")
    progress.item("b-1", "user-7", "row-1")            # counted exactly once per item_id
    progress.item("b-1", "user-7", "row-2", ok=False)

    progress.items("b-1", "user-7", {"row-3": True, "row-4": False})  # one atomic call

    with progress.reporter("b-1", "user-7") as r:       # buffered: one `items` call per
        for row in rows:                                  # 100 ms or 1,000 outcomes
            r.item(str(row.number), ok=import_row(row))

`AsyncEmitter` has the same methods for redis.asyncio clients (`async with` for its reporter).
Cluster clients work too.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from types import TracebackType
from typing import Any, Final, Self

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import structlog

from relay.errors import BadArgument, BadEntry, EmitError, WrongUser, error_fields
from relay.keys import KeySpace
from relay.redis_client import REDIS_ERRORS
from relay.wire import (
    MAX_COUNT,
    MAX_ID_LEN,
    MAX_LABEL_LEN,
    STATUSES,
    TERMINAL,
    BatchState,
    state_from_fields,
)

SCRIPT: Final = resources.files("relay").joinpath("lua/emit.lua").read_text()

log = structlog.get_logger("relay.emitter")

SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
Outcomes = Mapping[str, bool] | Iterable[tuple[str, bool]]


class RedisUnavailable(EmitError):
    """Redis could not run the operation (connection lost, timeout, script error)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_LEN:
        raise BadArgument(f"{name} must be a string of 1-{MAX_ID_LEN} characters, got {value!r}")
    return value


def _check_count(name: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise BadArgument(f"{name} must be an integer between 0 and {MAX_COUNT}, got {value!r}")
    return str(value)


class _Ops:
    """Argument checking and result parsing shared by Emitter and AsyncEmitter (no I/O)."""

    def __init__(
        self,
        *,
        prefix: str,
        shards: int,
        best_effort: bool,
        active_s: int,
        finished_s: int,
        stream_maxlen: int,
    ) -> None:
        if shards < 1:
            raise BadArgument("shards must be >= 1")
        if "{" in prefix or "}" in prefix or not prefix:
            raise BadArgument("prefix must be non-empty and must not contain braces")
        self.keys = KeySpace(prefix, shards)
        self.best_effort = best_effort
        self._ttl = [str(active_s * 1000), str(finished_s * 1000), str(stream_maxlen)]

    def call(
        self, op: str, batch_id: str, user_id: str, pairs: Sequence[str]
    ) -> tuple[list[str], list[str]]:
        _check_id("batch_id", batch_id)
        _check_id("user_id", user_id)
        return self.keys.op_keys(batch_id, user_id), [op, batch_id, user_id, *self._ttl, *pairs]

    @staticmethod
    def start_args(total: int, label: str | None) -> list[str]:
        pairs = ["total", _check_count("total", total)]
        if label is not None:
            if not isinstance(label, str) or len(label) > MAX_LABEL_LEN:
                raise BadArgument(f"label must be a string of at most {MAX_LABEL_LEN} characters")
            pairs += ["label", label]
        return pairs

    @staticmethod
    def check_item(item_id: object, ok: object) -> str:
        """The script's "1"/"0" for ok; raises BadArgument for an invalid id or outcome."""
        # up to 128 characters is at most 512 bytes: no need to encode the common short ids
        if not isinstance(item_id, str) or not (
            0 < len(item_id) <= 128 or 0 < len(item_id.encode()) <= 512
        ):
            raise BadArgument(
                f"item_id must be a non-empty string of at most 512 bytes, got {item_id!r}"
            )
        if ok is True:
            return "1"
        if ok is False:
            return "0"
        raise BadArgument(f"ok must be a bool, got {ok!r}")

    @staticmethod
    def item_args(item_id: str, ok: bool) -> list[str]:
        return ["item_id", item_id, "ok", _Ops.check_item(item_id, ok)]

    @staticmethod
    def items_args(outcomes: Outcomes) -> list[str]:
        pairs = outcomes.items() if isinstance(outcomes, Mapping) else outcomes
        if isinstance(pairs, str | bytes):
            raise BadArgument("outcomes must be a mapping or an iterable of (item_id, ok) pairs")
        args: list[str] = []
        check = _Ops.check_item
        try:
            for item_id, ok in pairs:
                args += (item_id, check(item_id, ok))
        except (TypeError, ValueError) as e:
            raise BadArgument(
                f"outcomes must be a mapping or an iterable of (item_id, ok) pairs: {e}"
            ) from e
        return args

    @staticmethod
    def incr_args(successful: int, failed: int) -> list[str]:
        return [
            "successful",
            _check_count("successful", successful),
            "failed",
            _check_count("failed", failed),
        ]

    @staticmethod
    def set_args(fields: dict[str, int | str | None]) -> list[str]:
        pairs: list[str] = []
        for name, value in fields.items():
            if value is None:
                continue
            if name == "status":
                if value not in STATUSES:
                    raise BadArgument(f"status must be one of {sorted(STATUSES)}, got {value!r}")
                pairs += [name, str(value)]
            else:
                pairs += [name, _check_count(name, value)]
        if not pairs:
            raise BadArgument(
                "set needs at least one of total, processed, successful, failed, status"
            )
        return pairs

    @staticmethod
    def finish_args(status: str) -> list[str]:
        if status not in TERMINAL:
            raise BadArgument(f"finish status must be one of {sorted(TERMINAL)}, got {status!r}")
        return ["status", status]

    def parse(self, reply: Any) -> BatchState:
        flat = list(reply)
        return state_from_fields(dict(zip(flat[::2], flat[1::2], strict=True)))

    @staticmethod
    def refusal(e: Exception) -> None:
        """Raise BadArgument / WrongUser for the script's refusals (never swallowed)."""
        if isinstance(e, redis.ResponseError):
            text = str(e)
            if text.startswith("BADARG "):
                raise BadArgument(text[len("BADARG ") :]) from e
            if text.startswith("WRONGUSER "):
                raise WrongUser(text[len("WRONGUSER ") :]) from e

    def failed(self, e: Exception, op: str, batch_id: str) -> None:
        """Map a Redis error: refusals raise; outages raise or, best effort, log and return."""
        self.refusal(e)
        if self.best_effort:
            log.warning(
                "progress_report_failed",
                op=op,
                batch_id=batch_id,
                **error_fields(e),
            )
            return
        raise RedisUnavailable(f"{op} on batch {batch_id!r} failed: {e}") from e

    @staticmethod
    def decode_hash(raw: Any) -> BatchState | None:
        if not raw:
            return None
        try:
            return state_from_fields(raw)
        except BadEntry as e:
            log.warning("unreadable_batch_hash_skipped", reason=e.reason, detail=e.detail)
            return None


class Emitter:
    """Synchronous SDK. Every method returns the batch's new state (None: best-effort failure)."""

    def __init__(
        self,
        client: SyncClient,
        *,
        prefix: str = "progress",
        shards: int = 1,
        best_effort: bool = False,
        active_s: int = 86_400,
        finished_s: int = 3_600,
        stream_maxlen: int = 100_000,
    ) -> None:
        self._redis = client
        self._ops = _Ops(
            prefix=prefix,
            shards=shards,
            best_effort=best_effort,
            active_s=active_s,
            finished_s=finished_s,
            stream_maxlen=stream_maxlen,
        )
        self._script = client.register_script(SCRIPT)

    def _run(self, op: str, batch_id: str, user_id: str, pairs: list[str]) -> BatchState | None:
        keys, argv = self._ops.call(op, batch_id, user_id, pairs)
        try:
            reply = self._script(keys=keys, args=argv)
        except REDIS_ERRORS as e:
            self._ops.failed(e, op, batch_id)
            return None
        return self._ops.parse(reply)

    def _run_strict(self, op: str, batch_id: str, user_id: str, pairs: list[str]) -> BatchState:
        """Like _run, but a Redis error always raises (as itself): the reporter's flushes."""
        keys, argv = self._ops.call(op, batch_id, user_id, pairs)
        try:
            reply = self._script(keys=keys, args=argv)
        except REDIS_ERRORS as e:
            _Ops.refusal(e)
            raise
        return self._ops.parse(reply)

    def start(
        self, batch_id: str, user_id: str, total: int, *, label: str | None = None
    ) -> BatchState | None:
        return self._run("start", batch_id, user_id, _Ops.start_args(total, label))

    def item(
        self, batch_id: str, user_id: str, item_id: str, *, ok: bool = True
    ) -> BatchState | None:
        return self._run("item", batch_id, user_id, _Ops.item_args(item_id, ok))

    def items(self, batch_id: str, user_id: str, outcomes: Outcomes) -> BatchState | None:
        """Count many outcomes at once: exactly as the same `item` calls in order, atomically."""
        return self._run("items", batch_id, user_id, _Ops.items_args(outcomes))

    def reporter(
        self, batch_id: str, user_id: str, *, flush_ms: int = 100, max_items: int = 1000
    ) -> Reporter:
        """A buffered, thread-safe `item` for `with`: flushes through `items` every flush_ms,
        every max_items outcomes, and on exit."""
        return Reporter(self, batch_id, user_id, flush_ms=flush_ms, max_items=max_items)

    def incr(
        self, batch_id: str, user_id: str, *, successful: int = 0, failed: int = 0
    ) -> BatchState | None:
        return self._run("incr", batch_id, user_id, _Ops.incr_args(successful, failed))

    def set(
        self,
        batch_id: str,
        user_id: str,
        *,
        total: int | None = None,
        processed: int | None = None,
        successful: int | None = None,
        failed: int | None = None,
        status: str | None = None,
    ) -> BatchState | None:
        fields = {
            "total": total,
            "processed": processed,
            "successful": successful,
            "failed": failed,
            "status": status,
        }
        return self._run("set", batch_id, user_id, _Ops.set_args(fields))

    def finish(self, batch_id: str, user_id: str, status: str = "completed") -> BatchState | None:
        return self._run("finish", batch_id, user_id, _Ops.finish_args(status))

    def get(self, batch_id: str) -> BatchState | None:
        _check_id("batch_id", batch_id)
        return _Ops.decode_hash(self._redis.hgetall(self._ops.keys.batch(batch_id)))

    def batches_for(self, user_id: str) -> list[BatchState]:
        """The user's live and recently finished batches, oldest first."""
        _check_id("user_id", user_id)
        keys = self._ops.keys
        ids: list[str] = []
        for shard in range(keys.shards):
            ids += map(_text, self._redis.zrange(keys.user_index(shard, user_id), 0, -1))
        pipe = self._redis.pipeline(transaction=False)
        for raw_id in ids:
            pipe.hgetall(keys.batch(raw_id))
        states = [_Ops.decode_hash(h) for h in pipe.execute()] if ids else []
        return sorted(
            (s for s in states if s and s.user_id == user_id),
            key=lambda s: (s.started_at, s.batch_id),
        )


class AsyncEmitter:
    """asyncio SDK with the same methods as Emitter (each a coroutine)."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        prefix: str = "progress",
        shards: int = 1,
        best_effort: bool = False,
        active_s: int = 86_400,
        finished_s: int = 3_600,
        stream_maxlen: int = 100_000,
    ) -> None:
        self._redis = client
        self._ops = _Ops(
            prefix=prefix,
            shards=shards,
            best_effort=best_effort,
            active_s=active_s,
            finished_s=finished_s,
            stream_maxlen=stream_maxlen,
        )
        self._script = client.register_script(SCRIPT)

    async def _run(
        self, op: str, batch_id: str, user_id: str, pairs: list[str]
    ) -> BatchState | None:
        keys, argv = self._ops.call(op, batch_id, user_id, pairs)
        try:
            reply = await self._script(keys=keys, args=argv)
        except REDIS_ERRORS as e:
            self._ops.failed(e, op, batch_id)
            return None
        return self._ops.parse(reply)

    async def _run_strict(
        self, op: str, batch_id: str, user_id: str, pairs: list[str]
    ) -> BatchState:
        keys, argv = self._ops.call(op, batch_id, user_id, pairs)
        try:
            reply = await self._script(keys=keys, args=argv)
        except REDIS_ERRORS as e:
            _Ops.refusal(e)
            raise
        return self._ops.parse(reply)

    async def start(
        self, batch_id: str, user_id: str, total: int, *, label: str | None = None
    ) -> BatchState | None:
        return await self._run("start", batch_id, user_id, _Ops.start_args(total, label))

    async def item(
        self, batch_id: str, user_id: str, item_id: str, *, ok: bool = True
    ) -> BatchState | None:
        return await self._run("item", batch_id, user_id, _Ops.item_args(item_id, ok))

    async def items(self, batch_id: str, user_id: str, outcomes: Outcomes) -> BatchState | None:
        """Count many outcomes at once: exactly as the same `item` calls in order, atomically."""
        return await self._run("items", batch_id, user_id, _Ops.items_args(outcomes))

    def reporter(
        self, batch_id: str, user_id: str, *, flush_ms: int = 100, max_items: int = 1000
    ) -> AsyncReporter:
        """A buffered `item` for `async with`: flushes through `items` every flush_ms, every
        max_items outcomes, and on exit."""
        return AsyncReporter(self, batch_id, user_id, flush_ms=flush_ms, max_items=max_items)

    async def incr(
        self, batch_id: str, user_id: str, *, successful: int = 0, failed: int = 0
    ) -> BatchState | None:
        return await self._run("incr", batch_id, user_id, _Ops.incr_args(successful, failed))

    async def set(
        self,
        batch_id: str,
        user_id: str,
        *,
        total: int | None = None,
        processed: int | None = None,
        successful: int | None = None,
        failed: int | None = None,
        status: str | None = None,
    ) -> BatchState | None:
        fields = {
            "total": total,
            "processed": processed,
            "successful": successful,
            "failed": failed,
            "status": status,
        }
        return await self._run("set", batch_id, user_id, _Ops.set_args(fields))

    async def finish(
        self, batch_id: str, user_id: str, status: str = "completed"
    ) -> BatchState | None:
        return await self._run("finish", batch_id, user_id, _Ops.finish_args(status))

    async def get(self, batch_id: str) -> BatchState | None:
        _check_id("batch_id", batch_id)
        return _Ops.decode_hash(await self._redis.hgetall(self._ops.keys.batch(batch_id)))

    async def batches_for(self, user_id: str) -> list[BatchState]:
        """The user's live and recently finished batches, oldest first."""
        _check_id("user_id", user_id)
        keys = self._ops.keys
        ids: list[str] = []
        for shard in range(keys.shards):
            ids += map(_text, await self._redis.zrange(keys.user_index(shard, user_id), 0, -1))
        states: list[BatchState | None] = []
        if ids:
            pipe = self._redis.pipeline(transaction=False)
            for raw_id in ids:
                pipe.hgetall(keys.batch(raw_id))
            states = [_Ops.decode_hash(h) for h in await pipe.execute()]
        return sorted(
            (s for s in states if s and s.user_id == user_id),
            key=lambda s: (s.started_at, s.batch_id),
        )


class _Buffer:
    """The reporter's buffer and flush policy, shared by both reporters (no I/O).

    Outcomes wait in a dict (a later outcome of the same id replaces the earlier one: the
    same result as both `item` calls in order). A failed flush puts its outcomes back, under
    any newer ones, and the next attempt waits for the next tick.
    """

    def __init__(
        self, ops: _Ops, batch_id: str, user_id: str, *, flush_ms: int, max_items: int
    ) -> None:
        _check_id("batch_id", batch_id)
        _check_id("user_id", user_id)
        if isinstance(flush_ms, bool) or not isinstance(flush_ms, int) or flush_ms < 1:
            raise BadArgument(f"flush_ms must be a positive integer, got {flush_ms!r}")
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise BadArgument(f"max_items must be a positive integer, got {max_items!r}")
        self.ops = ops
        self.batch_id, self.user_id = batch_id, user_id
        self.interval_s = flush_ms / 1000
        self.max_items = max_items
        self.pending: dict[str, bool] = {}
        self.retry_at = 0.0  # monotonic time before which a full buffer does not flush
        self.error: BaseException | None = None  # a strict flush's failure, raised on next use

    def add(self, item_id: str, ok: bool) -> bool:
        """Buffer one outcome; True when the buffer is full and a flush may run now."""
        _Ops.check_item(item_id, ok)
        self.pending[item_id] = ok
        return len(self.pending) >= self.max_items and time.monotonic() >= self.retry_at

    def take(self) -> list[str]:
        taken, self.pending = self.pending, {}
        args: list[str] = []
        for item_id, ok in taken.items():
            args += (item_id, "1" if ok else "0")
        return args

    def failed(self, args: list[str], e: Exception, *, final: bool) -> None:
        """A flush of `args` failed: raise refusals, else requeue and log or raise."""
        _Ops.refusal(e)
        if final:
            log.warning(
                "progress_report_lost",
                batch_id=self.batch_id,
                outcomes=len(args) // 2,
                **error_fields(e),
            )
        else:
            back = {args[i]: args[i + 1] == "1" for i in range(0, len(args), 2)}
            back.update(self.pending)
            self.pending = back
            self.retry_at = time.monotonic() + self.interval_s
            if self.ops.best_effort:
                log.warning(
                    "progress_flush_failed",
                    batch_id=self.batch_id,
                    outcomes=len(back),
                    **error_fields(e),
                )
        if not self.ops.best_effort:
            raise RedisUnavailable(f"items on batch {self.batch_id!r} failed: {e}") from e

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


class Reporter:
    """`with emitter.reporter(batch_id, user_id) as r: r.item(...)`: thread-safe, buffered.

    A background thread flushes every flush_ms; `item` flushes in the calling thread when
    max_items outcomes wait; the exit flushes the rest. Flushes run one at a time, in order.
    With best_effort a failed flush is logged and its outcomes retried with the next one;
    without, the error (RedisUnavailable) is raised from `item`, `flush` or the exit.
    """

    def __init__(
        self, emitter: Emitter, batch_id: str, user_id: str, *, flush_ms: int, max_items: int
    ) -> None:
        self._emitter = emitter
        self._buf = _Buffer(emitter._ops, batch_id, user_id, flush_ms=flush_ms, max_items=max_items)
        self._lock = threading.Lock()  # the buffer
        self._flush_lock = threading.Lock()  # one flush at a time: outcomes keep their order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state: BatchState | None = None  # the batch's state after the last flush

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._tick, name="relay-reporter", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            error, self._buf.error = self._buf.error, None
        if et is not None:  # the job failed: report what we have, never mask its error
            with contextlib.suppress(EmitError):
                self._flush(final=True)
            return
        self._flush(final=True)
        if error is not None:
            raise error

    def item(self, item_id: str, *, ok: bool = True) -> None:
        with self._lock:
            self._buf.raise_error()
            full = self._buf.add(item_id, ok)
        if full:
            self._flush(final=False)

    def flush(self) -> BatchState | None:
        """Send what is buffered now; the batch's new state (None if nothing was sent)."""
        return self._flush(final=False)

    def _flush(self, *, final: bool) -> BatchState | None:
        buf = self._buf
        with self._flush_lock:
            with self._lock:
                args = buf.take()
            if not args:
                return None
            try:
                state = self._emitter._run_strict("items", buf.batch_id, buf.user_id, args)
            except REDIS_ERRORS as e:
                with self._lock:
                    buf.failed(args, e, final=final)
                return None
            self.state = state
            return state

    def _tick(self) -> None:
        while not self._stop.wait(self._buf.interval_s):
            try:
                self._flush(final=False)
            except EmitError as e:  # raised to the job from its next item() or the exit
                with self._lock:
                    self._buf.error = e


class AsyncReporter:
    """`async with emitter.reporter(batch_id, user_id) as r: r.item(...)`: buffered.

    `item` only buffers (it never waits); a background task flushes every flush_ms, or at
    once when max_items outcomes wait; the exit flushes the rest. Error handling as Reporter.
    """

    def __init__(
        self,
        emitter: AsyncEmitter,
        batch_id: str,
        user_id: str,
        *,
        flush_ms: int,
        max_items: int,
    ) -> None:
        self._emitter = emitter
        self._buf = _Buffer(emitter._ops, batch_id, user_id, flush_ms=flush_ms, max_items=max_items)
        self._flush_lock = asyncio.Lock()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.state: BatchState | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._tick(), name="relay-reporter")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        error, self._buf.error = self._buf.error, None
        if et is not None:
            with contextlib.suppress(EmitError):
                await self._flush(final=True)
            return
        await self._flush(final=True)
        if error is not None:
            raise error

    def item(self, item_id: str, *, ok: bool = True) -> None:
        self._buf.raise_error()
        if self._buf.add(item_id, ok):
            self._full.set()

    async def flush(self) -> BatchState | None:
        return await self._flush(final=False)

    async def _flush(self, *, final: bool) -> BatchState | None:
        buf = self._buf
        async with self._flush_lock:
            args = buf.take()
            if not args:
                return None
            try:
                state = await self._emitter._run_strict("items", buf.batch_id, buf.user_id, args)
            except REDIS_ERRORS as e:
                buf.failed(args, e, final=final)
                return None
            self.state = state
            return state

    async def _tick(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self._buf.interval_s)
            self._full.clear()
            try:
                await self._flush(final=False)
            except EmitError as e:
                self._buf.error = e
