"""The printed table and the JSON line."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Any

import redis


def machine(redis_url: str) -> dict[str, Any]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    info: Any = redis.Redis.from_url(redis_url).info("server")
    try:
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        loop = "asyncio"

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": sys.version.split()[0],
        "redis": info.get("redis_version"),
        "redis_py": redis.__version__,
        "websockets": importlib.metadata.version("websockets"),
        "loop": loop,
        "kernel": os.uname().release,
    }


def table(res: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str, str, str]] = []

    def add(name: str, ours: str, limit: str, ratio: str, target: str, met: bool | None) -> None:  # noqa: PLR0917
        rows.append((name, ours, limit, ratio, target, "-" if met is None else str(met).lower()))

    if "ingest" in res:
        i = res["ingest"]
        add(
            f"ingest entries/s ({i['entries']:,} entries, {i['batches']:,} batches, "
            f"{i['users']:,} users)",
            f"{i['relay_entries_s']:,.0f}",
            f"{i['xread_entries_s']:,.0f} (XREAD)",
            f"{i['ratio']:.2f}",
            ">= 0.5",
            i["ratio"] >= 0.5,
        )
        add(
            "  same burst, owners not connected (reader only)",
            f"{i['unwatched_entries_s']:,.0f}",
            f"{i['xread_entries_s']:,.0f} (XREAD)",
            f"{i['unwatched_ratio']:.2f}",
            ">= 0.5",
            i["unwatched_ratio"] >= 0.5,
        )
    for f in res.get("fanout", []):
        add(
            f"fan-out frames/s, {f['clients']:,} clients",
            f"{f['relay']['frames_s']:,.0f}",
            f"{f['bare']['frames_s']:,.0f} (broadcast)",
            f"{f['ratio']:.2f}",
            ">= 0.7",
            f["ratio"] >= 0.7,
        )
    if "latency" in res:
        lat = res["latency"]["lat_clean"]
        add(
            "latency p50/p99/max ms (2,000 upd/s, 1,000 users)",
            f"{lat['p50']:.1f}/{lat['p99']:.1f}/{lat['max']:.1f}",
            "",
            "",
            "p99 <= 20",
            lat["p99"] <= 20,
        )
    if "memory" in res:
        m = res["memory"]
        add(
            f"RSS per idle authenticated conn ({m['connections']:,})",
            f"{m['bytes_per_conn'] / 1024:.1f} KB",
            "",
            "",
            "<= 30 KB",
            m["bytes_per_conn"] <= 30 * 1024,
        )
    if "conflation" in res:
        c = res["conflation"]
        add(
            f"conflation: frames for {c['items']:,} items in {c['duration_s']:.1f} s",
            f"{c['frames']} (exact final: {str(c['last_frame_exact']).lower()})",
            f"bound {c['bound']:.0f}",
            "",
            "<= dur/100ms + 2",
            c["frames"] <= c["bound"] and c["last_frame_exact"],
        )
    if "naive" in res and "latency" in res:
        ours, naive = res["latency"], res["naive"]["latency"]
        ratio = ours["cpu_us_per_delivered"] / naive["cpu_us_per_delivered"]
        add(
            "CPU us per delivered update vs naive pub/sub relay",
            f"{ours['cpu_us_per_delivered']:.1f}",
            f"{naive['cpu_us_per_delivered']:.1f} (naive)",
            f"{ratio:.2f}",
            "<= 0.33",
            ratio <= 1 / 3,
        )
        nl = naive["lat_clean"]
        add(
            "naive relay latency p50/p99/max ms",
            f"{ours['lat_clean']['p99']:.1f} (p99)",
            f"{nl['p50']:.1f}/{nl['p99']:.1f}/{nl['max']:.1f}",
            "",
            "",
            None,
        )
    if "reconnect" in res and "naive" in res:
        ours_rc, naive_rc = res["reconnect"], res["naive"]["reconnect"]
        add(
            f"reconnect mid-batch: final states lost ({ours_rc['clients']} clients)",
            f"{ours_rc['final_state_lost']}",
            f"{naive_rc['final_state_lost']} (naive; "
            f"{naive_rc['updates_never_seen']} updates never seen)",
            "",
            "0",
            ours_rc["final_state_lost"] == 0,
        )
    head = ("measurement", "relay", "limit / baseline", "ratio", "target", "met")
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(6)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(head, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def compact(res: dict[str, Any]) -> dict[str, Any]:
    """The JSON line: drop raw sample lists, round floats."""

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, float):
            return round(v, 3)
        return v

    return walk(res)  # type: ignore[no-any-return]
