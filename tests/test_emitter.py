"""The emit operations end to end: Python SDK (sync and async) and the Lua script on a real Redis.

Each emitter test runs twice, once through `Emitter` and once through `AsyncEmitter` (the `em`
fixture wraps both behind coroutines). Redis state is inspected with a plain sync client.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import structlog
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_server import RedisCluster, RedisServer, free_port
from redis_server import RedisUnavailable as NoRedisBinary

from relay.emitter import SCRIPT, AsyncEmitter, Emitter, RedisUnavailable
from relay.errors import BadArgument, WrongUser
from relay.keys import KeySpace
from relay.wire import MAX_COUNT, STATUSES, TERMINAL, BatchState, state_from_fields

USER = "user-1"
OTHER = "user-2"
# stream length, batch hash, items hash, user index, seen and failed bitmaps
Snapshot = tuple[int, Any, Any, Any, Any, Any]
Call = tuple[str, tuple[object, ...], dict[str, object]]  # op, positional args, keyword args


@dataclass
class Em:
    """One emitter, sync or async, driven through coroutines so a test body serves both."""

    emitter: Emitter | AsyncEmitter
    r: redis.Redis  # sync client on the same server, for inspection
    keys: KeySpace

    async def call(self, op: str, *args: object, **kwargs: object) -> Any:
        result = getattr(self.emitter, op)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    async def run(self, op: str, *args: object, **kwargs: object) -> BatchState:
        state = await self.call(op, *args, **kwargs)
        assert isinstance(state, BatchState)
        return state

    def stream(self, batch_id: str) -> bytes:
        return self.keys.stream(self.keys.shard_of(batch_id)).encode()

    def xlen(self, batch_id: str) -> int:
        return int(self.r.xlen(self.stream(batch_id)))

    def last_entry(self, batch_id: str) -> BatchState:
        raw: Any = self.r.xrevrange(self.stream(batch_id), count=1)
        [(_, fields)] = raw
        return state_from_fields(fields)

    def snapshot(self, batch_id: str, user_id: str = USER) -> Snapshot:
        shard = self.keys.shard_of(batch_id)
        return (
            self.xlen(batch_id),
            self.r.hgetall(self.keys.batch(batch_id)),
            self.r.hgetall(self.keys.items(batch_id)),
            self.r.zrange(self.keys.user_index(shard, user_id), 0, -1, withscores=True),
            self.r.get(self.keys.seen(batch_id)),
            self.r.get(self.keys.failed(batch_id)),
        )

    def server_ms(self) -> int:
        sec, usec = self.r.time()
        return int(sec) * 1000 + int(usec) // 1000


MakeEm = Callable[..., Em]


@pytest.fixture(params=["sync", "async"])
def make_em(
    request: pytest.FixtureRequest,
    redis_client: redis.Redis,
    aredis: redis.asyncio.Redis,
    prefix: str,
) -> MakeEm:
    def make(**kwargs: Any) -> Em:
        kwargs.setdefault("prefix", prefix)
        emitter: Emitter | AsyncEmitter
        if request.param == "sync":
            emitter = Emitter(redis_client, **kwargs)
        else:
            emitter = AsyncEmitter(aredis, **kwargs)
        return Em(emitter, redis_client, KeySpace(kwargs["prefix"], kwargs.get("shards", 1)))

    return make


@pytest.fixture
def em(make_em: MakeEm) -> Em:
    return make_em()


def counters(s: BatchState) -> tuple[str, int, int, int, int]:
    return (s.status, s.total, s.processed, s.successful, s.failed)


async def poll(predicate: Callable[[], Any], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------------------------
# Each op, its effect, the stream entry it appends


@pytest.mark.parametrize(
    ("op", "args", "kwargs", "expected"),
    [
        ("start", (7,), {"label": "Import"}, ("pending", 7, 0, 0, 0)),
        ("item", ("row-1",), {"ok": False}, ("processing", 0, 1, 0, 1)),
        ("incr", (), {"successful": 2, "failed": 1}, ("processing", 0, 3, 2, 1)),
        ("incr", (), {}, ("pending", 0, 0, 0, 0)),
        ("set", (), {"total": 4, "successful": 1}, ("processing", 4, 1, 1, 0)),
        ("set", (), {"status": "processing"}, ("processing", 0, 0, 0, 0)),
        ("finish", (), {}, ("completed", 0, 0, 0, 0)),
        ("finish", ("cancelled",), {}, ("cancelled", 0, 0, 0, 0)),
    ],
)
async def test_any_op_creates_a_missing_batch(
    em: Em, op: str, args: tuple[object, ...], kwargs: dict[str, object], expected: tuple[Any, ...]
) -> None:
    t0 = em.server_ms()
    state = await em.run(op, "b1", USER, *args, **kwargs)
    t1 = em.server_ms()
    assert counters(state) == expected
    assert (state.batch_id, state.user_id, state.seq) == ("b1", USER, 1)
    assert t0 <= state.started_at == state.updated_at <= t1
    assert state.label == ("Import" if op == "start" else None)
    assert await em.call("get", "b1") == state
    assert em.xlen("b1") == 1
    assert em.last_entry("b1") == state


async def test_each_change_appends_exactly_one_entry_matching_the_state(em: Em) -> None:
    steps: list[tuple[str, tuple[object, ...], dict[str, object], bool, tuple[Any, ...]]] = [
        ("start", (10,), {"label": "L"}, True, ("pending", 10, 0, 0, 0)),
        ("item", ("a",), {}, True, ("processing", 10, 1, 1, 0)),
        ("item", ("a",), {}, False, ("processing", 10, 1, 1, 0)),
        ("item", ("b",), {"ok": False}, True, ("processing", 10, 2, 1, 1)),
        ("item", ("b",), {"ok": True}, True, ("processing", 10, 2, 2, 0)),
        ("incr", (), {"successful": 2, "failed": 1}, True, ("processing", 10, 5, 4, 1)),
        ("incr", (), {}, False, ("processing", 10, 5, 4, 1)),
        ("start", (10,), {"label": "L"}, False, ("processing", 10, 5, 4, 1)),
        ("start", (10,), {}, False, ("processing", 10, 5, 4, 1)),
        ("start", (12,), {"label": ""}, True, ("processing", 12, 5, 4, 1)),
        ("set", (), {"total": 20}, True, ("processing", 20, 5, 4, 1)),
        ("set", (), {"status": "processing"}, False, ("processing", 20, 5, 4, 1)),
        ("finish", ("failed",), {}, True, ("failed", 20, 5, 4, 1)),
        ("finish", ("failed",), {}, False, ("failed", 20, 5, 4, 1)),
        ("item", ("c",), {}, True, ("failed", 20, 6, 5, 1)),
        ("set", (), {"status": "processing"}, True, ("processing", 20, 6, 5, 1)),
    ]
    prev: BatchState | None = None
    for op, args, kwargs, changes, expected in steps:
        before = em.xlen("b1")
        state = await em.run(op, "b1", USER, *args, **kwargs)
        where = f"{op}{args}{kwargs}"
        assert counters(state) == expected, where
        assert em.xlen("b1") == before + changes, where
        assert em.last_entry("b1") == (state if changes else prev), where
        assert await em.call("get", "b1") == state, where
        if prev is not None:
            assert state.started_at == prev.started_at
            assert state.seq == prev.seq + changes, where
            assert state.updated_at >= prev.updated_at
            if not changes:
                assert state == prev, where
        prev = state
    assert prev is not None
    assert prev.label is None  # cleared by start(label="")
    assert prev.seq == sum(step[3] for step in steps) == em.xlen("b1")


async def test_times_are_redis_server_time(em: Em) -> None:
    t0 = em.server_ms()
    first = await em.run("start", "b1", USER, 3)
    t1 = em.server_ms()
    assert t0 <= first.started_at == first.updated_at <= t1
    assert abs(first.updated_at - time.time() * 1000) < 5_000  # ms since the epoch
    await asyncio.sleep(0.02)
    t2 = em.server_ms()
    later = await em.run("item", "b1", USER, "x")
    t3 = em.server_ms()
    assert later.started_at == first.started_at
    assert t2 <= later.updated_at <= t3
    assert later.updated_at > first.updated_at


async def test_label_rules(em: Em) -> None:
    assert (await em.run("start", "b1", USER, 1, label="Import")).label == "Import"
    assert (await em.run("start", "b1", USER, 2)).label == "Import"  # None keeps it
    assert (await em.run("incr", "b1", USER, successful=1)).label == "Import"
    assert (await em.run("start", "b1", USER, 2, label="")).label is None
    assert b"label" not in em.r.hgetall(em.keys.batch("b1"))
    long = "é" * 200  # 200 characters, 400 bytes: the limit counts characters
    assert (await em.run("start", "b1", USER, 2, label=long)).label == long
    assert em.last_entry("b1").label == long


async def test_limits_are_inclusive(em: Em) -> None:
    state = await em.run("start", "x" * 128, "ü" * 128, MAX_COUNT)
    assert (state.total, state.user_id) == (MAX_COUNT, "ü" * 128)
    state = await em.run("item", "x" * 128, "ü" * 128, "€" * 170 + "ab")  # 512 bytes
    assert state.processed == 1
    state = await em.run("set", "b2", USER, processed=MAX_COUNT, successful=MAX_COUNT)
    assert (state.processed, state.successful) == (MAX_COUNT, MAX_COUNT)
    assert em.last_entry("b2") == state


# --------------------------------------------------------------------------------------------
# Refusals change nothing

ALL_OPS_NO_ARGS: list[Call] = [
    ("start", (), {}),
    ("item", (), {}),
    ("items", (), {}),
    ("incr", (), {"successful": 1}),
    ("set", (), {"total": 4}),
    ("finish", (), {}),
]
TOO_BIG = 2**53

BAD_CALLS: list[Call] = [
    ("start", (-1,), {}),
    ("start", (True,), {}),
    ("start", (TOO_BIG,), {}),
    ("start", (1.5,), {}),
    ("start", ("3",), {}),
    ("start", (3,), {"label": "x" * 201}),
    ("start", (3,), {"label": 5}),
    ("item", ("",), {}),
    ("item", ("x" * 513,), {}),
    ("item", ("é" * 257,), {}),  # 514 bytes
    ("item", (7,), {}),
    ("item", ("a",), {"ok": 1}),
    ("item", ("a",), {"ok": None}),
    ("items", ([("", True)],), {}),
    ("items", ([("a", True), ("b", 1)],), {}),
    ("items", ({"a": True, 7: True},), {}),
    ("items", ([("a",)],), {}),
    ("items", ("ab",), {}),
    ("items", (5,), {}),
    ("items", ([("x" * 513, False)],), {}),
    ("incr", (), {"successful": -1}),
    ("incr", (), {"failed": -1}),
    ("incr", (), {"successful": True}),
    ("incr", (), {"failed": TOO_BIG}),
    ("set", (), {}),
    ("set", (), {"status": "done"}),
    ("set", (), {"status": ""}),
    ("set", (), {"total": -1}),
    ("set", (), {"processed": True}),
    ("set", (), {"successful": TOO_BIG}),
    ("set", (), {"failed": -3, "status": "completed"}),
    ("finish", ("pending",), {}),
    ("finish", ("processing",), {}),
    ("finish", ("done",), {}),
]


@pytest.mark.parametrize(("op", "args", "kwargs"), BAD_CALLS, ids=lambda v: repr(v)[:30])
async def test_bad_argument_raises_and_changes_nothing(
    em: Em, op: str, args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    await em.run("start", "b1", USER, 10, label="L")
    await em.run("item", "b1", USER, "a")
    before, missing = em.snapshot("b1"), em.snapshot("b2")
    with pytest.raises(BadArgument):
        await em.call(op, "b1", USER, *args, **kwargs)
    assert em.snapshot("b1") == before
    with pytest.raises(BadArgument):  # nor does it create a missing batch
        await em.call(op, "b2", USER, *args, **kwargs)
    assert em.snapshot("b2") == missing
    assert missing[1:3] == ({}, {})
    assert em.xlen("b1") == 2


BAD_BATCH_IDS: list[object] = ["", "x" * 129, 5, None]
BAD_USER_IDS: list[object] = ["", "u" * 129, 7, None]
BAD_ID_CALLS: list[Call] = [
    *((op, (b, USER), kw) for b in BAD_BATCH_IDS for op, _, kw in ALL_OPS_NO_ARGS),
    *((op, ("b1", u), kw) for u in BAD_USER_IDS for op, _, kw in ALL_OPS_NO_ARGS),
    *(("get", (b,), {}) for b in BAD_BATCH_IDS),
    *(("batches_for", (u,), {}) for u in BAD_USER_IDS),
]


@pytest.mark.parametrize(("op", "args", "kwargs"), BAD_ID_CALLS, ids=lambda v: repr(v)[:24])
async def test_bad_ids_raise(
    em: Em, op: str, args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    extra: tuple[object, ...] = {"start": (1,), "item": ("i",), "items": ({"7": True},)}.get(op, ())
    with pytest.raises(BadArgument):
        await em.call(op, *args, *extra, **kwargs)
    assert em.xlen("b1") == 0


async def test_counter_overflow_is_refused_and_changes_nothing(em: Em) -> None:
    await em.run("set", "b1", USER, processed=MAX_COUNT, successful=MAX_COUNT - 1)
    before = em.snapshot("b1")
    for op, args, kwargs in [
        ("item", ("new",), {}),  # processed + 1
        ("incr", (), {"failed": 1}),
        ("incr", (), {"successful": 1}),
        ("set", (), {"failed": 2}),  # processed recomputed as successful + failed
    ]:
        with pytest.raises(BadArgument, match="overflow"):
            await em.call(op, "b1", USER, *args, **kwargs)
        assert em.snapshot("b1") == before, op


@pytest.mark.parametrize(
    ("op", "args", "kwargs"),
    [
        ("start", (5,), {"label": "mine"}),
        ("item", ("a",), {"ok": False}),
        ("item", ("z",), {}),
        ("items", ({"a": False, "9": True},), {}),
        ("incr", (), {"successful": 1}),
        ("incr", (), {}),
        ("set", (), {"total": 99}),
        ("finish", ("cancelled",), {}),
    ],
)
async def test_wrong_user_raises_and_changes_nothing(
    em: Em, op: str, args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    await em.run("start", "b1", USER, 10)
    await em.run("item", "b1", USER, "a")
    before = em.snapshot("b1")
    with pytest.raises(WrongUser):
        await em.call(op, "b1", OTHER, *args, **kwargs)
    assert em.snapshot("b1") == before
    assert em.snapshot("b1", OTHER)[3] == []  # not in the other user's index either
    assert await em.call("batches_for", OTHER) == []


# --------------------------------------------------------------------------------------------
# Many outcomes per call; numbered ids in bitmaps


def _bit(raw: Any, n: int) -> int:
    if raw is None or n // 8 >= len(raw):
        return 0
    return int(raw[n // 8] >> (7 - n % 8)) & 1


async def test_items_count_like_item_calls_in_order(em: Em) -> None:
    outcomes = [("7", True), ("07", False), ("7", True), ("x", False), ("7", False),
                ("0", True), ("x", True), ("4294967295", False), ("-1", True), ("+7", True),
                ("1e3", True), ("4294967296", True), ("x", True)]  # fmt: skip
    await em.run("start", "one", USER, 20)
    await em.run("start", "many", USER, 20)
    for item_id, ok in outcomes:
        single = await em.run("item", "one", USER, item_id, ok=ok)
    before = em.xlen("many")
    many = await em.run("items", "many", USER, outcomes)
    assert counters(many) == counters(single) == ("processing", 20, 9, 6, 3)
    assert many.seq == 2  # one bump for the whole call
    assert em.xlen("many") == before + 1
    assert em.last_entry("many") == many
    # repeating the whole call changes nothing and appends nothing
    assert await em.run("items", "many", USER, outcomes) == many
    assert em.xlen("many") == before + 1
    # a flip and its flip back in one call: nothing changes either
    assert await em.run("items", "many", USER, [("7", True), ("7", False)]) == many
    # an empty call is a no-op on an existing batch, and creates a missing one (like incr 0)
    assert await em.run("items", "many", USER, []) == many
    assert counters(await em.run("items", "new", USER, {})) == ("pending", 0, 0, 0, 0)


async def test_items_takes_a_mapping_or_pairs(em: Em) -> None:
    state = await em.run("items", "b1", USER, {"1": True, "2": False, "row-3": True})
    assert (state.processed, state.successful, state.failed) == (3, 2, 1)
    state = await em.run("items", "b1", USER, iter([("2", True), ("row-4", False)]))
    assert (state.processed, state.successful, state.failed) == (4, 3, 1)
    state = await em.run("items", "b1", USER, (pair for pair in [("1", False)]))
    assert (state.processed, state.successful, state.failed) == (4, 2, 2)


async def test_numbered_ids_live_in_bitmaps_others_in_the_hash(em: Em) -> None:
    """'7' and '07' are different ids; storage depends only on the id's form."""
    state = await em.run(
        "items",
        "b1",
        USER,
        [
            ("7", True),
            ("07", True),
            ("0", False),
            ("12", True),
            ("12", False),
            ("-1", True),
            ("+7", False),
            ("4294967296", True),
            ("item-7", True),
        ],
    )
    assert (state.processed, state.successful, state.failed) == (8, 5, 3)
    seen, failed = em.r.get(em.keys.seen("b1")), em.r.get(em.keys.failed("b1"))
    assert [n for n in range(16) if _bit(seen, n)] == [0, 7, 12]
    assert [n for n in range(16) if _bit(failed, n)] == [0, 12]
    assert em.r.hgetall(em.keys.items("b1")) == {
        b"07": b"1", b"-1": b"1", b"+7": b"0", b"4294967296": b"1", b"item-7": b"1",
    }  # fmt: skip
    # flips move bits both ways
    state = await em.run("items", "b1", USER, [("12", True), ("7", False), ("07", False)])
    assert (state.processed, state.successful, state.failed) == (8, 4, 4)
    failed = em.r.get(em.keys.failed("b1"))
    assert [n for n in range(16) if _bit(failed, n)] == [0, 7]
    assert em.r.hget(em.keys.items("b1"), "07") == b"0"


async def test_a_sparse_large_number_does_not_grow_a_huge_bitmap(em: Em) -> None:
    """Bitmaps hold ids below 2^24, or larger ones while dense: 4294967295 alone would
    otherwise cost 512 MiB of Redis."""
    state = await em.run("items", "b1", USER, [("4294967295", False), ("16777216", True)])
    assert (state.processed, state.successful, state.failed) == (2, 1, 1)
    assert em.r.exists(em.keys.seen("b1"), em.keys.failed("b1")) == 0
    assert em.r.hgetall(em.keys.items("b1")) == {b"4294967295": b"0", b"16777216": b"1"}
    state = await em.run("items", "b1", USER, [("16777215", True), ("4294967295", True)])
    assert (state.processed, state.successful, state.failed) == (3, 3, 0)
    assert em.r.hget(em.keys.items("b1"), "4294967295") == b"1"
    assert _bit(em.r.get(em.keys.seen("b1")), 16777215) == 1
    assert int(em.r.memory_usage(em.keys.seen("b1")) or 0) < 4_000_000  # 2 MiB + allocator


async def test_numbers_above_the_floor_go_to_the_bitmap_while_it_is_dense(em: Em) -> None:
    await em.run("items", "b1", USER, {"1": True})
    # white box: ids 0 .. 2^20 - 1 in the bitmap, successful (not reported one by one: slow)
    em.r.setrange(em.keys.seen("b1"), 0, b"\xff" * (2**20 // 8))
    await em.run("set", "b1", USER, successful=2**20)
    dense, sparse = 2**24 + 5, 2**24 + 16 * 2**20 + 16  # below / above 16 bits per id
    state = await em.run("items", "b1", USER, [(str(dense), False), (str(sparse), True)])
    assert (state.processed, state.successful, state.failed) == (2**20 + 2, 2**20 + 1, 1)
    assert _bit(em.r.get(em.keys.seen("b1")), dense) == 1
    assert _bit(em.r.get(em.keys.failed("b1")), dense) == 1
    assert em.r.hgetall(em.keys.items("b1")) == {str(sparse).encode(): b"1"}
    assert (await em.run("item", "b1", USER, "12345")).seq == state.seq  # a repeat
    state = await em.run("items", "b1", USER, [(str(sparse), False), (str(dense), True)])
    assert (state.processed, state.successful, state.failed) == (2**20 + 2, 2**20 + 1, 1)
    assert em.r.hgetall(em.keys.items("b1")) == {str(sparse).encode(): b"0"}


async def test_ttls_move_only_when_they_matter(make_em: MakeEm) -> None:
    em = make_em(active_s=3600, finished_s=60)
    await em.run("item", "b1", USER, "a")
    shard = em.keys.shard_of("b1")
    index = em.keys.user_index(shard, USER)
    expires = int(em.r.hget(em.keys.batch("b1"), "expires_at") or 0)
    assert em.r.zscore(index, "b1") == expires
    # more changes within the slack: the expiry and the index stay as they are
    await em.run("item", "b1", USER, "b")
    await em.run("items", "b1", USER, {"5": False})  # a key created now still gets the expiry
    await em.run("incr", "b1", USER, successful=1)
    assert int(em.r.hget(em.keys.batch("b1"), "expires_at") or 0) == expires
    keys = [em.keys.batch("b1"), em.keys.items("b1"), em.keys.seen("b1"), em.keys.failed("b1")]
    assert [em.r.pexpiretime(k) for k in keys] == [expires] * 4
    assert em.r.pexpiretime(index) == expires
    # a terminal status shortens every key at once, and the index follows its longest batch
    await em.run("start", "long", USER, 1)
    finished = await em.run("finish", "b1", USER)
    short = int(em.r.hget(em.keys.batch("b1"), "expires_at") or 0)
    assert short <= finished.updated_at + 60_000 < expires
    assert [em.r.pexpiretime(k) for k in keys] == [short] * 4
    assert em.r.zscore(index, "b1") == short
    longest: Any = em.r.zscore(index, "long")
    assert em.r.pexpiretime(index) == longest > short


BASELINE_SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "baseline_emit.lua"


async def test_a_batch_begun_by_the_previous_script_stays_exact(em: Em) -> None:
    """Upgraded mid-batch: the previous script (bench/baseline_emit.lua, 4 keys, every id in the
    item hash, no expires_at) wrote the first outcomes; the current one goes on exactly."""
    old = em.r.register_script(BASELINE_SCRIPT.read_text())
    keys = em.keys.op_keys("b1", USER)[:4]
    for item_id, ok in [("7", "1"), ("12", "0"), ("x", "1")]:
        old(
            keys=keys,
            args=["item", "b1", USER, "60000", "60000", "1000", "item_id", item_id, "ok", ok],
        )
    em.r.persist(em.keys.batch("b1"))
    before = await em.run("get", "b1")
    assert (before.processed, before.successful, before.failed) == (3, 2, 1)
    assert await em.run("item", "b1", USER, "7") == before  # a repeat, found in the hash
    state = await em.run("items", "b1", USER, [("12", True), ("13", False), ("7", True)])
    assert (state.processed, state.successful, state.failed) == (4, 3, 1)
    assert em.r.hgetall(em.keys.items("b1")) == {b"7": b"1", b"12": b"1", b"x": b"1"}
    assert _bit(em.r.get(em.keys.failed("b1")), 13) == 1
    state = await em.run("item", "b1", USER, "12", ok=False)
    assert (state.processed, state.successful, state.failed) == (4, 2, 2)
    assert 0 < em.r.pttl(em.keys.batch("b1")) <= 86_400_000  # its keys get an expiry again


# --------------------------------------------------------------------------------------------
# Counting rules


async def test_items_count_exactly_once(em: Em) -> None:
    first = await em.run("item", "b1", USER, "a")
    assert (first.processed, first.successful, first.failed, first.seq) == (1, 1, 0, 1)
    again = await em.run("item", "b1", USER, "a")
    assert again == first
    assert em.xlen("b1") == 1
    flipped = await em.run("item", "b1", USER, "a", ok=False)
    assert (flipped.processed, flipped.successful, flipped.failed, flipped.seq) == (1, 0, 1, 2)
    assert await em.run("item", "b1", USER, "a", ok=False) == flipped
    back = await em.run("item", "b1", USER, "a", ok=True)
    assert (back.processed, back.successful, back.failed, back.seq) == (1, 1, 0, 3)
    other = await em.run("item", "b1", USER, "b", ok=False)
    assert (other.processed, other.successful, other.failed) == (2, 1, 1)
    assert em.xlen("b1") == 4
    assert em.r.hgetall(em.keys.items("b1")) == {b"a": b"1", b"b": b"0"}


async def test_item_flip_after_set_lowered_the_counter_keeps_processed_the_sum(em: Em) -> None:
    await em.run("item", "b1", USER, "a")
    await em.run("item", "b1", USER, "b")
    state = await em.run("set", "b1", USER, successful=0)
    assert (state.processed, state.successful, state.failed) == (0, 0, 0)
    state = await em.run("item", "b1", USER, "a", ok=False)
    assert (state.processed, state.successful, state.failed) == (1, 0, 1)
    await em.run("set", "b1", USER, successful=1, failed=0)
    state = await em.run("item", "b1", USER, "a", ok=True)  # a was failed; failed is 0
    assert (state.processed, state.successful, state.failed) == (2, 2, 0)


async def test_incr_is_not_idempotent(em: Em) -> None:
    await em.run("incr", "b1", USER, successful=2)
    state = await em.run("incr", "b1", USER, successful=2, failed=1)
    assert (state.processed, state.successful, state.failed, state.seq) == (5, 4, 1, 2)


async def test_set_semantics(em: Em) -> None:
    state = await em.run("set", "b1", USER, successful=5, failed=2)
    assert (state.processed, state.successful, state.failed) == (7, 5, 2)
    state = await em.run("set", "b1", USER, processed=3)
    assert (state.processed, state.successful, state.failed) == (3, 5, 2)
    state = await em.run("set", "b1", USER, failed=0)  # recomputed from successful + failed
    assert (state.processed, state.successful, state.failed) == (5, 5, 0)
    state = await em.run("set", "b1", USER, processed=9, successful=1, failed=1, total=10)
    assert counters(state) == ("processing", 10, 9, 1, 1)
    state = await em.run("set", "b1", USER, total=9)
    assert state.status == "completed"
    seq = state.seq
    assert (await em.run("set", "b1", USER, total=9, processed=9)).seq == seq  # a no-op


async def test_automatic_transitions(em: Em) -> None:
    assert (await em.run("start", "b1", USER, 3)).status == "pending"
    assert (await em.run("incr", "b1", USER)).status == "pending"
    assert (await em.run("item", "b1", USER, "a", ok=False)).status == "processing"
    assert (await em.run("item", "b1", USER, "b")).status == "processing"
    state = await em.run("item", "b1", USER, "c")
    assert counters(state) == ("completed", 3, 3, 2, 1)
    assert state.progress_percentage == 100.0
    # total 0 never completes by itself
    state = await em.run("incr", "b2", USER, successful=5)
    assert counters(state) == ("processing", 0, 5, 5, 0)
    # lowering total to what was processed completes
    await em.run("start", "b3", USER, 10)
    await em.run("incr", "b3", USER, successful=4)
    assert (await em.run("start", "b3", USER, 4)).status == "completed"
    # over-counting completes too
    assert (await em.run("incr", "b4", USER, successful=3)).status == "processing"
    assert (await em.run("set", "b4", USER, total=2)).status == "completed"


async def test_explicit_status_wins_over_automatic_transitions(em: Em) -> None:
    state = await em.run("set", "b1", USER, status="pending", processed=5, total=5)
    assert counters(state) == ("pending", 5, 5, 0, 0)
    state = await em.run("set", "b1", USER, status="processing", total=4)
    assert state.status == "processing"
    # the next op without a status applies the automatic rules again
    assert (await em.run("incr", "b1", USER, successful=1)).status == "completed"


async def test_terminal_status_is_sticky_but_counters_move(em: Em) -> None:
    await em.run("start", "b1", USER, 10)
    await em.run("item", "b1", USER, "a")
    state = await em.run("finish", "b1", USER, "cancelled")
    seq = state.seq
    later: list[Call] = [
        ("item", ("b",), {"ok": False}),
        ("item", ("a",), {"ok": False}),
        ("incr", (), {"successful": 20}),
        ("start", (50,), {}),
        ("set", (), {"total": 1, "processed": 0}),
        ("set", (), {"successful": 3, "failed": 1}),
    ]
    for op, args, kwargs in later:
        state = await em.run(op, "b1", USER, *args, **kwargs)
        assert state.status == "cancelled", op
        assert state.seq == seq + 1, op
        seq = state.seq
    assert counters(state) == ("cancelled", 1, 4, 3, 1)
    # explicit statuses always apply, even over a terminal one
    assert (await em.run("finish", "b1", USER, "failed")).status == "failed"
    assert (await em.run("set", "b1", USER, status="processing")).status == "processing"
    # and from there the automatic rules are back (processed 4 >= total 1)
    assert (await em.run("incr", "b1", USER, successful=1)).status == "completed"
    # finishing with another terminal status over completed applies
    assert (await em.run("finish", "b1", USER, "failed")).status == "failed"


# --------------------------------------------------------------------------------------------
# The Lua script as another language's worker sees it


def _eval(r: redis.Redis, keys: KeySpace, argv: list[str]) -> Any:
    batch_id, user_id = argv[1], argv[2]
    if not batch_id or not user_id:  # the keys still need some name
        batch_id, user_id = batch_id or "b1", user_id or USER
    return r.eval(SCRIPT, 6, *keys.op_keys(batch_id, user_id), *argv)


def _argv(op: str = "start", *pairs: str, **header: str) -> list[str]:
    base = {"batch_id": "b1", "user_id": USER, "active": "60000", "finished": "60000"}
    base |= {"maxlen": "1000"} | header
    return [op, base["batch_id"], base["user_id"], base["active"], base["finished"],
            base["maxlen"], *pairs]  # fmt: skip


EVAL_BAD: list[list[str]] = [
    _argv("start", "total", "5", active="0"),
    _argv("start", "total", "5", active="-1"),
    _argv("start", "total", "5", active="1.5"),  # was accepted, then PEXPIRE failed mid-write
    _argv("start", "total", "5", finished="1e3"),
    _argv("start", "total", "5", finished="0x10"),
    _argv("start", "total", "5", finished=""),
    _argv("start", "total", "5", maxlen="0"),
    _argv("start", "total", "5", maxlen="2.5"),  # XADD would fail after HSET
    _argv("start", "total", "5", maxlen="many"),
    _argv("explode", "total", "5"),
    _argv("start", "total", "5", batch_id=""),
    _argv("start", "total", "5", batch_id="x" * 129),
    _argv("start", "total", "5", user_id=""),
    _argv("start", "total", "5", user_id="u" * 129),
    _argv("start"),
    _argv("start", "total"),
    _argv("start", "total", "-1"),
    _argv("start", "total", "1.5"),
    _argv("start", "total", "abc"),
    _argv("start", "total", ""),
    _argv("start", "total", "9007199254740992"),
    _argv("start", "total", "00000000000000001"),  # 17 digits
    _argv("start", "total", "5", "label", "x" * 201),
    _argv("item", "ok", "1"),
    _argv("item", "item_id", "", "ok", "1"),
    _argv("item", "item_id", "x" * 513, "ok", "1"),
    _argv("item", "item_id", "a", "ok", "2"),
    _argv("item", "item_id", "a", "ok", "true"),
    _argv("item", "item_id", "a"),
    _argv("items", "a"),
    _argv("items", "a", "1", "b"),
    _argv("items", "a", "2"),
    _argv("items", "7", "1", "", "1"),
    _argv("items", "7", "1", "x" * 513, "0"),
    _argv("incr", "successful", "-1"),
    _argv("incr", "failed", "1", "successful", "x"),
    _argv("set"),
    _argv("set", "status", "done"),
    _argv("set", "total", "3", "processed", "-3"),
    _argv("finish"),
    _argv("finish", "status", "pending"),
]


@pytest.mark.parametrize("argv", EVAL_BAD, ids=lambda a: " ".join(a[:1] + a[3:])[:40])
def test_script_refuses_bad_argv_with_badarg(
    redis_client: redis.Redis, prefix: str, argv: list[str]
) -> None:
    keys = KeySpace(prefix)
    emitter = Emitter(redis_client, prefix=prefix)
    emitter.start("b1", USER, 10, label="L")
    emitter.item("b1", USER, "a")
    em = Em(emitter, redis_client, keys)
    before = em.snapshot("b1")
    with pytest.raises(redis.ResponseError, match=r"^BADARG "):
        _eval(redis_client, keys, argv)
    assert em.snapshot("b1") == before


def test_script_called_directly(redis_client: redis.Redis, prefix: str) -> None:
    keys = KeySpace(prefix)
    reply = _eval(redis_client, keys, _argv("start", "total", "3", "label", "From Go"))
    flat = [x.decode() for x in reply]
    state = state_from_fields(dict(zip(flat[::2], flat[1::2], strict=True)))
    assert counters(state) == ("pending", 3, 0, 0, 0)
    assert state.label == "From Go"
    sha = redis_client.script_load(SCRIPT)
    argv = _argv("item", "item_id", "a", "ok", "0")
    reply = redis_client.evalsha(sha, 6, *keys.op_keys("b1", USER), *argv)
    assert dict(zip(reply[::2], reply[1::2], strict=True))[b"failed"] == b"1"
    with pytest.raises(redis.ResponseError, match=r"^WRONGUSER "):
        _eval(redis_client, keys, _argv("incr", "successful", "1", user_id=OTHER))
    assert redis_client.hget(keys.batch("b1"), "seq") == b"2"


# --------------------------------------------------------------------------------------------
# Layout, reads, retention


async def test_shards_route_batches_to_their_stream(make_em: MakeEm) -> None:
    em = make_em(shards=4)
    batch_ids = [f"batch-{i}" for i in range(24)]
    for batch_id in batch_ids:
        await em.run("start", batch_id, USER, 1)
    shards = {em.keys.shard_of(b) for b in batch_ids}
    assert len(shards) > 1
    for shard in range(4):
        entries: Any = em.r.xrange(em.keys.stream(shard))
        got = sorted(state_from_fields(f).batch_id for _, f in entries)
        assert got == sorted(b for b in batch_ids if em.keys.shard_of(b) == shard)
    for batch_id in batch_ids:
        assert em.r.exists(em.keys.batch(batch_id))
        assert em.keys.batch(batch_id).startswith(em.keys.tag(em.keys.shard_of(batch_id)))
    found = await em.call("batches_for", USER)
    assert sorted(s.batch_id for s in found) == sorted(batch_ids)


async def test_get_and_batches_for(make_em: MakeEm) -> None:
    em = make_em(shards=2)
    short = make_em(shards=2, active_s=1, finished_s=1)
    assert await em.call("get", "nope") is None
    assert await em.call("batches_for", USER) == []
    mine = []
    for i in range(5):
        mine.append(await em.run("start", f"mine-{i}", USER, 10, label=f"#{i}"))
    theirs = await em.run("item", "theirs", OTHER, "x")
    await em.run("finish", "mine-1", USER)  # recently finished ones are listed too
    fleeting = await short.run("start", "fleeting", USER, 1)
    assert await em.call("get", "theirs") == theirs
    got = await em.call("batches_for", USER)
    assert {s.batch_id for s in got} == {s.batch_id for s in mine} | {"fleeting"}
    assert got == sorted(got, key=lambda s: (s.started_at, s.batch_id))
    assert all(s.user_id == USER for s in got)
    assert fleeting in got
    assert await em.call("batches_for", OTHER) == [theirs]
    assert await em.call("batches_for", "nobody") == []

    async def gone() -> bool:
        states = await em.call("batches_for", USER)
        return "fleeting" not in {s.batch_id for s in states}

    await poll(gone)
    assert await em.call("get", "fleeting") is None
    assert len(await em.call("batches_for", USER)) == 5


async def test_keys_expire(make_em: MakeEm) -> None:
    em = make_em(active_s=1, finished_s=1)
    await em.run("start", "b1", USER, 10)
    await em.run("item", "b1", USER, "a")
    shard = em.keys.shard_of("b1")
    keys = [em.keys.batch("b1"), em.keys.items("b1"), em.keys.user_index(shard, USER)]
    for key in keys:
        assert 0 < em.r.pttl(key) <= 1000, key
    await poll(lambda: em.r.exists(*keys) == 0)
    assert await em.call("get", "b1") is None
    assert await em.call("batches_for", USER) == []


async def test_finished_batches_expire_sooner(make_em: MakeEm) -> None:
    em = make_em(active_s=60, finished_s=1)
    await em.run("item", "b1", USER, "a")
    for key in (em.keys.batch("b1"), em.keys.items("b1")):
        assert 1000 < em.r.pttl(key) <= 60_000
    await em.run("finish", "b1", USER, "failed")
    for key in (em.keys.batch("b1"), em.keys.items("b1")):
        assert 0 < em.r.pttl(key) <= 1000
    index = em.keys.user_index(em.keys.shard_of("b1"), USER)
    assert 0 < em.r.pttl(index) <= 60_000  # the index outlives every batch it lists


async def test_stream_is_capped(make_em: MakeEm) -> None:
    em = make_em(stream_maxlen=100)
    for i in range(2_000):
        await em.run("incr", f"b{i % 7}", USER, successful=1)
    assert 100 <= em.xlen("b0") < 500


# --------------------------------------------------------------------------------------------
# Redis outages


def _dead_clients() -> tuple[redis.Redis, redis.asyncio.Redis]:
    """Clients pointing at a port nobody listens on (no retries: each op fails fast)."""
    port = free_port()
    opts: dict[str, Any] = {"port": port, "socket_connect_timeout": 0.5}
    return (
        redis.Redis(**opts, retry=Retry(NoBackoff(), 0)),
        redis.asyncio.Redis(**opts, retry=AsyncRetry(NoBackoff(), 0)),
    )


ALL_OPS: list[Call] = [
    ("start", (3,), {}),
    ("item", ("a",), {}),
    ("items", ({"a": True, "7": False},), {}),
    ("incr", (), {"successful": 1}),
    ("set", (), {"total": 4}),
    ("finish", (), {}),
]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_best_effort_swallows_outages(kind: str) -> None:
    sync_client, async_client = _dead_clients()
    try:
        client = sync_client if kind == "sync" else async_client
        lenient = Em(_emitter(client, best_effort=True), sync_client, KeySpace())
        strict = Em(_emitter(client, best_effort=False), sync_client, KeySpace())
        for op, args, kwargs in ALL_OPS:
            with structlog.testing.capture_logs() as logs:
                assert await lenient.call(op, "b1", USER, *args, **kwargs) is None
            warnings = [e for e in logs if e["log_level"] == "warning"]
            assert len(warnings) == 1, logs
            assert (warnings[0]["op"], warnings[0]["batch_id"]) == (op, "b1")
            with pytest.raises(RedisUnavailable):
                await strict.call(op, "b1", USER, *args, **kwargs)
        # refusals are never swallowed
        with pytest.raises(BadArgument):
            await lenient.call("incr", "b1", USER, successful=-1)
        with pytest.raises(BadArgument):
            await lenient.call("finish", "b1", USER, "processing")
    finally:
        sync_client.close()
        await async_client.aclose()


def _emitter(client: redis.Redis | redis.asyncio.Redis, **kwargs: Any) -> Emitter | AsyncEmitter:
    if isinstance(client, redis.asyncio.Redis):
        return AsyncEmitter(client, **kwargs)
    return Emitter(client, **kwargs)


async def test_best_effort_does_not_swallow_refusals(make_em: MakeEm) -> None:
    em = make_em(best_effort=True)
    await em.run("start", "b1", USER, 3)
    with pytest.raises(WrongUser):
        await em.call("item", "b1", OTHER, "a")
    await em.run("set", "b1", USER, processed=MAX_COUNT)
    with pytest.raises(BadArgument, match="overflow"):
        await em.call("item", "b1", USER, "a")


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_best_effort_survives_a_redis_crash(
    kind: str, redis_server_factory: Callable[..., RedisServer]
) -> None:
    server = redis_server_factory()
    sync_client = redis.Redis.from_url(
        server.url, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    async_client = redis.asyncio.Redis.from_url(
        server.url, socket_connect_timeout=0.5, retry=AsyncRetry(NoBackoff(), 0)
    )
    try:
        client = sync_client if kind == "sync" else async_client
        em = Em(_emitter(client, best_effort=True), sync_client, KeySpace())
        assert (await em.run("item", "b1", USER, "a")).processed == 1
        server.kill()
        with structlog.testing.capture_logs() as logs:
            assert await em.call("item", "b1", USER, "b") is None
        assert [e["event"] for e in logs] == ["progress_report_failed"]
        server.restart()  # no persistence: the batch starts over
        await poll(lambda: em.call("item", "b1", USER, "c"))
        assert (await em.run("get", "b1")).processed == 1
    finally:
        sync_client.close()
        await async_client.aclose()


def test_cli_emit_items_reads_stdin(redis_url: str, redis_client: redis.Redis, prefix: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env |= {"RELAY_REDIS_URL": redis_url, "RELAY_REDIS_PREFIX": prefix}
    lines = "1\n2\tfailed\n\nfile a.txt\tok\n1\tfailed\n07\n3\r\n"

    def emit(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "relay.cli", "emit", "items", "b1", USER, *args]
        return subprocess.run(cmd, input=stdin, env=env, capture_output=True, text=True, timeout=30)

    out = emit("--chunk", "2", stdin=lines)
    assert out.returncode == 0, out.stderr
    final = json.loads(out.stdout)
    assert (final["processed"], final["successful"], final["failed"]) == (5, 3, 2)
    assert final["seq"] == 3  # chunks [1, 2], [file a.txt, 1], [07, 3]
    out = emit("--failed", stdin="4\n5\tok\n")
    assert json.loads(out.stdout)["failed"] == 3
    out = emit(stdin="6\tmaybe\n")
    assert out.returncode == 1 and "line 1" in out.stderr
    assert Emitter(redis_client, prefix=prefix).get("b1") == state_from_fields(
        {k: str(v) for k, v in json.loads(emit(stdin="").stdout).items() if v is not None}
        | {"v": "1", "user_id": USER}
    )


# --------------------------------------------------------------------------------------------
# Least-privilege workers: a refused command changes nothing


@dataclass
class AclCase:
    denied: str
    existing: bool  # the batch exists before the refused call
    op: str
    args: tuple[object, ...] = ()
    kwargs: dict[str, object] = field(default_factory=dict)


SCATTERED = {str(n): n % 3 != 0 for n in range(0, 40_000, 997)}  # read and written by BITFIELD
ACL_CASES = [
    AclCase("xadd", True, "item", ("b",)),
    AclCase("xadd", False, "item", ("a",)),
    AclCase("xadd", True, "items", ({"1": True, "x": False, "2": False},)),
    AclCase("hset", True, "item", ("b",)),
    AclCase("hset", False, "start", (5,)),
    AclCase("pexpireat", False, "item", ("7",)),
    AclCase("pexpireat", True, "item", ("7",)),  # a new bitmap gets the batch's expiry
    AclCase("zadd", False, "item", ("7",)),
    AclCase("zadd", True, "finish", ("failed",)),  # the index follows the shorter TTL
    AclCase("zremrangebyscore", False, "incr", (), {"successful": 1}),
    AclCase("zrange", True, "finish", ()),
    AclCase("hdel", True, "start", (5,), {"label": ""}),
    AclCase("bitfield", True, "items", (SCATTERED,)),
    AclCase("setrange", True, "items", ({"1": True, "2": False},)),
    AclCase("getrange", True, "items", ({"1": True, "2": False},)),
    AclCase("exists", True, "item", ("3",)),
    AclCase("hmget", True, "item", ("x",)),
    AclCase("time", True, "item", ("x",)),
]


@pytest.mark.parametrize("case", ACL_CASES, ids=lambda c: f"{c.denied}-{c.op}-{c.existing}")
def test_a_refused_command_changes_nothing(
    case: AclCase, redis_server_factory: Callable[..., RedisServer]
) -> None:
    server = redis_server_factory()
    admin = server.client()
    admin.acl_setuser(
        "worker", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", f"-{case.denied}"]
    )
    worker = redis.Redis(
        port=server.port, username="worker", password="pw", retry=Retry(NoBackoff(), 0)
    )
    keys = KeySpace()
    as_admin = Emitter(admin, active_s=3600, finished_s=60)
    as_worker = Emitter(worker, active_s=3600, finished_s=60)
    if case.existing:
        as_admin.start("b1", USER, 10, label="L")
        as_admin.item("b1", USER, "a")
    em = Em(as_admin, admin, keys)
    before = em.snapshot("b1")
    refused = "no permissions to run the emit script|can't run this command"
    with pytest.raises(RedisUnavailable, match=refused):
        getattr(as_worker, case.op)("b1", USER, *case.args, **case.kwargs)
    assert em.snapshot("b1") == before
    # granted, the same call goes through and counts once
    admin.acl_setuser("worker", enabled=True, commands=[f"+{case.denied}"])
    state = getattr(as_worker, case.op)("b1", USER, *case.args, **case.kwargs)
    assert isinstance(state, BatchState)
    assert state.seq == (2 if case.existing else 0) + 1
    assert as_admin.get("b1") == state
    assert em.xlen("b1") == state.seq
    worker.close()
    admin.close()


# --------------------------------------------------------------------------------------------
# Buffered reporters


@dataclass
class Rep:
    """A reporter of either kind, driven through coroutines (like Em)."""

    em: Em

    def open(self, batch_id: str, **kwargs: Any) -> Any:
        return self.em.emitter.reporter(batch_id, USER, **kwargs)

    @staticmethod
    async def enter(reporter: Any) -> Any:
        if hasattr(reporter, "__aenter__"):
            return await reporter.__aenter__()
        return reporter.__enter__()

    @staticmethod
    async def exit(reporter: Any, error: BaseException | None = None) -> None:
        et = type(error) if error else None
        if hasattr(reporter, "__aexit__"):
            await reporter.__aexit__(et, error, None)
        else:
            await asyncio.to_thread(reporter.__exit__, et, error, None)

    async def processed(self, batch_id: str) -> int:
        state = await self.em.call("get", batch_id)
        return 0 if state is None else int(state.processed)


async def test_reporter_flushes_at_max_items_and_on_exit(em: Em) -> None:
    rep = Rep(em)
    r = await Rep.enter(rep.open("b1", flush_ms=60_000, max_items=3))
    for item_id, ok in [("1", True), ("2", False), ("1", False)]:  # "1" twice: 2 outcomes
        r.item(item_id, ok=ok)
    r.item("row-3")

    async def three() -> bool:
        return await rep.processed("b1") == 3

    await poll(three)
    r.item("4")  # waits for the next flush: max_items is not reached, flush_ms is a minute
    await asyncio.sleep(0.1)
    assert await rep.processed("b1") == 3
    await Rep.exit(r)
    state = await em.run("get", "b1")
    assert (state.processed, state.successful, state.failed) == (4, 2, 2)
    assert state.seq == 2  # two flushes, one entry each
    assert r.state == state


async def test_reporter_flushes_every_flush_ms(em: Em) -> None:
    rep = Rep(em)
    r = await Rep.enter(rep.open("b1", flush_ms=20, max_items=1000))
    try:
        r.item("1")

        async def one() -> bool:
            return await rep.processed("b1") == 1

        await poll(one)  # nothing else would flush it before the exit
        r.item("2", ok=False)

        async def two() -> bool:
            return await rep.processed("b1") == 2

        await poll(two)
    finally:
        await Rep.exit(r)


async def test_reporter_refusals_raise(em: Em) -> None:
    await em.run("start", "theirs", OTHER, 5)
    rep = Rep(em)
    r = await Rep.enter(rep.open("b1"))
    with pytest.raises(BadArgument):
        r.item("")
    with pytest.raises(BadArgument):
        r.item("a", ok=1)
    await Rep.exit(r)
    with pytest.raises(BadArgument):
        rep.open("b1", flush_ms=0)
    with pytest.raises(BadArgument):
        rep.open("b1", max_items=0)
    r = await Rep.enter(Rep(em).em.emitter.reporter("theirs", USER))
    r.item("x")
    with pytest.raises(WrongUser):
        await Rep.exit(r)
    assert counters(await em.run("get", "theirs")) == ("pending", 5, 0, 0, 0)


@pytest.mark.timeout(30)
def test_sync_reporter_is_thread_safe(redis_client: redis.Redis, prefix: str) -> None:
    emitter = Emitter(redis_client, prefix=prefix)
    threads, per_thread = 8, 3_000
    with emitter.reporter("b1", USER, flush_ms=5, max_items=500) as r:

        def work(t: int) -> None:
            for n in range(per_thread):
                i = t * per_thread + n
                r.item(str(i), ok=False)  # every id failed first...
            for n in range(per_thread):
                i = t * per_thread + n
                r.item(str(i), ok=i % 10 != 0)  # ...then its final outcome

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
    state = emitter.get("b1")
    assert state is not None
    total = threads * per_thread
    assert (state.processed, state.successful, state.failed) == (
        total,
        total * 9 // 10,
        total // 10,
    )


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_best_effort_reporter_retries_a_failed_flush(
    kind: str, redis_server_factory: Callable[..., RedisServer]
) -> None:
    server = redis_server_factory()
    sync_client = redis.Redis.from_url(
        server.url, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    async_client = redis.asyncio.Redis.from_url(
        server.url, socket_connect_timeout=0.5, retry=AsyncRetry(NoBackoff(), 0)
    )
    try:
        client = sync_client if kind == "sync" else async_client
        em = Em(_emitter(client, best_effort=True), sync_client, KeySpace())
        rep = Rep(em)
        with structlog.testing.capture_logs() as logs:
            r = await Rep.enter(rep.open("b1", flush_ms=20, max_items=1000))
            r.item("1")
            await poll(lambda: rep.processed("b1"))
            server.kill()
            r.item("2", ok=False)
            r.item("row-3")
            await poll(lambda: any(e["event"] == "progress_flush_failed" for e in logs))
            server.restart()  # no persistence: "1" is gone; the retried flush brings the rest
            r.item("4")

            async def delivered() -> bool:
                return await rep.processed("b1") == 3

            await poll(delivered)
            await Rep.exit(r)
        state = await em.run("get", "b1")
        assert (state.processed, state.successful, state.failed) == (3, 2, 1)
        assert all(e["log_level"] == "warning" for e in logs)
        # an outage at the exit: the rest is logged as lost, never raised
        r = await Rep.enter(rep.open("b2", flush_ms=60_000))
        r.item("9")
        server.kill()
        with structlog.testing.capture_logs() as logs:
            await Rep.exit(r)
        assert [(e["event"], e["outcomes"]) for e in logs] == [("progress_report_lost", 1)]
    finally:
        sync_client.close()
        await async_client.aclose()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_strict_reporter_raises_an_outage(kind: str) -> None:
    sync_client, async_client = _dead_clients()
    try:
        client = sync_client if kind == "sync" else async_client
        rep = Rep(Em(_emitter(client), sync_client, KeySpace()))
        r = await Rep.enter(rep.open("b1", flush_ms=60_000))
        r.item("1")
        with pytest.raises(RedisUnavailable):
            await Rep.exit(r)
    finally:
        sync_client.close()
        await async_client.aclose()


# --------------------------------------------------------------------------------------------
# Redis Cluster outages are outages too


async def _cluster_ops(lenient: Em, strict: Em) -> None:
    for op, args, kwargs in ALL_OPS:
        with structlog.testing.capture_logs() as logs:
            assert await lenient.call(op, "b1", USER, *args, **kwargs) is None
        assert [(e["event"], e["op"]) for e in logs] == [("progress_report_failed", op)]
        assert logs[0]["error_type"] == "RedisClusterException", logs[0]
        with pytest.raises(RedisUnavailable):
            await strict.call(op, "b1", USER, *args, **kwargs)
    rep = Rep(lenient)
    with structlog.testing.capture_logs() as logs:
        r = await Rep.enter(rep.open("b1", flush_ms=60_000))
        r.item("1")
        await Rep.exit(r)
    assert [e["event"] for e in logs] == ["progress_report_lost"]


async def test_best_effort_swallows_an_unreachable_async_cluster() -> None:
    # redis-py 8's asyncio RedisCluster connects on its first command
    client = redis.asyncio.cluster.RedisCluster(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5
    )
    try:
        lenient = Em(AsyncEmitter(client, best_effort=True), redis.Redis(), KeySpace())
        strict = Em(AsyncEmitter(client), redis.Redis(), KeySpace())
        await _cluster_ops(lenient, strict)
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_best_effort_swallows_a_lost_sync_cluster() -> None:
    # the sync RedisCluster connects in its constructor (raising RedisClusterException when
    # no seed answers, before any emitter exists): build it on a live cluster, then lose it
    try:
        cluster = RedisCluster().start()
    except NoRedisBinary as e:
        pytest.skip(f"no Redis cluster: {e}")
    client = None
    try:
        client = redis.cluster.RedisCluster(
            host="127.0.0.1", port=cluster.servers[0].port, socket_connect_timeout=0.5
        )
        for s in cluster.servers:
            s.kill()
        lenient = Em(Emitter(client, best_effort=True), redis.Redis(), KeySpace())
        strict = Em(Emitter(client), redis.Redis(), KeySpace())
        await _cluster_ops(lenient, strict)
    finally:
        if client is not None:
            client.close()
        cluster.stop()


# --------------------------------------------------------------------------------------------
# Concurrency: nothing lost, nothing doubled


@pytest.mark.timeout(30)
async def test_concurrent_async_reports_are_exact(aredis: redis.asyncio.Redis, prefix: str) -> None:
    emitter = AsyncEmitter(aredis, prefix=prefix)
    items, tasks = 2_000, 50
    await emitter.start("b1", USER, items)
    flaky = {i for i in range(items) if i % 10 == 3}  # 10%: reported failed, then ok
    plans: list[list[tuple[str, bool]]] = [[] for _ in range(tasks)]
    for i in range(items):
        if i in flaky:  # ordered: both reports from one task
            plans[i % tasks] += [(f"item-{i}", False), (f"item-{i}", True)]
        else:  # the same outcome twice, from two different tasks
            plans[i % tasks].append((f"item-{i}", True))
            plans[(i + tasks // 2) % tasks].append((f"item-{i}", True))

    async def worker(plan: list[tuple[str, bool]]) -> None:
        for item_id, ok in plan:
            await emitter.item("b1", USER, item_id, ok=ok)

    await asyncio.gather(*(worker(p) for p in plans))
    state = await emitter.get("b1")
    assert state is not None
    assert counters(state) == ("completed", items, items, items, 0)
    assert state.seq == 1 + items + len(flaky)  # start, first reports, flips: nothing else
    stream = KeySpace(prefix).stream(0)
    assert await aredis.xlen(stream) == state.seq
    entries: Any = await aredis.xrange(stream)
    seqs = [int(f[b"seq"]) for _, f in entries]
    assert seqs == list(range(1, state.seq + 1))


def _process_worker(url: str, prefix: str, worker: int, go: Any) -> None:
    """Runs in a spawned process: items [250w, 250w + 500) mod 1000, plus 50 incr(1)."""
    client = redis.Redis.from_url(url)
    emitter = Emitter(client, prefix=prefix)
    go.wait(10)
    for n in range(500):
        i = (250 * worker + n) % 1000
        emitter.item("b1", USER, f"item-{i}", ok=i % 10 != 0)
        if n % 10 == 0:
            emitter.incr("b1", USER, successful=1)
    client.close()


@pytest.mark.timeout(60)
def test_concurrent_processes_report_exactly(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    Emitter(redis_client, prefix=prefix).start("b1", USER, 2_000)
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_process_worker, args=(redis_url, prefix, w, go)) for w in range(4)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(45)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    state = Emitter(redis_client, prefix=prefix).get("b1")
    assert state is not None
    # every item reported by two processes; 10% failed; 4 x 50 incr(successful=1)
    assert counters(state) == ("processing", 2_000, 1_200, 1_100, 100)
    assert state.seq == 1 + 1_000 + 200
    assert redis_client.xlen(KeySpace(prefix).stream(0)) == state.seq


# --------------------------------------------------------------------------------------------
# Property: random op sequences against a tiny reference model


@dataclass
class Model:
    """The rules of docs/PROTOCOL.md for one batch, in plain Python."""

    exists: bool = False
    status: str = "pending"
    total: int = 0
    processed: int = 0
    successful: int = 0
    failed: int = 0
    label: str | None = None
    seq: int = 0
    items: dict[str, bool] = field(default_factory=dict)

    def apply(self, op: str, kw: dict[str, Any]) -> bool:
        """Apply one op; True when it changed the batch. Raises BadArgument like the script."""
        if any(isinstance(v, int) and v < 0 for v in kw.values()):
            raise BadArgument("negative")
        if (op == "set" and not kw) or (op == "finish" and kw["status"] not in TERMINAL):
            raise BadArgument(op)
        new = replace(self, items=dict(self.items))
        explicit = False
        if op == "start":
            new.total = kw["total"]
            if kw.get("label") is not None:
                new.label = kw["label"] or None
        elif op == "item":
            new.count(kw["item_id"], kw["ok"])
        elif op == "items":
            for item_id, ok in kw["outcomes"]:  # exactly as item calls in order
                new.count(item_id, ok)
        elif op == "incr":
            new.successful += kw.get("successful", 0)
            new.failed += kw.get("failed", 0)
            new.processed += kw.get("successful", 0) + kw.get("failed", 0)
        elif op == "set":
            for name in ("total", "processed", "successful", "failed"):
                if name in kw:
                    setattr(new, name, kw[name])
            if "processed" not in kw and ("successful" in kw or "failed" in kw):
                new.processed = new.successful + new.failed
            if "status" in kw:
                new.status, explicit = kw["status"], True
        else:
            new.status, explicit = kw["status"], True
        if not explicit and new.status not in TERMINAL:
            if new.status == "pending" and new.processed > 0:
                new.status = "processing"
            if 0 < new.total <= new.processed:
                new.status = "completed"
        new.exists = True
        changed = new != self  # items: a flip and its flip back in one call change nothing
        if changed:
            new.seq += 1
            self.__dict__.update(new.__dict__)
        return changed

    def count(self, item_id: str, ok: bool) -> None:
        prev = self.items.get(item_id)
        if prev is not ok:
            if prev is None:
                self.processed += 1
            elif prev:  # moved out of successful (counted anew if a set zeroed it)
                self.successful, self.processed = _take(self.successful, self.processed)
            else:
                self.failed, self.processed = _take(self.failed, self.processed)
            self.successful += ok
            self.failed += not ok
            self.items[item_id] = ok


def _take(bucket: int, processed: int) -> tuple[int, int]:
    return (bucket - 1, processed) if bucket > 0 else (0, processed + 1)


_small = st.integers(0, 6)  # small values: totals get reached
_tiny = st.integers(0, 2)  # set's counters often land below the items they hold
# numbered ids (bitmaps: close ones through a byte window, far apart ones bit by bit; large
# sparse ones in the hash), look-alikes that are not numbered, free-form ids
_ids = st.sampled_from(
    ["0", "7", "9", "100000", "16777216", "4294967295", "07", "-1", "+7", "7 ", "i0", "i1"]
)
_item = st.tuples(st.just("item"), st.fixed_dictionaries({"item_id": _ids, "ok": st.booleans()}))
_items = st.tuples(
    st.just("items"),
    st.fixed_dictionaries({"outcomes": st.lists(st.tuples(_ids, st.booleans()), max_size=8)}),
)
OPS = st.one_of(
    _item,
    _items,
    _items,  # more likely than the other ops: repeats and flips are the interesting part
    st.tuples(
        st.just("start"),
        st.fixed_dictionaries({"total": _small, "label": st.sampled_from([None, "", "a", "b"])}),
    ),
    st.tuples(
        st.just("incr"),
        st.fixed_dictionaries(
            {}, optional={"successful": st.integers(0, 3), "failed": st.integers(0, 3)}
        ),
    ),
    st.tuples(
        st.just("set"),
        st.fixed_dictionaries(
            {},
            optional={
                "total": _small,
                "processed": _small,
                "successful": _tiny,
                "failed": _tiny,
                "status": st.sampled_from(sorted(STATUSES)),
            },
        ),
    ),
    st.tuples(
        st.just("finish"), st.fixed_dictionaries({"status": st.sampled_from(sorted(TERMINAL))})
    ),
    st.sampled_from(  # refused: nothing may change
        [
            ("incr", {"successful": -1}),
            ("start", {"total": -2}),
            ("set", {"failed": -1, "status": "pending"}),
            ("finish", {"status": "pending"}),
        ]
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(OPS, min_size=5, max_size=40), mapping=st.booleans())
@example(  # a set lowered successful below the items it holds, then one of them flips
    ops=[
        ("item", {"item_id": "i0", "ok": True}),
        ("set", {"successful": 0}),
        ("item", {"item_id": "i0", "ok": False}),
    ],
    mapping=False,
)
@example(  # a flip and its flip back in one call, then a set under the items, then flips
    ops=[
        ("items", {"outcomes": [("7", True), ("07", False), ("100000", False)]}),
        ("items", {"outcomes": [("7", False), ("7", True)]}),
        ("set", {"successful": 0, "failed": 0}),
        ("items", {"outcomes": [("7", False), ("100000", True), ("07", True), ("i0", True)]}),
        ("finish", {"status": "cancelled"}),
        ("items", {"outcomes": [("4294967295", True), ("4294967295", False), ("0", True)]}),
    ],
    mapping=False,
)
def test_random_op_sequences_follow_the_model(
    redis_client: redis.Redis, prefix: str, ops: list[tuple[str, dict[str, Any]]], mapping: bool
) -> None:
    emitter = Emitter(redis_client, prefix=prefix)
    keys = KeySpace(prefix)
    batch_id = uuid.uuid4().hex  # fresh batch per example (the fixtures are per test)
    model = Model()
    explicit_processed = False
    prev: BatchState | None = None
    for op, kw in ops:
        where = f"{op}({kw}) after {model}"
        before = redis_client.xlen(keys.stream(0))
        try:
            changed = model.apply(op, kw)
        except BadArgument:
            with pytest.raises(BadArgument):
                getattr(emitter, op)(batch_id, USER, **kw)
            assert emitter.get(batch_id) == prev, where
            assert redis_client.xlen(keys.stream(0)) == before, where
            continue
        call_kw = kw
        if op == "items" and mapping and len(dict(kw["outcomes"])) == len(kw["outcomes"]):
            call_kw = {"outcomes": dict(kw["outcomes"])}  # distinct ids: a mapping counts alike
        state = getattr(emitter, op)(batch_id, USER, **call_kw)
        assert isinstance(state, BatchState)
        explicit_processed |= op == "set" and "processed" in kw
        assert redis_client.xlen(keys.stream(0)) == before + changed, where
        assert min(state.total, state.processed, state.successful, state.failed) >= 0
        if not explicit_processed:
            assert state.processed == state.successful + state.failed, where
        if prev is not None:
            assert state.seq == prev.seq + changed, where
            assert state.started_at == prev.started_at
            assert state.updated_at >= prev.updated_at
        expected = (model.status, model.total, model.processed, model.successful, model.failed)
        assert counters(state) == expected, where
        assert (state.seq, state.label) == (model.seq, model.label), where
        prev = state
    assert emitter.get(batch_id) == prev
    assert stored_outcomes(redis_client, keys, batch_id) == model.items


def stored_outcomes(r: redis.Redis, keys: KeySpace, batch_id: str) -> dict[str, bool]:
    """Every item outcome the batch holds, read back from the hash and both bitmaps."""
    raw: Any = r.hgetall(keys.items(batch_id))
    out = {k.decode(): v == b"1" for k, v in raw.items()}
    seen: Any = r.get(keys.seen(batch_id)) or b""
    failed: Any = r.get(keys.failed(batch_id)) or b""
    for i, byte in enumerate(seen):
        for b in range(8) if byte else ():
            if byte & (128 >> b):
                n = 8 * i + b
                assert str(n) not in out, f"{n} both in the hash and in the bitmap"
                out[str(n)] = not _bit(failed, n)
    return out
