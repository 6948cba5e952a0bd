"""The work every queue's test app runs: 50 jobs, some fail once, some always fail.

Configured by the environment the test gives the worker processes:
TQ_BROKER_URL (the queue's Redis), TQ_PROGRESS_URL and TQ_PROGRESS_PREFIX (the relay's Redis).
Each attempt of job i increments `attempts:<i>` on the broker's Redis, so the test can check
how often each job really ran; each success increments `done`.
"""

from __future__ import annotations

import os
import sys

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from relay.emitter import Emitter

BROKER_URL = os.environ.get("TQ_BROKER_URL", "redis://127.0.0.1:6379/15")
PROGRESS_URL = os.environ.get("TQ_PROGRESS_URL", "redis://127.0.0.1:6379/15")
PREFIX = os.environ.get("TQ_PROGRESS_PREFIX", "progress")
MAX_RETRIES = 2


class FileFailed(Exception):
    """The job's (simulated) work failed."""


def kind(i: int) -> str:
    """doomed: fails every attempt; flaky: fails its first attempt only; ok: never fails."""
    if i % 10 == 1:
        return "doomed"
    if i % 10 in (2, 5):
        return "flaky"
    return "ok"


_broker: redis.Redis | None = None


def process(i: int) -> None:
    global _broker  # noqa: PLW0603 - one client per process
    if _broker is None:
        _broker = redis.Redis.from_url(BROKER_URL)
    attempt = int(_broker.incr(f"attempts:{i}"))
    k = kind(i)
    if k == "doomed" or (k == "flaky" and attempt == 1):
        raise FileFailed(f"file {i} ({k}) failed on attempt {attempt}")
    _broker.incr("done")


def worker_argvs(queue: str, broker_url: str) -> list[list[str]]:
    """The worker processes each queue's tests run (cwd and PYTHONPATH: this directory)."""
    py = sys.executable
    if queue == "dramatiq":
        return [[py, "-m", "dramatiq", "dramatiq_app", "--processes", "1", "--threads", "4"]]
    if queue == "celery":
        return [[py, "-m", "celery", "-A", "celery_app", "worker", "--pool", "prefork",
                 "--concurrency", "2", "--without-gossip", "--without-mingle",
                 "--without-heartbeat", "--loglevel", "INFO"]]  # fmt: skip
    if queue == "rq":  # RQ forks a work horse per job: two workers
        return [[py, "-m", "rq.cli", "worker", "--url", broker_url, "default"]] * 2
    raise ValueError(f"unknown queue {queue!r}")


def emitter() -> Emitter:
    """The workers' emitter: best effort, with a client that fails fast when Redis is away."""
    client = redis.Redis.from_url(
        PROGRESS_URL, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    return Emitter(client, prefix=PREFIX, best_effort=True)
