"""The stream reader: blocking XREAD on every shard stream, entries -> BatchState -> callback.

One task per shard (the same code on a single Redis and on Redis Cluster, where shards live on
different nodes). It never stops on a bad entry (skipped, counted, logged once per reason per
minute) and never stops on a Redis error: it backs off, reconnects and resumes from the last id
it processed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any, Final

import structlog

from relay.errors import BadEntry
from relay.keys import KeySpace
from relay.metrics import Metrics
from relay.redis_client import REDIS_ERRORS, AsyncClient
from relay.wire import BatchState, state_from_fields

log = structlog.get_logger("relay.reader")

BLOCK_MS: Final = 2_000
COUNT: Final = 1_000
BACKOFF_BASE_S: Final = 0.1
BACKOFF_CAP_S: Final = 3.0
REJECT_LOG_EVERY_S: Final = 60.0


class StreamReader:
    def __init__(
        self,
        client: AsyncClient,
        keys: KeySpace,
        on_state: Callable[[BatchState], None],
        metrics: Metrics,
        *,
        on_gap: Callable[[int], None] | None = None,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._on_state = on_state
        self._on_gap = on_gap
        self._metrics = metrics
        self.last_ids: dict[int, bytes] = {}
        self._healthy = [False] * keys.shards
        self._running = False
        self._logged: dict[str, float] = {}

    @property
    def healthy(self) -> bool:
        """True while the reader runs and every shard's last call to Redis succeeded."""
        return self._running and all(self._healthy)

    async def run(self) -> None:
        """Read all shards until cancelled."""
        self._running = True
        try:
            await asyncio.gather(*(self._read_shard(s) for s in range(self._keys.shards)))
        finally:
            self._running = False

    async def _tail_id(self, stream: str) -> bytes:
        last: Any = await self._redis.xrevrange(stream, count=1)
        return bytes(last[0][0]) if last else b"0-0"

    async def _read_shard(self, shard: int) -> None:
        stream = self._keys.stream(shard)
        failures = 0
        while True:
            try:
                if shard not in self.last_ids:
                    self.last_ids[shard] = await self._tail_id(stream)
                elif failures:
                    await self._check_gap(shard, stream)
                reply: Any = await self._redis.xread(
                    {stream: self.last_ids[shard]}, count=COUNT, block=BLOCK_MS
                )
                if failures:
                    log.info("redis_reconnected", shard=shard, after_failures=failures)
                failures = 0
                self._healthy[shard] = True
                for _name, entries in reply or ():
                    self._consume(shard, entries)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as e:
                self._healthy[shard] = False
                failures += 1
                self._metrics.redis_reconnects.inc()
                delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(failures, 6))
                delay *= random.uniform(0.5, 1.0)
                if failures == 1 or failures % 20 == 0:
                    log.warning("redis_read_failed", shard=shard, error=repr(e), retry_in_s=delay)
                await asyncio.sleep(delay)

    async def _check_gap(self, shard: int, stream: str) -> None:
        """After an outage: was the stream reset (Redis lost its data) or trimmed past us?"""
        last = self.last_ids[shard]
        first: Any = await self._redis.xrange(stream, count=1)
        tail = await self._tail_id(stream)
        reset = _id_tuple(tail) < _id_tuple(last)
        trimmed = bool(first) and _id_tuple(first[0][0]) > _id_tuple(last) and last != b"0-0"
        if reset or trimmed:
            # A stream whose first entry is newer than our position may be a trim or a Redis
            # that lost its data and has been written to since: the fan-out treats both alike.
            self._metrics.stream_gaps.inc()
            log.warning("stream_gap", shard=shard, reset=reset, trimmed=trimmed)
            if reset:
                self.last_ids[shard] = b"0-0"
            if self._on_gap is not None:
                self._on_gap(shard)

    def _consume(self, shard: int, entries: list[tuple[bytes, dict[Any, Any]]]) -> None:
        self._metrics.entries_read.inc(len(entries))
        for entry_id, fields in entries:
            try:
                state = state_from_fields(fields)
            except BadEntry as e:
                self._reject(entry_id, e.reason, e.detail)
                continue
            except Exception as e:  # never let one entry stop the reader
                self._reject(entry_id, "unreadable", repr(e))
                continue
            try:
                self._on_state(state)
            except Exception:  # a bug downstream must not stop the reader
                log.exception("state_dispatch_failed", entry_id=entry_id.decode())
        last_id = entries[-1][0]
        self.last_ids[shard] = last_id
        self._metrics.reader_lag.set(max(0.0, time.time() * 1000 - _id_tuple(last_id)[0]))

    def _reject(self, entry_id: bytes, reason: str, detail: str) -> None:
        self._metrics.entries_rejected.labels(reason).inc()
        now = time.monotonic()
        if now - self._logged.get(reason, -REJECT_LOG_EVERY_S) >= REJECT_LOG_EVERY_S:
            self._logged[reason] = now
            log.warning(
                "stream_entry_rejected", entry_id=entry_id.decode(), reason=reason, detail=detail
            )


def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)
