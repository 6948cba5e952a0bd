"""What the task-queue integrations cost a worker: tagged batches against untagged ones.

    python bench/taskqueues.py [--queue dramatiq|celery|rq|all] [--jobs N] [--rounds R]

For each queue, the real worker processes of tests/test_taskqueues.py (the same apps in
tests/taskqueues/) drain N jobs that succeed at once, R times each way, alternating:
  - untagged: plain jobs, the integration installed but with nothing to report (baseline);
  - tagged: the same jobs enqueued through the integration's helper (`start` + tags), each
    reporting its outcome with one emit to a second Redis.
A run is timed from the first enqueue to the last job done (and, tagged, the batch counting
all N). Each run has its own private broker Redis and fresh workers, warmed up by one job.
Prints a table, the tagged/untagged ratio per queue, and one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "taskqueues"
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(APPS)]

from redis_server import RedisServer  # noqa: E402 - needs tests/ on sys.path

from relay.emitter import Emitter  # noqa: E402

USER = "bench-user"
QUEUES = ("dramatiq", "celery", "rq")
WAIT_S = 300.0


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached in {timeout} s")
        time.sleep(0.005)


@contextlib.contextmanager
def workers(queue: str, env: dict[str, str], broker_url: str) -> Iterator[None]:
    jobs = importlib.import_module("jobs")
    procs = [
        subprocess.Popen(
            argv,
            env={**os.environ, **env, "PYTHONPATH": str(APPS)},
            cwd=APPS,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        for argv in jobs.worker_argvs(queue, broker_url)
    ]
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def load(name: str, env: dict[str, str]) -> ModuleType:
    os.environ.update(env)
    importlib.reload(importlib.import_module("jobs"))
    module = importlib.import_module(name)
    return importlib.reload(module)


class Sender:
    """Enqueues jobs i (all `ok` kind: multiples of 10) on one queue, tagged or not."""

    def __init__(self, queue: str, env: dict[str, str], broker_url: str) -> None:
        self.queue = queue
        self.app = load(
            {"dramatiq": "dramatiq_app", "celery": "celery_app"}.get(queue, "rq_jobs"), env
        )
        self.connection = redis.Redis.from_url(broker_url)

    def plain(self, ids: list[int]) -> None:
        if self.queue == "dramatiq":
            for i in ids:
                self.app.process_file.send(i)
        elif self.queue == "celery":
            for i in ids:
                self.app.process_file.delay(i)
        else:
            from rq import Queue  # noqa: PLC0415

            q = Queue("default", connection=self.connection)
            for i in ids:
                q.enqueue(self.app.process_file, i)

    def tagged(self, emitter: Emitter, batch_id: str, ids: list[int]) -> None:
        if self.queue == "dramatiq":
            from relay.integrations.dramatiq import send_batch  # noqa: PLC0415

            send_batch(emitter, batch_id, USER, [self.app.process_file.message(i) for i in ids])
        elif self.queue == "celery":
            from relay.integrations.celery import apply_batch  # noqa: PLC0415

            apply_batch(emitter, batch_id, USER, [self.app.process_file.s(i) for i in ids])
        else:
            from rq import Queue  # noqa: PLC0415

            from relay.integrations.rq import enqueue_batch  # noqa: PLC0415

            q = Queue("default", connection=self.connection)
            data = [Queue.prepare_data(self.app.process_file, (i,)) for i in ids]
            enqueue_batch(emitter, q, batch_id, USER, data)

    def close(self) -> None:
        if self.queue == "dramatiq":
            self.app.broker.close()
        elif self.queue == "celery":
            self.app.app.close()
        self.connection.close()


def one_run(queue: str, store: RedisServer, n: int, tagged: bool) -> float:
    """Seconds from the first enqueue to the last of n jobs done (and counted, if tagged)."""
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    with RedisServer() as broker:
        env = {"TQ_BROKER_URL": broker.url, "TQ_PROGRESS_URL": store.url,
               "TQ_PROGRESS_PREFIX": prefix}  # fmt: skip
        sender = Sender(queue, env, broker.url)
        done = broker.client()
        progress_client = store.client()
        emitter = Emitter(progress_client, prefix=prefix)
        try:
            with workers(queue, env, broker.url):
                sender.plain([0])  # warm-up: the workers are up and have run one job
                wait_for("warm-up", lambda: int(done.get("done") or 0) == 1, 60.0)
                ids = [10 * k for k in range(1, n + 1)]
                batch_id = str(uuid.uuid4())
                started = time.perf_counter()
                if tagged:
                    sender.tagged(emitter, batch_id, ids)
                else:
                    sender.plain(ids)
                wait_for("jobs done", lambda: int(done.get("done") or 0) == n + 1)
                if tagged:
                    wait_for("batch counted", lambda: counted(emitter, batch_id) == n)
                return time.perf_counter() - started
        finally:
            sender.close()
            done.close()
            progress_client.close()


def counted(emitter: Emitter, batch_id: str) -> int:
    state = emitter.get(batch_id)
    return state.processed if state else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", choices=[*QUEUES, "all"], default="all")
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    queues = QUEUES if args.queue == "all" else (args.queue,)
    figures: dict[str, Any] = {"jobs": args.jobs, "rounds": args.rounds, "queues": {}}
    print(f"{'queue':10} {'mode':9} {'runs (s)':24} {'jobs/s':>8}")
    with RedisServer() as store:
        for queue in queues:
            times: dict[str, list[float]] = {"untagged": [], "tagged": []}
            for _ in range(args.rounds):
                for mode in ("untagged", "tagged"):
                    times[mode].append(one_run(queue, store, args.jobs, mode == "tagged"))
            row: dict[str, Any] = {}
            for mode, runs in times.items():
                best = min(runs)
                row[mode] = {"runs_s": [round(t, 3) for t in runs], "jobs_per_s": args.jobs / best}
                shown = " ".join(f"{t:.2f}" for t in runs)
                print(f"{queue:10} {mode:9} {shown:24} {args.jobs / best:8.0f}")
            ratio = statistics.median(times["tagged"]) / statistics.median(times["untagged"])
            row["tagged_over_untagged_median"] = round(ratio, 3)
            print(f"{queue:10} tagged/untagged (median time): {ratio:.2f}")
            figures["queues"][queue] = row
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
