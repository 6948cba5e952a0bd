"""RQ: job callbacks report each tagged job's final outcome (extra `rq`).

    from relay.integrations.rq import enqueue_batch, use

    use(Emitter(Redis.from_url(PROGRESS_URL), best_effort=True))   # in the jobs' module

    def process_file(upload_id: str, file_id: str) -> None: ...

    enqueue_batch(progress, queue, upload.id, user.id,
                  [Queue.prepare_data(process_file, (upload.id, f.id), retry=Retry(max=3))
                   for f in upload.files])

Tagging a job sets its `meta` (the batch tags) and its `on_success`, `on_failure` and
`on_stopped` callbacks (functions of this module, run by the worker's work horse). The item id
is the job id: RQ retries a job by re-enqueueing the same job. Outcomes:

- success callback: successful;
- failure callback: RQ runs it after every failed attempt, before it decides on a retry; the
  job is retried while `job.retries_left > 0`, so the callback counts nothing then, and
  counts the job failed when no retry is left (or it has no `Retry`);
- stopped callback (`send_stop_job_command`): failed.

The callbacks run in the worker; they report through the emitter given to `use()` in that
process (call it where the worker imports your jobs). Without one they report through the
job's own Redis connection with the default prefix `progress`.

RQ runs no callback for a work horse that dies (killed by the OS) or for a job that returns
`rq.Retry` until it gives up: those outcomes are not reported.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

import redis
from rq import Callback, Queue
from rq.job import Job
from rq.queue import EnqueueData

from relay.emitter import Emitter
from relay.integrations.outcome import report, start_and_send, tagged, tags

QUEUE = "rq"

_emitter: Emitter | None = None


def use(emitter: Emitter | None) -> None:
    """Report through `emitter` in this process (None: the job's own Redis, default prefix)."""
    global _emitter  # noqa: PLW0603 - one emitter per worker process, set once at import
    _emitter = emitter


def _emitter_for(connection: Any) -> Emitter:
    return _emitter if _emitter is not None else Emitter(connection, best_effort=True)


def batch_job_options(batch_id: str, user_id: str) -> dict[str, Any]:
    """Keyword arguments that put a job into a batch:
    `queue.enqueue(func, *args, retry=Retry(max=3), **batch_job_options(batch_id, user_id))`.

    They set the job's `meta` and its success, failure and stopped callbacks (a job of a batch
    has no callbacks of its own)."""
    return {
        "meta": tags(batch_id, user_id),
        "on_success": Callback(report_success),
        "on_failure": Callback(report_failure),
        "on_stopped": Callback(report_stopped),
    }


def enqueue_batch(
    emitter: Emitter,
    queue: Queue,
    batch_id: str,
    user_id: str,
    jobs: Iterable[EnqueueData],
    *,
    label: str | None = None,
) -> list[Job]:
    """`start` the batch with one item per job, then enqueue the jobs tagged.

    `jobs` are `Queue.prepare_data(...)` tuples; their own `meta` is kept (the tags are added)
    and callbacks are replaced. Returns the jobs; their ids are the batch's item ids.
    """
    options = batch_job_options(batch_id, user_id)

    def tag(data: EnqueueData) -> EnqueueData:
        meta = {**(data.meta or {}), **options["meta"]}
        return data._replace(
            meta=meta,
            on_success=options["on_success"],
            on_failure=options["on_failure"],
            on_stopped=options["on_stopped"],
        )

    def send(data: EnqueueData) -> Job:
        # one job per call, so that a failure part-way knows how many jobs went out
        enqueued: list[Job] = queue.enqueue_many([tag(data)])
        return enqueued[0]

    return start_and_send(emitter, batch_id, user_id, list(jobs), send, label=label)


def _report(job: Job, connection: redis.Redis, *, ok: bool) -> None:
    try:
        tag = tagged(job.meta)
        if tag is not None:
            report(_emitter_for(connection), QUEUE, tag, job.id, ok=ok)
    except Exception:  # noqa: S110 - a callback that raises would fail the job
        pass


def report_success(job: Job, connection: redis.Redis, result: Any) -> None:
    """RQ success callback: the job succeeded."""
    _report(job, connection, ok=True)


def report_failure(
    job: Job,
    connection: redis.Redis,
    exc_type: type[BaseException] | None,
    exc_value: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """RQ failure callback: the job failed for good unless RQ will retry it."""
    if not job.should_retry:
        _report(job, connection, ok=False)


def report_stopped(job: Job, connection: redis.Redis) -> None:
    """RQ stopped callback: the job was stopped on request; it is not retried."""
    _report(job, connection, ok=False)
