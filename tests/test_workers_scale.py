"""Exactly-once counting at scale: 8 worker processes x 5,000 items through the Python SDK.

Each process has its own sync Redis client and Emitter and calls the script once per report.
Neighbouring processes share 1,000 item ids; within a process 20% of the items are reported
twice (the second time later, in random order) and 5% are reported failed, then successful.
Some ids fail for good (every report of them is ok=False). The last report of every id is the
same from every process, so the final counters are exact whatever the interleaving.
"""

from __future__ import annotations

import multiprocessing
import random
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
