"""Dramatiq test app: `dramatiq dramatiq_app` runs its worker; the test sends with it."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from jobs import BROKER_URL, MAX_RETRIES, emitter, process

from relay.integrations.dramatiq import BatchProgress

broker = RedisBroker(url=BROKER_URL)  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)
BatchProgress(emitter()).install(broker)


@dramatiq.actor(max_retries=MAX_RETRIES, min_backoff=10, max_backoff=50)
def process_file(i: int) -> None:
    process(i)
