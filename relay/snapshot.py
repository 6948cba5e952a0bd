"""Reading a user's snapshot from Redis: the live batches, most recently updated first, capped.

A user may own tens of thousands of batches. The read is paced (pipelines of SNAPSHOT_READ_CHUNK
keys, one await each, so other connections and HTTP run in between), reads only live members of
the user index (their score is the expiry time), and when there are more than `limit` it first
reads only each batch's `updated_at` to pick the `limit` most recent ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import structlog

from relay.errors import BadEntry
from relay.keys import KeySpace
from relay.redis_client import AsyncClient
from relay.wire import BatchState, state_from_fields

log = structlog.get_logger("relay.snapshot")

SNAPSHOT_READ_CHUNK: Final = 500


async def read_snapshot(
    client: AsyncClient, keys: KeySpace, user_id: str, *, limit: int, now_ms: int
) -> list[BatchState]:
    """The user's live and recently finished batches, most recently updated first, at most
    `limit`. Raises the client's errors (Redis unavailable)."""
    ids: list[bytes] = []
    for shard in range(keys.shards):
        members: Any = await client.zrangebyscore(keys.user_index(shard, user_id), now_ms, "+inf")
        ids += members
    if len(ids) > limit:
        ids = await _most_recent(client, keys, ids, limit)
    states: list[BatchState] = []
    for start in range(0, len(ids), SNAPSHOT_READ_CHUNK):
        pipe = client.pipeline(transaction=False)
        for batch_id in ids[start : start + SNAPSHOT_READ_CHUNK]:
            pipe.hgetall(keys.batch(batch_id.decode()))
        for raw in await pipe.execute():
            state = _decode(raw)
            if state is not None and state.user_id == user_id:
                states.append(state)
    states.sort(key=lambda s: (s.updated_at, s.batch_id), reverse=True)
    return states


async def _most_recent(
    client: AsyncClient, keys: KeySpace, ids: Sequence[bytes], limit: int
) -> list[bytes]:
    stamped: list[tuple[int, bytes]] = []
    for start in range(0, len(ids), SNAPSHOT_READ_CHUNK):
        chunk = ids[start : start + SNAPSHOT_READ_CHUNK]
        pipe = client.pipeline(transaction=False)
        for batch_id in chunk:
            pipe.hget(keys.batch(batch_id.decode()), "updated_at")
        for batch_id, raw in zip(chunk, await pipe.execute(), strict=True):
            if raw is not None and raw.isdigit():
                stamped.append((int(raw), batch_id))
    stamped.sort(reverse=True)
    return [batch_id for _updated, batch_id in stamped[:limit]]


def _decode(raw: Any) -> BatchState | None:
    if not raw:
        return None  # expired between the index read and now
    try:
        return state_from_fields(raw)
    except BadEntry as e:
        log.warning("unreadable_batch_hash_skipped", reason=e.reason, detail=e.detail)
        return None
