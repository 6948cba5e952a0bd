"""Prometheus metrics (relay_ prefix, units in names), one registry per relay instance.

Label values come from the fixed sets below, never from user ids or client-chosen values (a
value outside its set is counted as `other`), and every value is exported from the start, at 0,
so that rate() and alerts see the first incident.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

OTHER: Final = "other"
# Close codes the relay sends (docs/PROTOCOL.md), and the usual ones a client sends.
CLOSE_CODES: Final = (
    "1000", "1001", "1006", "1008", "1009", "1011", "1012", "1013",
    "4001", "4002", "4003", "4004", "4005", "4008", "4029", OTHER,
)  # fmt: skip
# relay.auth.REASONS plus the first-message failures of relay.session.
AUTH_FAILURE_REASONS: Final = (
    "expired", "not_yet_valid", "bad_signature", "bad_algorithm", "bad_audience", "bad_issuer",
    "missing_claim", "bad_claim", "malformed", "too_large", "unknown_key", "keys_unavailable",
    "timeout", "bad_format", "not_auth", "other_user", OTHER,
)  # fmt: skip
# relay.wire's BadEntry reasons, and `unreadable` (any other failure to read an entry).
REJECT_REASONS: Final = (
    "foreign", "missing_field", "bad_number", "too_large", "bad_status", "bad_id", "bad_label",
    "bad_encoding", "unreadable", OTHER,
)  # fmt: skip
CONNECTION_STATES: Final = ("authenticated", "pending")
JWKS_FETCH_RESULTS: Final = ("ok", "error")


def _known(value: str, known: tuple[str, ...]) -> str:
    return value if value in known else OTHER


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Gauge(
            "relay_connections", "Open WebSocket connections by state", ["state"], registry=r
        )
        self.connections_total = Counter(
            "relay_connections_opened", "WebSocket connections accepted", registry=r
        )
        self.closes = Counter(
            "relay_connections_closed", "Closed connections by close code", ["code"], registry=r
        )
        self.auth_failures = Counter(
            "relay_auth_failures", "Refused authentications by reason", ["reason"], registry=r
        )
        self.frames_sent = Counter("relay_frames_sent", "Frames written to clients", registry=r)
        self.frames_merged = Counter(
            "relay_frames_merged", "Frames replaced by a newer state before sending", registry=r
        )
        self.entries_read = Counter("relay_stream_entries_read", "Stream entries read", registry=r)
        self.entries_rejected = Counter(
            "relay_stream_entries_rejected",
            "Malformed stream entries skipped",
            ["reason"],
            registry=r,
        )
        self.reader_lag = Gauge(
            "relay_reader_lag_ms",
            "Milliseconds between an entry's id time and its processing",
            registry=r,
        )
        self.redis_reconnects = Counter(
            "relay_redis_reconnects", "Reader reconnections after a Redis error", registry=r
        )
        self.stream_gaps = Counter(
            "relay_stream_gaps", "Stream resets or trims past the reader's position", registry=r
        )
        self.slow_disconnects = Counter(
            "relay_slow_consumer_disconnects",
            "Connections closed with 4008 (too slow)",
            registry=r,
        )
        self.loop_lag = Gauge(
            "relay_event_loop_lag_seconds", "How late the event loop ran a 1 s timer", registry=r
        )
        self.ready = Gauge(
            "relay_ready", "1 when /readyz answers 200 (evaluated at each scrape)", registry=r
        )
        self.jwks_fetches = Counter(
            "relay_jwks_fetches",
            "JWKS key set fetches by result (ok, error)",
            ["result"],
            registry=r,
        )
        for labelled, values in (
            (self.connections, CONNECTION_STATES),
            (self.closes, CLOSE_CODES),
            (self.auth_failures, AUTH_FAILURE_REASONS),
            (self.entries_rejected, REJECT_REASONS),
            (self.jwks_fetches, JWKS_FETCH_RESULTS),
        ):
            for value in values:
                labelled.labels(value)

    def closed(self, code: int) -> None:
        self.closes.labels(_known(str(code), CLOSE_CODES)).inc()

    def auth_failed(self, reason: str) -> None:
        self.auth_failures.labels(_known(reason, AUTH_FAILURE_REASONS)).inc()

    def rejected(self, reason: str) -> None:
        self.entries_rejected.labels(_known(reason, REJECT_REASONS)).inc()

    def jwks_fetched(self, ok: bool) -> None:
        self.jwks_fetches.labels("ok" if ok else "error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
