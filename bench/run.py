"""The relay's performance, side by side with what limits it, in one run on this machine.

    python bench/run.py [--quick] [--profile DIR] [--only PHASES]

Everything on loopback: a private redis-server (tests/redis_server.py), the relay as its own
process (`python -m relay.cli serve`, configured with RELAY_* variables), WebSocket clients in
separate processes (bench/wsload.py: raw-socket clients that only count frames, or decode them
for latencies), and the baselines (bench/bare_server.py, bench/naive_relay.py) also as their
own processes, so that every figure of CPU time is one process's own /proc/PID/stat.

The code lives in bench/perf/: harness.py (processes), params.py (sizes), one module per phase,
report.py (table, targets, plot) and runner.py. Phases (docs/PERFORMANCE.md explains each):
  ingest     stream entries/s the relay turns into states vs a bare redis-py XREAD drain
  fanout     frames/s delivered to N clients vs bare websockets.broadcast of one frame
  latency    emit-to-client p50/p99/max at 2,000 updates/s over 1,000 users
  conflation one 1,000,000-item batch at full speed: frames received, exact final state
  naive      the same latency workload through a hand-written pub/sub relay; reconnects
  memory     relay RSS per idle authenticated connection
Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf.runner import main

if __name__ == "__main__":
    raise SystemExit(main(doc=__doc__))
