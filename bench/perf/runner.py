"""The benchmark's runner: phases in order, one table and one JSON line."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from perf.fanout import phase_fanout
from perf.harness import Clients, RedisServer, log, raise_fd_limit
from perf.ingest import phase_ingest
from perf.latency import phase_latency_conflation
from perf.load import phase_load
from perf.memory import phase_memory
from perf.naive import phase_naive
from perf.params import FULL, QUICK, Ctx
from perf.report import (
    compact,
    lag_lines,
    load_markdown,
    load_table,
    machine,
    plot,
    table,
    targets,
)

PHASES = ("load", "ingest", "latency", "conflation", "naive", "memory", "fanout")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    params = QUICK if args.quick else FULL
    for item in args.set or ():
        key, _, value = item.partition("=")
        kind = type(getattr(params, key))
        parsed: Any = tuple(int(v) for v in value.split(",")) if kind is tuple else kind(value)
        params = replace(params, **{key: parsed})
    phases = set(args.only.split(",")) if args.only else set(PHASES)
    fd_limit = raise_fd_limit()
    logdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    profile_dir: Path | None = args.profile
    log(f"logs in {logdir}; fd limit {fd_limit}")
    server = RedisServer().start()
    clients = await Clients.start(params.workers, logdir)
    ctx = Ctx(params, server.url, logdir, clients, profile_dir, server._proc.pid)
    res: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "params": asdict(params),
        "machine": machine(server.url),
    }
    t0 = time.perf_counter()

    async def phase(name: str, work: Awaitable[Any], store: Callable[[Any], None]) -> None:
        """Run one phase; a phase that fails is reported and the others still run."""
        log(f"phase {name}")
        try:
            store(await work)
        except Exception as e:
            log(f"phase {name} failed: {e!r}")
            res.setdefault("errors", {})[name] = repr(e)

    try:
        if "load" in phases:
            await phase("load", phase_load(ctx), lambda v: res.__setitem__("load", v))
        if "ingest" in phases:
            await phase("ingest", phase_ingest(ctx), lambda v: res.__setitem__("ingest", v))
        if phases & {"latency", "conflation"}:
            await phase("latency", phase_latency_conflation(ctx, phases), res.update)
        if "naive" in phases:
            await phase("naive", phase_naive(ctx), lambda v: res.__setitem__("naive", v))
        if "memory" in phases:
            await phase("memory", phase_memory(ctx), lambda v: res.__setitem__("memory", v))
        if "fanout" in phases:
            res["fanout"] = []
            for size in params.fanout_sizes:
                await phase(f"fan-out {size}", phase_fanout(ctx, size), res["fanout"].append)
    finally:
        await clients.stop()
        server.stop()
    res["secs"] = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None, doc: str | None = None) -> int:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--plot", metavar="PNG", help="plot latency and lag vs offered load")
    parser.add_argument("--profile", metavar="DIR", help="py-spy record the relay into DIR")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a size (see Params)"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    if args.profile:
        args.profile = Path(args.profile).resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    try:
        uvloop: Any = importlib.import_module("uvloop")
        res: dict[str, Any] = uvloop.run(run(args))
    except ImportError:
        res = asyncio.run(run(args))
    if "load" in res:
        print(load_table(res["load"]["summary"]))
        print()
        print(lag_lines(res["load"]["runs"]))
        print()
        print(targets(res["load"]["summary"]))
        print()
        if args.plot:
            plot(res["load"]["summary"], Path(args.plot))
            Path(args.plot).with_suffix(".md").write_text(load_markdown(res["load"]["summary"]))
    print(table(res))
    print(json.dumps(compact(res), sort_keys=True))
    return 0
