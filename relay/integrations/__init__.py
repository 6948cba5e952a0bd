"""Task-queue integrations (optional extras): every job's final outcome becomes one `item`.

One module per queue, each behind its own extra; the relay core never imports them:

- `relay.integrations.dramatiq` (extra `dramatiq`): a broker middleware.
- `relay.integrations.celery` (extra `celery`): task signal receivers.
- `relay.integrations.rq` (extra `rq`): job callbacks.

`relay.integrations.outcome` holds what they share: tags, the batch start, the report.
"""
