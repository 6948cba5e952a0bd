"""Dramatiq: a broker middleware reports each tagged message's final outcome (extra `dramatiq`).

    from relay.integrations.dramatiq import BatchProgress, send_batch

    broker = RedisBroker(url=...)
    BatchProgress(Emitter(Redis.from_url(PROGRESS_URL), best_effort=True)).install(broker)

    @dramatiq.actor(max_retries=3)
    def process_file(upload_id: str, file_id: str) -> None: ...

    send_batch(progress, upload.id, user.id,
               [process_file.message(upload.id, f.id) for f in upload.files])

The item id is the message's `message_id`, which Dramatiq keeps when the Retries middleware
re-enqueues a failed message. Retries decides a message's fate in its `after_process_message`
hook: it calls `message.fail()` when no retry is left (or the exception is one the actor
`throws`), else re-enqueues it. `after_*` hooks run in reverse middleware order, so this
middleware is installed before Retries: its hook runs after Retries has decided, and reads
`message.failed`. Outcomes:

- no exception and not failed: successful;
- an exception and `message.failed` (retries exhausted, or a `throws` exception): failed;
- an exception and not failed: a retry is coming, nothing is counted;
- skipped (`after_skip_message`, e.g. the AgeLimit middleware): failed, the job never ran.
  A message some middleware failed before it ran (it never ran either): failed.

Without the Retries middleware Dramatiq never retries, so any exception is a final failure.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware, Retries

from relay.emitter import Emitter
from relay.integrations.outcome import report, start_and_send, tagged, tags

QUEUE = "dramatiq"


def batch_options(batch_id: str, user_id: str) -> dict[str, str]:
    """Message options that put a message into a batch:
    `actor.send_with_options(args=..., **batch_options(batch_id, user_id))`."""
    return tags(batch_id, user_id)


def send_batch(
    emitter: Emitter,
    batch_id: str,
    user_id: str,
    messages: Iterable[dramatiq.Message[Any]],
    *,
    label: str | None = None,
    broker: dramatiq.Broker | None = None,
) -> list[dramatiq.Message[Any]]:
    """`start` the batch with one item per message, then enqueue each message tagged.

    `messages` are unsent messages, e.g. `[actor.message(*args) for ...]`. Returns the enqueued
    messages; their `message_id`s are the batch's item ids.
    """
    target = broker if broker is not None else dramatiq.get_broker()
    options = batch_options(batch_id, user_id)

    def send(message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
        return target.enqueue(message.copy(options=options))

    return start_and_send(emitter, batch_id, user_id, list(messages), send, label=label)


class BatchProgress(Middleware):
    """Reports one `item` per tagged message when Dramatiq has decided its final outcome."""

    def __init__(self, emitter: Emitter) -> None:
        self.emitter = emitter
        self.retries = True  # set by install(): whether the broker retries failed messages

    def install(self, broker: dramatiq.Broker) -> BatchProgress:
        """Add this middleware to `broker` just before Retries (so its after-hooks run after
        Retries' own); at the end when the broker has no Retries middleware."""
        self.retries = any(isinstance(m, Retries) for m in broker.middleware)
        if self.retries:
            broker.add_middleware(self, before=Retries)
        else:
            broker.add_middleware(self)
        return self

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            ok, final = not message.failed, True
        else:
            ok, final = False, message.failed or not self.retries
        if final:
            self._report(message, ok=ok)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._report(message, ok=False)

    def _report(self, message: MessageProxy, *, ok: bool) -> None:
        if tag := tagged(message.options):
            report(self.emitter, QUEUE, tag, message.message_id, ok=ok)
