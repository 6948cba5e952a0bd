"""Celery test app: `celery -A celery_app worker` runs its worker; the test sends with it."""

from __future__ import annotations

from celery import Celery
from jobs import BROKER_URL, MAX_RETRIES, FileFailed, emitter, process

from relay.integrations.celery import BatchProgress

app = Celery("tq", broker=BROKER_URL)
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
BatchProgress(emitter()).connect()


@app.task(  # type: ignore[untyped-decorator]
    name="process_file", autoretry_for=(FileFailed,), max_retries=MAX_RETRIES, default_retry_delay=0
)
def process_file(i: int) -> None:
    process(i)
