"""The stream reader: blocking XREAD on every shard stream, entries -> BatchState -> callback.

One task per shard (the same code on a single Redis and on Redis Cluster, where shards live on
different nodes). It never stops on a bad entry (skipped, counted, logged once per reason per
minute) and never stops on a Redis error: it backs off, reconnects and resumes from the last id
it processed.

Gaps. Besides its position (the last entry id it processed) the reader keeps a count: how many
entries were ever added to the stream up to that position, as far as it knows (XINFO STREAM's
`entries-added` when it started, plus every entry it read since). Redis 7 counts every XADD in
`entries-added`, so comparing the two tells whether entries the reader never saw have left the
stream (trimmed past it while it was behind or stalled, or deleted), or whether the stream is a
new one (Redis lost its data). The reader checks after every reconnect, after an empty XREAD
reply, BEFORE it consumes a full one (a reply read from behind a trim starts after the gap
without saying so: decided with the reply in hand, the loss is exact; decided after consuming
it, the position has moved into the surviving entries and nothing can be decided until the
reader reaches the tail), and at least every GAP_CHECK_EVERY_S while entries flow. A lost entry
keeps the count short until it is noticed, so a check that cannot decide (the reader is behind
and the trim has not reached it) only delays detection to the next one.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, overload

import redis
import redis.asyncio
import redis.asyncio.cluster
import structlog

from relay.core.conflate import newest_per_batch
from relay.errors import BadEntry, error_fields
from relay.keys import KeySpace
from relay.metrics import Metrics
from relay.redis_client import REDIS_ERRORS, AsyncClient, denied, server_identity
from relay.wire import (
    BatchState,
    state_from_flat,
)

log = structlog.get_logger("relay.reader")

BLOCK_MS: Final = 2_000
COUNT: Final = 1_000
MAX_COUNT: Final = 16_000  # a reader that is behind reads more at once, and conflates more
YIELD_AFTER_S: Final = 0.005  # hand the loop to connections and HTTP at least this often
BACKOFF_BASE_S: Final = 0.1
BACKOFF_CAP_S: Final = 3.0
REJECT_LOG_EVERY_S: Final = 60.0
GAP_CHECK_EVERY_S: Final = 1.0

EntryId = tuple[int, int]


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """The parts of XINFO STREAM the gap check needs (a missing stream is an empty one)."""

    length: int = 0
    last_generated: EntryId = (0, 0)
    entries_added: int = 0
    first: EntryId | None = None  # the oldest entry still in the stream

    def lost_after(self, position: EntryId, counted: int) -> int | None:
        """How many entries up to now the reader, at `position` having accounted for `counted`
        additions, can no longer read: 0 none, > 0 that many lost, < 0 a new stream (Redis lost
        its data), None undecided (the reader is behind and the trim has not reached it)."""
        if self.last_generated < position:
            return -1
        if self.last_generated == position:  # at the tail: every addition should be counted
            return self.entries_added - counted
        if self.first is None or self.first > position:  # all we read is gone, the rest is here
            return self.entries_added - self.length - counted
        return None

    def lost_before(self, position: EntryId, counted: int, reply: Sequence[EntryId]) -> int:
        """Like lost_after, for a reader at `position` holding an unconsumed XREAD reply (ids
        in order, non-empty) read before this XINFO: entries between `position` and the reply,
        and after it, that left the stream unread. Always decided; < 0: another history."""
        if self.last_generated < reply[-1]:
            return -1
        if self.first is not None and self.first <= position:
            return 0  # nothing after our position was trimmed: the reply follows it
        # The stream holds `length` entries from `first` on; the reply's entries from `first`
        # on are among them. Everything else added after `position` is lost.
        kept = len(reply) - bisect.bisect_left(reply, self.first) if self.first else 0
        return self.entries_added - counted - len(reply) - (self.length - kept)


class StreamReader:
    def __init__(
        self,
        client: AsyncClient,
        keys: KeySpace,
        on_state: Callable[[BatchState], None],
        metrics: Metrics,
        *,
        on_gap: Callable[[int, bool], None] | None = None,
        watching: Callable[[str], bool] | None = None,
    ) -> None:
        """`on_gap(shard, reset)` runs when entries were lost; `reset`: seqs may restart.
        `watching(user_id)`: does anyone here watch this user? Entries of other users are
        validated (a bad entry is counted whoever it names) but not fanned out.

        The client is the reader's own: its XREAD replies are taken raw (nested lists of bytes,
        no per-entry dicts), see `_entries`.
        """
        client.set_response_callback("XREAD", _raw_reply)
        self._redis = client
        self._watching = watching
        self._conns: dict[int, redis.asyncio.Connection] = {}  # shard -> its XREAD connection
        self._keys = keys
        self._on_state = on_state
        self._on_gap = on_gap
        self._metrics = metrics
        self.last_ids: dict[int, bytes] = {}
        self._counted: dict[int, int] = {}  # stream additions up to last_ids[shard]
        self._healthy = [False] * keys.shards
        self._running = False
        self._problems: list[str | None] = [None] * keys.shards  # a refused command, per shard
        self._logged: dict[str, float] = {}
        # (run_id, master_replid) of the server each shard's stream was read from; None: unknown
        # (INFO refused), then only the stream's own counts tell another history apart.
        self._identity: dict[int, tuple[str, str] | None] = {}
        self._identities: dict[str, tuple[float, tuple[str, str] | None]] = {}  # node -> (t, id)
        self.positioned = asyncio.Event()  # every shard knows where it starts reading

    @property
    def healthy(self) -> bool:
        """True while the reader runs and every shard's last call to Redis succeeded."""
        return self._running and all(self._healthy)

    @property
    def problem(self) -> str | None:
        """A refused command (e.g. "redis permission denied: xinfo|stream"), or None."""
        return next((p for p in self._problems if p is not None), None)

    async def run(self) -> None:
        """Read all shards until cancelled."""
        self._running = True
        try:
            await asyncio.gather(*(self._read_shard(s) for s in range(self._keys.shards)))
        finally:
            self._running = False

    async def _read_shard(self, shard: int) -> None:
        stream = self._keys.stream(shard)
        failures = 0
        next_check = 0.0
        count = COUNT
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():  # a cancel that a Redis call swallowed
                raise asyncio.CancelledError
            try:
                if shard not in self.last_ids:
                    await self._start_at_tail(shard, stream)
                elif failures:
                    await self._check_position(shard, stream, after_outage=True)
                if self._problems[shard] is None:  # ready without waiting for XREAD's block
                    self._healthy[shard] = True
                reply = await self._xread(shard, stream, count)
                self._healthy[shard] = True
                self._problems[shard] = None
                if failures:
                    log.info("redis_reconnected", shard=shard, after_failures=failures)
                failures = 0
                entries = _entries(reply)
                now = time.monotonic()
                full = len(entries) >= count
                # Behind: read more at once next time (one reply then holds several states of
                # a batch, and only the newest is fanned out). At the tail: back to COUNT.
                count = min(MAX_COUNT, count * 2) if full else COUNT
                if full:  # behind: a trim past us hides in this reply
                    next_check = now + GAP_CHECK_EVERY_S
                    if await self._check_position(shard, stream, reply=entries):
                        continue  # another history: the reply belongs to the lost one
                if entries:
                    await self._consume(shard, entries)
                if not entries or now >= next_check:  # idle (at the tail), or due
                    next_check = now + GAP_CHECK_EVERY_S
                    await self._check_position(shard, stream)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a Redis outage, or a bug in the client: back off, retry
                if task is not None and task.cancelling():  # redis-py turned our cancel
                    raise asyncio.CancelledError from e  # into a connection error
                self._healthy[shard] = False
                if isinstance(e, redis.exceptions.NoPermissionError):
                    self._problems[shard] = f"redis permission denied: {denied(e)}"
                failures += 1
                self._metrics.redis_reconnects.inc()
                delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(failures, 6))
                delay *= random.uniform(0.5, 1.0)
                if not isinstance(e, REDIS_ERRORS):
                    log.exception("reader_failed", shard=shard, retry_in_s=delay)
                elif failures == 1 or failures % 20 == 0:
                    log.warning(
                        "redis_read_failed", shard=shard, retry_in_s=delay, **error_fields(e)
                    )
                await asyncio.sleep(delay)

    async def _xread(self, shard: int, stream: str, count: int) -> Any:
        """XREAD COUNT count BLOCK BLOCK_MS from the shard's position, raw reply.

        On a single Redis each shard keeps one connection of the pool for its XREADs and talks
        to it directly (a third less CPU per call than going through the client's command,
        pool and retry layers); a failed or cancelled call drops the connection (its state is
        unknown mid-reply). A cluster client routes the command itself.
        """
        client = self._redis
        if not isinstance(client, redis.asyncio.Redis):
            return await client.xread({stream: self.last_ids[shard]}, count=count, block=BLOCK_MS)
        conn = self._conns.get(shard)
        if conn is None:
            conn = self._conns[shard] = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_command(
                "XREAD", "COUNT", count, "BLOCK", BLOCK_MS, "STREAMS", stream, self.last_ids[shard]
            )
            return await conn.read_response()
        except BaseException:
            del self._conns[shard]
            await asyncio.shield(_drop(client, conn))
            raise

    async def _stream_info(self, stream: str) -> StreamInfo | None:
        """XINFO STREAM, or None on a Redis older than 7 (no `entries-added`: no gap checks)."""
        try:
            raw: Any = await self._redis.xinfo_stream(stream)
        except redis.ResponseError as e:
            if "no such key" in str(e).lower():
                return StreamInfo()
            raise
        if raw.get("entries-added") is None:
            return None
        first = raw.get("first-entry")
        return StreamInfo(
            length=int(raw["length"]),
            last_generated=_id_tuple(raw["last-generated-id"]),
            entries_added=int(raw["entries-added"]),
            first=_id_tuple(first[0]) if first else None,
        )

    async def _server_identity(self, stream: str, *, fresh: bool) -> tuple[str, str] | None:
        """server_identity of the node holding `stream`, asked at most every
        GAP_CHECK_EVERY_S per node unless `fresh` (all shards of one Redis share one INFO)."""
        node = ""
        if isinstance(self._redis, redis.asyncio.cluster.RedisCluster):
            found = self._redis.get_node_from_key(stream)
            node = found.name if found is not None else ""
        now = time.monotonic()
        cached = self._identities.get(node)
        if not fresh and cached is not None and now - cached[0] < GAP_CHECK_EVERY_S:
            return cached[1]
        identity = await server_identity(self._redis, stream)
        self._identities[node] = (now, identity)
        return identity

    async def _start_at_tail(self, shard: int, stream: str) -> None:
        info = await self._stream_info(stream)  # first: it makes a cluster client find its nodes
        self._identity[shard] = await self._server_identity(stream, fresh=True)
        if info is None:
            last: Any = await self._redis.xrevrange(stream, count=1)
            self.last_ids[shard] = bytes(last[0][0]) if last else b"0-0"
            self._counted[shard] = 0
            self._positioned()
            return
        self.last_ids[shard] = _id_bytes(info.last_generated)
        self._counted[shard] = info.entries_added
        self._positioned()

    def _positioned(self) -> None:
        if len(self.last_ids) == self._keys.shards:
            self.positioned.set()

    async def _check_position(
        self,
        shard: int,
        stream: str,
        *,
        after_outage: bool = False,
        reply: Sequence[tuple[bytes, Any]] = (),
    ) -> bool:
        """Did entries we have not read leave the stream, or is it a new stream? With `reply`,
        an XREAD reply not consumed yet. Returns True after a reset.

        A trim past us: resync the affected users from the batch hashes and read on from where
        we are. A new stream, or any loss found right after an outage (Redis may have restarted
        with a stream that has been written and trimmed since): seqs may have restarted, so the
        resync accepts any seq, and we read on from the new stream's tail.
        """
        info = await self._stream_info(stream)
        if info is None:
            return False
        position = _id_tuple(self.last_ids[shard])
        if await self._other_history(shard, stream, info, position, after_outage=after_outage):
            lost: int | None = -1
        elif reply:
            lost = info.lost_before(position, self._counted[shard], _Ids(reply))
        else:
            lost = info.lost_after(position, self._counted[shard])
        if not lost:
            return False
        reset = lost < 0 or after_outage
        self._metrics.stream_gaps.inc()
        log.warning("stream_gap", shard=shard, reset=reset, lost_entries=max(lost, 0))
        if reset:
            self.last_ids[shard] = _id_bytes(info.last_generated)
            self._counted[shard] = info.entries_added
        else:
            self._counted[shard] += lost
        if self._on_gap is not None:
            self._on_gap(shard, reset)
        return reset

    async def _other_history(
        self, shard: int, stream: str, info: StreamInfo, position: EntryId, *, after_outage: bool
    ) -> bool:
        """Is this another history than the one we read? Checked after every reconnect, and
        at every position check when the server's identity changed (a server that became a
        replica of another master does so without closing our connection).

        The last entry we read tells: when the stream still holds it (and older ones), this
        server's stream is the one we read, up to our position, whatever happened (a restart
        with AOF, a failover to a replica that had everything). When it is gone while older
        entries are there, we read writes this history never had (a replica promoted after it
        missed them). When the stream cannot tell (we are at 0-0, or everything we read was
        trimmed), another server process or replication id (INFO run_id, master_replid: a
        restart, a promotion, a server that became a replica of another master) decides.
        The stream's counts (lost_after) catch the rest: a stream that went back or shrank.
        """
        identity = await self._server_identity(stream, fresh=after_outage)
        before, self._identity[shard] = self._identity.get(shard), identity
        changed = before is not None and identity is not None and identity != before
        if not (changed or after_outage):
            return False
        if position != (0, 0) and info.first is not None and info.first <= position:
            if position > info.last_generated:
                return False  # the stream went back: lost_after says so
            prev: EntryId = (
                (position[0], position[1] - 1) if position[1] else (position[0] - 1, 2**64 - 1)
            )
            found = _entries(await self._redis.xread({stream: _id_bytes(prev)}, count=1))
            if found and _id_tuple(found[0][0]) == position:
                return False  # our last entry is here: the same history up to our position
            log.warning("redis_history_changed", shard=shard, reason="last entry read is gone")
            return True
        if changed:
            assert before is not None and identity is not None
            reason = "server restarted" if identity[0] != before[0] else "replication id changed"
            log.warning("redis_history_changed", shard=shard, reason=reason)
        return changed

    async def _consume(self, shard: int, entries: list[Entry]) -> None:
        """Handle a reply: every entry counts as read and is validated (a bad one is rejected and
        counted, whoever it names); of the valid states of users watched here, only the newest
        per batch is fanned out (entries are absolute states). Fanning out may write to
        thousands of sockets, so the loop is yielded every YIELD_AFTER_S: a burst never starves
        HTTP or the connections."""
        self._metrics.entries_read.inc(len(entries))
        self._counted[shard] += len(entries)
        self.last_ids[shard] = bytes(entries[-1][0])
        watching = self._watching
        states: list[BatchState] = []
        budget_end = time.monotonic() + YIELD_AFTER_S
        for entry_id, flat in entries:
            state = self._parse(entry_id, flat)
            if state is not None and (watching is None or watching(state.user_id)):
                states.append(state)
        for state in newest_per_batch(states) if len(states) > 1 else states:
            try:
                self._on_state(state)
            except Exception:  # a bug downstream must not stop the reader
                log.exception("state_dispatch_failed", batch_id=state.batch_id, seq=state.seq)
            if time.monotonic() >= budget_end:
                await asyncio.sleep(0)
                budget_end = time.monotonic() + YIELD_AFTER_S
        last_id = entries[-1][0]
        self._metrics.reader_lag.set(max(0.0, time.time() * 1000 - _id_tuple(last_id)[0]))

    def _parse(self, entry_id: bytes, flat: Sequence[bytes]) -> BatchState | None:
        try:
            return state_from_flat(flat)
        except BadEntry as e:
            self._reject(entry_id, e.reason, e.detail)
        except Exception as e:  # never let one entry stop the reader
            self._reject(entry_id, "unreadable", repr(e))
        return None

    def _reject(self, entry_id: bytes, reason: str, detail: str) -> None:
        self._metrics.rejected(reason)
        now = time.monotonic()
        if now - self._logged.get(reason, -REJECT_LOG_EVERY_S) >= REJECT_LOG_EVERY_S:
            self._logged[reason] = now
            log.warning(
                "stream_entry_rejected", entry_id=entry_id.decode(), reason=reason, detail=detail
            )


Entry = tuple[bytes, Sequence[bytes]]  # (id, [name, value, name, value, ...])


async def _drop(client: redis.asyncio.Redis, conn: redis.asyncio.Connection) -> None:
    await conn.disconnect()
    await client.connection_pool.release(conn)


def _raw_reply(response: Any, **_options: Any) -> Any:
    """XREAD's reply as Redis sent it: no dict per entry, no RESP3-to-RESP2 conversion."""
    return response


def _entries(reply: Any) -> list[Entry]:
    """The entries of a raw XREAD reply for one stream: RESP3 sends {stream: entries}, RESP2
    [[stream, entries]], and nothing (None / empty) when the block timed out."""
    if not reply:
        return []
    if isinstance(reply, dict):
        entries: list[Entry] = next(iter(reply.values()))
        return entries
    entries = reply[0][1]
    return entries


class _Ids(Sequence[EntryId]):
    """The ids of a reply's entries as EntryId, parsed only where looked at (the gap check
    reads the last one, and bisects only when the stream was trimmed past the reader)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Sequence[tuple[bytes, Any]]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, i: int) -> EntryId: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[EntryId]: ...

    def __getitem__(self, i: int | slice) -> EntryId | Sequence[EntryId]:
        if isinstance(i, slice):
            return [_id_tuple(entry_id) for entry_id, _ in self._entries[i]]
        return _id_tuple(self._entries[i][0])


def _id_tuple(entry_id: bytes | str) -> EntryId:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _id_bytes(entry_id: EntryId) -> bytes:
    return f"{entry_id[0]}-{entry_id[1]}".encode()
