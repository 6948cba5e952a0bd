"""What the task-queue integrations share: the batch tags, the batch start and the report.

A job belongs to a batch through two tags that travel with it through the queue (message
options, headers or job meta, depending on the queue): `progress_batch_id` and
`progress_user_id`. When the queue has decided a job's final outcome (succeeded, or failed with
no retry left), the integration calls `report` once with the job's own id as the item id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

import structlog

from relay.emitter import Emitter
from relay.errors import error_fields

BATCH_TAG: Final = "progress_batch_id"
USER_TAG: Final = "progress_user_id"

log = structlog.get_logger("relay.integrations")

J = TypeVar("J")
R = TypeVar("R")


def tags(batch_id: str, user_id: str) -> dict[str, str]:
    """The two tags that put a job into a batch."""
    return {BATCH_TAG: batch_id, USER_TAG: user_id}


def tagged(values: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(batch_id, user_id) when `values` carries both tags as non-empty strings, else None."""
    if not values:
        return None
    batch_id, user_id = values.get(BATCH_TAG), values.get(USER_TAG)
    if isinstance(batch_id, str) and isinstance(user_id, str) and batch_id and user_id:
        return batch_id, user_id
    return None


def report(emitter: Emitter, queue: str, tag: tuple[str, str], item_id: str, *, ok: bool) -> None:
    """Count one job's final outcome. Never raises: reporting must not break the job."""
    batch_id, user_id = tag
    try:
        emitter.item(batch_id, user_id, item_id, ok=ok)
    except Exception as e:  # best effort: a refused or failed report is logged, not raised
        log.warning(
            "job_outcome_not_reported",
            queue=queue,
            batch_id=batch_id,
            item_id=item_id,
            ok=ok,
            **error_fields(e),
        )


def start_and_send(
    emitter: Emitter,
    batch_id: str,
    user_id: str,
    jobs: Sequence[J],
    send: Callable[[J], R],
    *,
    label: str | None = None,
) -> list[R]:
    """`start` the batch with total = len(jobs), then send each job with `send`.

    If sending fails part-way, the total is lowered to the jobs that were sent (so the batch
    can still complete) and the error is raised. An empty batch is finished at once.
    """
    emitter.start(batch_id, user_id, len(jobs), label=label)
    sent: list[R] = []
    try:
        for job in jobs:
            sent.append(send(job))
    except BaseException:
        emitter.start(batch_id, user_id, len(sent), label=label)
        if not sent:
            emitter.finish(batch_id, user_id, "failed")
        raise
    if not jobs:
        emitter.finish(batch_id, user_id, "completed")
    return sent
