"""Prometheus metrics (relay_ prefix, units in names), one registry per relay instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


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
        for result in ("ok", "error"):
            self.jwks_fetches.labels(result)
        self.connections.labels("authenticated").set(0)
        self.connections.labels("pending").set(0)

    def jwks_fetched(self, ok: bool) -> None:
        self.jwks_fetches.labels("ok" if ok else "error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
