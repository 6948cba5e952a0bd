"""Conflation of one read: stream entries are absolute states, so of several entries of one batch
read together only the newest needs a frame.

When the reader is behind, one XREAD reply holds several states of the same batch; offering
each of them would build and merge frames nobody sees. The newest state per batch (the highest
seq; on a tie, the later entry) replaces them all: it is the batch's latest state, terminal or
not, so the last state always goes and a batch never goes back.
"""

from __future__ import annotations

from collections.abc import Iterable

from relay.wire import BatchState


def newest_per_batch(states: Iterable[BatchState]) -> list[BatchState]:
    """The newest state of each batch, in the order each batch first appears."""
    latest: dict[str, BatchState] = {}
    for state in states:
        current = latest.get(state.batch_id)
        if current is None or state.seq >= current.seq:
            latest[state.batch_id] = state
    return list(latest.values())
