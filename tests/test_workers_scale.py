"""Exactly-once counting at scale: 8 worker processes x 5,000 items through the Python SDK,
8 x 250,000 numbered items through reporters (RELAY_SCALE_ITEMS scales that one down), and a
worker killed mid-batch whose retried job makes the batch exact.

Each process has its own sync Redis client and Emitter and calls the script once per report.
Neighbouring processes share 1,000 item ids; within a process 20% of the items are reported
twice (the second time later, in random order) and 5% are reported failed, then successful.
Some ids fail for good (every report of them is ok=False). The last report of every id is the
same from every process, so the final counters are exact whatever the interleaving.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
import uuid
from typing import Any

import pytest
import redis

from relay.emitter import Emitter
from relay.keys import KeySpace

USER = "scale-user"
PROCESSES = 8
ITEMS_PER_PROCESS = 5_000
STRIDE = 4_000  # process w reports ids [STRIDE * w, STRIDE * w + 5,000) mod UNIVERSE
UNIVERSE = STRIDE * PROCESSES  # 32,000 distinct ids; 8,000 of them reported by two processes


def always_fails(i: int) -> bool:
    return i % 50 == 7  # 2% of the ids: every report of them says ok=False


def plan(worker: int) -> tuple[list[tuple[int, bool]], set[int]]:
    """The (item, ok) reports of one process, in order, and its flaky ids."""
    rng = random.Random(worker)
    ids = [(STRIDE * worker + n) % UNIVERSE for n in range(ITEMS_PER_PROCESS)]
    rng.shuffle(ids)
    n = len(ids)
    flaky = [i for i in ids[: n // 4] if not always_fails(i)][: n // 20]  # 5%: failed, then ok
    twice = ids[n // 4 : n // 4 + n // 5]  # 20%: the same outcome twice
    flaky_set = set(flaky)
    reports = [(i, i not in flaky_set and not always_fails(i)) for i in ids]
    late = [(i, True) for i in flaky] + [(i, not always_fails(i)) for i in twice]
    rng.shuffle(late)
    # the second reports come after every first report of this process
    return reports + late, flaky_set


def _worker(where: tuple[str, str, str], worker: int, go: Any, out: Any) -> None:
    """Runs in a spawned process. `where`: Redis URL, key prefix, batch id."""
    url, prefix, batch_id = where
    client = redis.Redis.from_url(url)
    emitter = Emitter(client, prefix=prefix)
    reports, _ = plan(worker)
    go.wait(30)
    started = time.monotonic()
    for i, ok in reports:
        emitter.item(batch_id, USER, f"item-{i}", ok=ok)
    out.put((worker, len(reports), time.monotonic() - started))
    client.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_eight_processes_count_exactly_once(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    batch_id = str(uuid.uuid4())
    emitter = Emitter(redis_client, prefix=prefix)
    emitter.start(batch_id, USER, UNIVERSE)
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=((redis_url, prefix, batch_id), w, go, out))
        for w in range(PROCESSES)
    ]
    spawn_started = time.monotonic()
    for p in procs:
        p.start()
    time.sleep(0.1)
    go.set()  # the processes import while this waits; they start reporting together
    run_started = time.monotonic()
    for p in procs:
        p.join(100)
    wall = time.monotonic() - run_started
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    done = sorted(out.get(timeout=5) for _ in procs)
    reports = sum(n for _, n, _ in done)

    # expected: every id once; its outcome is its last report (the same from every process)
    failed_ids = {i for i in range(UNIVERSE) if always_fails(i)}
    state = emitter.get(batch_id)
    assert state is not None
    assert (state.status, state.total, state.processed) == ("completed", UNIVERSE, UNIVERSE)
    assert (state.successful, state.failed) == (UNIVERSE - len(failed_ids), len(failed_ids))
    raw: Any = redis_client.hgetall(KeySpace(prefix).items(batch_id))
    outcomes = {int(k.decode().removeprefix("item-")): v for k, v in raw.items()}
    assert outcomes == {i: b"0" if i in failed_ids else b"1" for i in range(UNIVERSE)}

    # seq: start + one per id + the flips between failed and successful, which depend on the
    # interleaving: at least one per flaky id, at most two per failed-then-ok report
    flaky = [plan(w)[1] for w in range(PROCESSES)]
    assert len(set().union(*flaky)) > 1_500
    low = 1 + UNIVERSE + len(set().union(*flaky))
    assert low <= state.seq <= 1 + UNIVERSE + 2 * sum(map(len, flaky))
    # every change appended exactly one stream entry, seqs without gaps or repeats
    stream = KeySpace(prefix).stream(0)
    assert redis_client.xlen(stream) == state.seq
    entries: Any = redis_client.xrange(stream)
    seqs = [int(fields[b"seq"]) for _, fields in entries]
    assert seqs == list(range(1, state.seq + 1))
    print(
        f"\n{PROCESSES} processes, {reports} reports: {wall:.1f} s wall "
        f"({reports / wall:.0f} reports/s), per process "
        f"{min(t for *_, t in done):.1f}-{max(t for *_, t in done):.1f} s, "
        f"spawn+import {run_started - spawn_started:.1f} s, seq {state.seq}"
    )


# --------------------------------------------------------------------------------------------
# The same at 8 x 250,000 numbered items through reporters (bitmaps, one `items` per flush)

BIG_ITEMS = int(os.environ.get("RELAY_SCALE_ITEMS", "250000"))  # per process
BIG_STRIDE = BIG_ITEMS * 4 // 5  # neighbours share a fifth of their ids
BIG_UNIVERSE = BIG_STRIDE * PROCESSES


def big_plan(worker: int) -> list[tuple[int, bool]]:
    """Like plan(): 20% of the ids reported twice, 5% failed then ok, 2% always failed."""
    rng = random.Random(1000 + worker)
    ids = [(BIG_STRIDE * worker + n) % BIG_UNIVERSE for n in range(BIG_ITEMS)]
    n = len(ids)
    flaky = {i for i in ids[n // 2 : n // 2 + n // 20] if not always_fails(i)}
    twice = ids[n // 4 : n // 4 + n // 5]
    reports = [(i, i not in flaky and not always_fails(i)) for i in ids]
    late = [(i, True) for i in sorted(flaky)] + [(i, not always_fails(i)) for i in twice]
    rng.shuffle(late)
    return reports + late


def _big_worker(where: tuple[str, str, str], worker: int, go: Any, out: Any) -> None:
    url, prefix, batch_id = where
    client = redis.Redis.from_url(url)
    emitter = Emitter(client, prefix=prefix)
    reports = big_plan(worker)
    go.wait(30)
    started = time.monotonic()
    with emitter.reporter(batch_id, USER) as r:
        for i, ok in reports:
            r.item(str(i), ok=ok)
    out.put((worker, len(reports), time.monotonic() - started))
    client.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_eight_reporters_count_numbered_items_exactly_once(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    batch_id = str(uuid.uuid4())
    emitter = Emitter(redis_client, prefix=prefix)
    emitter.start(batch_id, USER, BIG_UNIVERSE)
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_big_worker, args=((redis_url, prefix, batch_id), w, go, out))
        for w in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    time.sleep(0.1)
    go.set()
    run_started = time.monotonic()
    done = sorted(out.get(timeout=100) for _ in procs)
    wall = time.monotonic() - run_started
    for p in procs:
        p.join(10)
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    reports = sum(n for _, n, _ in done)

    failed_ids = [i for i in range(BIG_UNIVERSE) if always_fails(i)]
    state = emitter.get(batch_id)
    assert state is not None
    assert (state.status, state.total, state.processed) == ("completed", BIG_UNIVERSE, BIG_UNIVERSE)
    assert (state.successful, state.failed) == (BIG_UNIVERSE - len(failed_ids), len(failed_ids))
    # storage: one seen bit per id, failed bits exactly for the failed ids, nothing in the hash
    keys = KeySpace(prefix)
    expected_failed = bytearray((BIG_UNIVERSE + 8) // 8)
    for i in failed_ids:
        expected_failed[i // 8] |= 128 >> (i % 8)
    seen: Any = redis_client.get(keys.seen(batch_id))
    failed: Any = redis_client.get(keys.failed(batch_id))
    assert redis_client.bitcount(keys.seen(batch_id)) == BIG_UNIVERSE
    assert seen[: BIG_UNIVERSE // 8] == b"\xff" * (BIG_UNIVERSE // 8)
    assert failed.rstrip(b"\0") == bytes(expected_failed).rstrip(b"\0")
    assert redis_client.exists(keys.items(batch_id)) == 0
    memory = sum(
        int(redis_client.memory_usage(k) or 0)
        for k in (keys.batch(batch_id), keys.seen(batch_id), keys.failed(batch_id))
    )
    # every change appended exactly one stream entry, seqs without gaps or repeats
    stream = keys.stream(0)
    assert redis_client.xlen(stream) == state.seq
    entries: Any = redis_client.xrange(stream)
    assert [int(f[b"seq"]) for _, f in entries] == list(range(1, state.seq + 1))
    print(
        f"\n{PROCESSES} reporters, {reports} reports of {BIG_UNIVERSE} numbered ids: "
        f"{wall:.1f} s wall ({reports / wall:.0f} reports/s), per process "
        f"{min(t for *_, t in done):.1f}-{max(t for *_, t in done):.1f} s, "
        f"{state.seq} flushes, {memory} bytes of Redis ({memory / BIG_UNIVERSE:.3f} per item)"
    )


# --------------------------------------------------------------------------------------------
# A worker killed mid-batch loses only unflushed outcomes; its retried job makes it exact

KILL_ITEMS = 200_000


def kill_outcome(i: int) -> bool:
    return i % 13 != 5


def _paced_job(where: tuple[str, str, str], started: Any) -> None:
    """Reports KILL_ITEMS numbered items (and a few free-form ones) through a reporter, slowly
    enough to be killed in the middle."""
    url, prefix, batch_id = where
    client = redis.Redis.from_url(url)
    emitter = Emitter(client, prefix=prefix, best_effort=True)
    with emitter.reporter(batch_id, USER, flush_ms=20, max_items=1_000) as r:
        started.set()
        for i in range(KILL_ITEMS):
            r.item(str(i) if i % 100 else f"file-{i}", ok=kill_outcome(i))
            if i % 2_000 == 0:
                time.sleep(0.005)
    client.close()


@pytest.mark.timeout(60)
def test_a_killed_worker_and_its_retried_job_end_exact(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    batch_id = str(uuid.uuid4())
    emitter = Emitter(redis_client, prefix=prefix)
    emitter.start(batch_id, USER, KILL_ITEMS)
    ctx = multiprocessing.get_context("spawn")
    where = (redis_url, prefix, batch_id)

    def processed() -> int:
        state = emitter.get(batch_id)
        return 0 if state is None else state.processed

    started = ctx.Event()
    job = ctx.Process(target=_paced_job, args=(where, started))
    job.start()
    assert started.wait(30)
    deadline = time.monotonic() + 30
    while processed() < KILL_ITEMS // 4:
        assert time.monotonic() < deadline and job.is_alive()
        time.sleep(0.005)
    os.kill(job.pid or 0, signal.SIGKILL)
    job.join(10)
    assert job.exitcode == -signal.SIGKILL
    at_kill = processed()
    assert KILL_ITEMS // 4 <= at_kill < KILL_ITEMS  # killed in the middle

    retry_started = ctx.Event()  # kept referenced until the child has it
    retry = ctx.Process(target=_paced_job, args=(where, retry_started))
    retry.start()
    retry.join(45)
    assert retry.exitcode == 0
    state = emitter.get(batch_id)
    assert state is not None
    failed = sum(1 for i in range(KILL_ITEMS) if not kill_outcome(i))
    assert (state.status, state.processed, state.failed) == ("completed", KILL_ITEMS, failed)
    assert state.successful == KILL_ITEMS - failed
    keys = KeySpace(prefix)
    assert redis_client.bitcount(keys.seen(batch_id)) == KILL_ITEMS - KILL_ITEMS // 100
    assert redis_client.hlen(keys.items(batch_id)) == KILL_ITEMS // 100
    print(f"\nkilled at {at_kill} of {KILL_ITEMS} outcomes; the retry made it exact")
