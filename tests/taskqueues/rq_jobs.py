"""RQ test jobs: `rq worker` imports this module in its work horse to run process_file."""

from __future__ import annotations

from jobs import emitter, process

from relay.integrations.rq import use

use(emitter())


def process_file(i: int) -> None:
    process(i)
