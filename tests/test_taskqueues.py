"""Task queues end to end: real worker processes, a private Redis broker, a real relay.

For each of Dramatiq, Celery and RQ: 50 jobs in one batch, 10 fail once (then succeed on their
retry), 5 fail on every attempt (2 retries). The relay's frames must end exact: total 50,
successful 45, failed 5, processed 50, completed; no frame ever counts a retry; each job cost
one emit.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from redis_server import RedisServer
from relay_harness import collect_until, make_config, open_client, progress, wait_until

from relay.emitter import Emitter
from relay.server import Relay

pytest.importorskip("dramatiq")
pytest.importorskip("celery")
pytest.importorskip("rq")

APPS = Path(__file__).parent / "taskqueues"
JOBS = 50
USER = "uploader-7"
STOP_TIMEOUT = 10.0

sys.path.insert(0, str(APPS))
import jobs  # noqa: E402  (tests/taskqueues)

EXPECTED_OK = sum(jobs.kind(i) != "doomed" for i in range(JOBS))  # 45
EXPECTED_FAILED = JOBS - EXPECTED_OK  # 5
# attempts: ok jobs once, flaky twice, doomed 1 + MAX_RETRIES times
EXPECTED_ATTEMPTS = {
    i: {"ok": 1, "flaky": 2, "doomed": 1 + jobs.MAX_RETRIES}[jobs.kind(i)] for i in range(JOBS)
}


class Workers:
    """Worker processes started in their own session; all of their groups end at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_paths: dict[int, Path] = {}
        self.name = ""

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                env={**os.environ, **env, "PYTHONPATH": str(APPS)},
                cwd=APPS,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its pid is its group's id: children end with it
            )
        self.procs.append(proc)
        self.log_paths[proc.pid] = log
        return proc

    def start_all(
        self, queue: str, setup: Setup, count: int | None = None
    ) -> list[subprocess.Popen[bytes]]:
        """The queue's worker processes (tests/taskqueues/jobs.py), the first `count` of them."""
        self.name = queue
        argvs = jobs.worker_argvs(queue, setup.broker.url)[:count]
        return [self.start(f"{queue}-{n}", argv, setup.env) for n, argv in enumerate(argvs)]

    def log_text(self, proc: subprocess.Popen[bytes]) -> str:
        return self.log_paths[proc.pid].read_text(errors="replace")

    def logs(self, lines: int = 40) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
            _signal_group(proc, signal.SIGKILL)  # stragglers of the group (pool children)
            proc.wait(STOP_TIMEOUT)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    try:
        yield w
    finally:
        w.stop()


class Setup:
    def __init__(self, broker: RedisServer, store: RedisServer, prefix: str) -> None:
        self.broker, self.store, self.prefix = broker, store, prefix
        self.env = {
            "TQ_BROKER_URL": broker.url,
            "TQ_PROGRESS_URL": store.url,
            "TQ_PROGRESS_PREFIX": prefix,
        }

    def load(self, name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
        """Import (or re-import) a test app with this test's environment."""
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        importlib.reload(jobs)
        if name in sys.modules:
            return importlib.reload(sys.modules[name])
        return importlib.import_module(name)


@pytest.fixture
def emitter(setup: Setup) -> Iterator[Emitter]:
    """The app's emitter (the side that starts batches)."""
    with redis.Redis.from_url(setup.store.url) as client:
        yield Emitter(client, prefix=setup.prefix)


@pytest.fixture
def setup(redis_server_factory: Callable[..., RedisServer], prefix: str) -> Setup:
    """A private broker Redis and a private Redis for the relay (so its stats are ours)."""
    return Setup(redis_server_factory(), redis_server_factory(), prefix)


@pytest.fixture
async def relay(setup: Setup) -> AsyncIterator[Relay]:
    r = Relay(make_config(setup.store.url, setup.prefix))
    await r.start()
    try:
        yield r
    finally:
        await r.shutdown()


def _emits(store: RedisServer) -> int:
    """Successful EVALSHA calls on the relay's Redis (NOSCRIPT replies count as failed)."""
    with store.client() as c:
        stats: dict[str, Any] = c.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)) - int(stats.get("failed_calls", 0))


async def _check_batch(
    relay: Relay, setup: Setup, workers: Workers, batch_id: str, enqueue: Callable[[], object]
) -> dict[str, Any]:
    """Connect a client, enqueue the batch, and check the frames end exact."""
    ws = await open_client(relay, USER)
    started = time.monotonic()
    await asyncio.to_thread(enqueue)
    try:
        frames = await collect_until(
            ws,
            lambda f: (p := progress(f, batch_id)) is not None and p["status"] == "completed",
            timeout=50.0,
        )
    except AssertionError as e:
        raise AssertionError(f"{e}\n{workers.logs()}") from e
    finally:
        await ws.close()
    payloads = [p for f in frames if (p := progress(f, batch_id))]
    last = payloads[-1]
    assert (last["total"], last["processed"]) == (JOBS, JOBS), last
    assert (last["successful"], last["failed"]) == (EXPECTED_OK, EXPECTED_FAILED), last
    assert last["status"] == "completed" and last["progress_percentage"] == 100.0, last
    # a retry in progress never counts: no frame ever shows more failures than the doomed
    # jobs, and the counters only grow
    for before, after in itertools.pairwise(payloads):
        assert after["failed"] >= before["failed"] and after["successful"] >= before["successful"]
    assert max(p["failed"] for p in payloads) == EXPECTED_FAILED
    # one emit per job (and the start): the batch changed 51 times, and the relay's Redis ran
    # the script 51 times
    assert last["seq"] == JOBS + 1, last
    assert _emits(setup.store) == JOBS + 1
    with setup.broker.client() as c:
        attempts = {i: int(c.get(f"attempts:{i}") or 0) for i in range(JOBS)}
    assert attempts == EXPECTED_ATTEMPTS
    print(  # the figures for the record (pytest -s)
        f"\n{workers.name}: {JOBS} jobs, {sum(attempts.values())} attempts, {len(payloads)} frames,"
        f" final seq {last['seq']}, {_emits(setup.store)} emits,"
        f" {last['successful']} ok / {last['failed']} failed,"
        f" enqueue to completed {time.monotonic() - started:.2f} s"
    )
    return last


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_dramatiq_batch(
    setup: Setup,
    relay: Relay,
    workers: Workers,
    emitter: Emitter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workers.start_all("dramatiq", setup)
    app = setup.load("dramatiq_app", monkeypatch)
    from relay.integrations.dramatiq import send_batch  # noqa: PLC0415

    batch_id = str(uuid.uuid4())
    try:
        messages = [app.process_file.message(i) for i in range(JOBS)]
        await _check_batch(
            relay,
            setup,
            workers,
            batch_id,
            lambda: send_batch(emitter, batch_id, USER, messages, label="Upload"),
        )
    finally:
        app.broker.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_celery_batch(
    setup: Setup,
    relay: Relay,
    workers: Workers,
    emitter: Emitter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workers.start_all("celery", setup)
    app = setup.load("celery_app", monkeypatch)
    from relay.integrations.celery import apply_batch  # noqa: PLC0415

    batch_id = str(uuid.uuid4())
    try:
        sigs = [app.process_file.s(i) for i in range(JOBS)]
        await _check_batch(
            relay,
            setup,
            workers,
            batch_id,
            lambda: apply_batch(emitter, batch_id, USER, sigs, label="Upload"),
        )
    finally:
        app.app.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_rq_batch(
    setup: Setup,
    relay: Relay,
    workers: Workers,
    emitter: Emitter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rq import Queue, Retry  # noqa: PLC0415

    from relay.integrations.rq import enqueue_batch  # noqa: PLC0415

    workers.start_all("rq", setup)
    app = setup.load("rq_jobs", monkeypatch)
    batch_id = str(uuid.uuid4())
    connection = redis.Redis.from_url(setup.broker.url)
    try:
        queue = Queue("default", connection=connection)
        data = [
            Queue.prepare_data(app.process_file, (i,), retry=Retry(max=jobs.MAX_RETRIES))
            for i in range(JOBS)
        ]
        await _check_batch(
            relay,
            setup,
            workers,
            batch_id,
            lambda: enqueue_batch(emitter, queue, batch_id, USER, data, label="Upload"),
        )
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_rq_jobs_unharmed_when_progress_redis_is_down(
    setup: Setup, workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RQ fails a job whose callback raises: an unreachable progress Redis must not."""
    from rq import Queue, Retry  # noqa: PLC0415
    from rq.job import Job, JobStatus  # noqa: PLC0415

    from relay.integrations.rq import enqueue_batch  # noqa: PLC0415

    setup.store.stop()  # every report, the app's start and the workers' items, fails
    (log,) = workers.start_all("rq", setup, count=1)
    app = setup.load("rq_jobs", monkeypatch)
    with redis.Redis.from_url(setup.broker.url) as connection:
        queue = Queue("default", connection=connection)
        data = [
            Queue.prepare_data(app.process_file, (i,), retry=Retry(max=jobs.MAX_RETRIES))
            for i in range(JOBS)
        ]
        down = setup.store.client(socket_timeout=2, retries=0)
        app_emitter = Emitter(down, prefix=setup.prefix, best_effort=True)  # start: logged
        sent = await asyncio.to_thread(
            enqueue_batch, app_emitter, queue, str(uuid.uuid4()), USER, data
        )
        down.close()
        ids = [job.id for job in sent]
        final = {JobStatus.FINISHED, JobStatus.FAILED}

        def statuses() -> list[JobStatus | None]:
            return [j.get_status() if j else None for j in Job.fetch_many(ids, connection)]

        try:
            await wait_until(lambda: all(s in final for s in statuses()), timeout=50.0)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{workers.logs()}") from e
        got = statuses()
        attempts = {i: int(connection.get(f"attempts:{i}") or 0) for i in range(JOBS)}
    assert got.count(JobStatus.FINISHED) == EXPECTED_OK
    assert got.count(JobStatus.FAILED) == EXPECTED_FAILED
    assert attempts == EXPECTED_ATTEMPTS
    # every final outcome tried its one report, and logged its failure
    reported = workers.log_text(log).count("progress_report_failed")
    assert reported == JOBS, workers.logs()
    print(
        f"\nrq, progress Redis down: {got.count(JobStatus.FINISHED)} finished,"
        f" {got.count(JobStatus.FAILED)} failed, {sum(attempts.values())} attempts,"
        f" {reported} failed reports logged"
    )
