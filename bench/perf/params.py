"""Sizes of the benchmark's phases (--quick / full, --set KEY=VALUE) and the context they share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from perf.harness import Clients


@dataclass(frozen=True)
class Params:
    ingest_entries: int
    ingest_batches: int
    ingest_users: int
    fanout_sizes: tuple[int, ...]
    fanout_users: int  # the N clients belong to this many users (N / users connections each)
    fanout_demand: int  # frames/s the emitter asks for (well above what anyone can deliver)
    fanout_warm_s: float
    fanout_window_s: float
    latency_users: int
    latency_rate: int  # updates/s
    latency_s: float
    conflation_items: int
    conflation_step: int
    memory_conns: int
    workers: int  # client processes
    reconnect_users: int
    load_users: int  # the load phase (bench/perf/load.py)
    load_steps: int  # updates per batch
    load_rates: tuple[int, ...]  # updates/s offered; the largest is also run pinned
    load_warm_s: float
    load_window_s: float
    load_repeats: int  # each configuration this many times, interleaved; medians reported
    overload_factor: float  # the overload run offers this many times the relay's capacity
    overload_max_rate: int  # ... but no more than this many updates/s
    load_only: str  # comma-separated run names to keep (e.g. "2k,overload"); empty: all


QUICK = Params(
    ingest_entries=20_000,
    ingest_batches=10_000,
    ingest_users=200,
    fanout_sizes=(200, 1_000),
    fanout_users=1,
    fanout_demand=100_000,
    fanout_warm_s=1.0,
    fanout_window_s=1.5,
    latency_users=1_000,
    latency_rate=2_000,
    latency_s=3.0,
    conflation_items=1_000_000,
    conflation_step=1_000,
    memory_conns=1_000,
    workers=2,
    reconnect_users=4,
    load_users=1_000,
    load_steps=20,
    load_rates=(2_000, 10_000),
    load_warm_s=1.5,
    load_window_s=3.0,
    load_repeats=1,
    overload_factor=2.0,
    overload_max_rate=100_000,
    load_only="",
)
FULL = Params(
    ingest_entries=200_000,
    ingest_batches=10_000,
    ingest_users=1_000,
    fanout_sizes=(1_000, 10_000),
    fanout_users=1,
    fanout_demand=100_000,
    fanout_warm_s=3.0,
    fanout_window_s=10.0,
    latency_users=1_000,
    latency_rate=2_000,
    latency_s=15.0,
    conflation_items=1_000_000,
    conflation_step=10,
    memory_conns=10_000,
    workers=2,
    reconnect_users=10,
    load_users=1_000,
    load_steps=20,
    load_rates=(2_000, 10_000),
    load_warm_s=2.0,
    load_window_s=8.0,
    load_repeats=3,
    overload_factor=2.0,
    overload_max_rate=100_000,
    load_only="",
)


@dataclass
class Ctx:
    params: Params
    redis_url: str
    logdir: Path
    clients: Clients
    profile_dir: Path | None
    redis_pid: int
