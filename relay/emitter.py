"""The worker-facing SDK: report batch progress through the atomic Lua script.

    from redis import Redis
    from relay.emitter import Emitter

    progress = Emitter(Redis())
    progress.start("b-1", "user-7", total=3, label="Import")
    progress.item("b-1", "user-7", "row-1")            # counted exactly once per item_id
    progress.item("b-1", "user-7", "row-2", ok=False)

`AsyncEmitter` has the same methods for redis.asyncio clients. Cluster clients work too.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import structlog

from relay.errors import BadArgument, BadEntry, EmitError, WrongUser
from relay.keys import KeySpace
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
    def item_args(item_id: str, ok: bool) -> list[str]:
        if not isinstance(item_id, str) or not 1 <= len(item_id.encode()) <= 512:
            raise BadArgument(
                f"item_id must be a non-empty string of at most 512 bytes, got {item_id!r}"
            )
        if not isinstance(ok, bool):
            raise BadArgument(f"ok must be a bool, got {ok!r}")
        return ["item_id", item_id, "ok", "1" if ok else "0"]

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

    def failed(self, e: redis.RedisError, op: str, batch_id: str) -> None:
        """Map a Redis error: refusals raise; outages raise or, best effort, log and return."""
        if isinstance(e, redis.ResponseError):
            text = str(e)
            if text.startswith("BADARG "):
                raise BadArgument(text[len("BADARG ") :]) from e
            if text.startswith("WRONGUSER "):
                raise WrongUser(text[len("WRONGUSER ") :]) from e
        if self.best_effort:
            log.warning("progress_report_failed", op=op, batch_id=batch_id, error=repr(e))
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
        except redis.RedisError as e:
            self._ops.failed(e, op, batch_id)
            return None
        return self._ops.parse(reply)

    def start(
        self, batch_id: str, user_id: str, total: int, *, label: str | None = None
    ) -> BatchState | None:
        return self._run("start", batch_id, user_id, _Ops.start_args(total, label))

    def item(
        self, batch_id: str, user_id: str, item_id: str, *, ok: bool = True
    ) -> BatchState | None:
        return self._run("item", batch_id, user_id, _Ops.item_args(item_id, ok))

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
        except redis.RedisError as e:
            self._ops.failed(e, op, batch_id)
            return None
        return self._ops.parse(reply)

    async def start(
        self, batch_id: str, user_id: str, total: int, *, label: str | None = None
    ) -> BatchState | None:
        return await self._run("start", batch_id, user_id, _Ops.start_args(total, label))

    async def item(
        self, batch_id: str, user_id: str, item_id: str, *, ok: bool = True
    ) -> BatchState | None:
        return await self._run("item", batch_id, user_id, _Ops.item_args(item_id, ok))

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
