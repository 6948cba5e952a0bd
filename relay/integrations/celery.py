"""Celery: task signals report each tagged task's final outcome (extra `celery`).

    from relay.integrations.celery import BatchProgress, apply_batch

    BatchProgress(Emitter(Redis.from_url(PROGRESS_URL), best_effort=True)).connect()

    @app.task(autoretry_for=(IOError,), max_retries=3)
    def process_file(upload_id: str, file_id: str) -> None: ...

    apply_batch(progress, upload.id, user.id,
                [process_file.s(upload.id, f.id) for f in upload.files])

The item id is the task id: `Task.retry()` sends the same task id again (with `retries + 1`)
and copies the request's custom headers, so the batch tags travel with every retry. Outcomes,
from the worker's signals (sent while the task's request is current, so `sender.request` holds
the tags):

- `task_success`: successful;
- `task_failure`: failed. Celery sends it only for a final failure: an exception with no retry
  left (`autoretry_for` re-raises the error once `request.retries` reaches `max_retries`), or
  one the task did not retry;
- `task_retry` (`self.retry()` or `autoretry_for` with retries left): nothing is counted.

A task that Celery fails outside the task's own call (a hard time limit, a lost worker process)
is reported when Celery exposes that task's request in the signal; when it does not, the
outcome is skipped and logged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import celery
import structlog
from celery import signals
from celery.result import AsyncResult

from relay.emitter import Emitter
from relay.errors import error_fields
from relay.integrations.outcome import report, start_and_send, tagged, tags

QUEUE = "celery"

log = structlog.get_logger("relay.integrations.celery")


def batch_headers(batch_id: str, user_id: str) -> dict[str, str]:
    """Message headers that put a task into a batch:
    `sig.apply_async(headers=batch_headers(batch_id, user_id))`."""
    return tags(batch_id, user_id)


def apply_batch(
    emitter: Emitter,
    batch_id: str,
    user_id: str,
    signatures: Iterable[celery.Signature[Any]],
    *,
    label: str | None = None,
) -> list[AsyncResult[Any]]:
    """`start` the batch with one item per signature, then send each signature tagged.

    Returns the results; their ids (the task ids) are the batch's item ids.
    """
    tag = batch_headers(batch_id, user_id)

    def send(sig: celery.Signature[Any]) -> AsyncResult[Any]:
        headers = {**(sig.options.get("headers") or {}), **tag}  # keep the signature's own
        sent: AsyncResult[Any] = sig.apply_async(headers=headers)
        return sent

    return start_and_send(emitter, batch_id, user_id, list(signatures), send, label=label)


class BatchProgress:
    """Signal receivers that report one `item` per tagged task's final outcome.

    `connect()` in every worker process (a module the worker imports, e.g. the Celery app's).
    """

    def __init__(self, emitter: Emitter) -> None:
        self.emitter = emitter

    def connect(self) -> BatchProgress:
        signals.task_success.connect(self._on_success, weak=False)
        signals.task_failure.connect(self._on_failure, weak=False)
        return self

    def disconnect(self) -> None:
        signals.task_success.disconnect(self._on_success)
        signals.task_failure.disconnect(self._on_failure)

    def _on_success(self, sender: Any = None, **_: Any) -> None:
        self._report(sender, None, ok=True)

    def _on_failure(self, sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        self._report(sender, task_id, ok=False)

    def _report(self, task: Any, task_id: str | None, *, ok: bool) -> None:
        try:
            request = task.request
            if task_id is not None and request.id != task_id:
                # a failure Celery signals outside the task's call without its request (a hard
                # time limit): whether the task was tagged can't be told
                log.info("job_outcome_without_request", queue=QUEUE, item_id=task_id, ok=ok)
                return
            tag = tagged(request.headers) or tagged(vars(request))
            item_id = str(request.id)
        except Exception as e:  # never break the task (Celery would only log it, too)
            log.warning("job_outcome_not_reported", queue=QUEUE, ok=ok, **error_fields(e))
            return
        if tag is not None:
            report(self.emitter, QUEUE, tag, item_id, ok=ok)
