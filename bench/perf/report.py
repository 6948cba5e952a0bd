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


# -- the load phase: side-by-side table, the three targets, the plot --------------------

CPU_RATIO_TARGET = 1.0  # relay CPU per delivered frame / the baseline's, at 2,000 updates/s
P99_TARGET_MS = 120.0  # at 10,000 updates/s with the default 100 ms throttle
LAG_TARGET_MS = 1_000.0  # at twice the relay's one-frame-per-update capacity


def _row(summary: list[dict[str, Any]], run: str, server: str) -> dict[str, Any] | None:
    for r in summary:
        if r["run"] == run and r["server"] == server:
            return r
    return None


def load_table(summary: list[dict[str, Any]]) -> str:
    head = (
        "run",
        "server",
        "upd/s",
        "frames/s",
        "CPU",
        "us/frame",
        "p50 ms",
        "p99 ms",
        "max ms",
        "lag max ms",
        "exact",
    )
    rows = [head]
    for r in summary:
        server = r["server"]
        if server == "relay":
            server += f" {r['min_interval_ms']}ms"
        lag = r["reader_lag_max_ms"] if r["server"] == "relay" else r["client_lag_max_ms"]
        rows.append(
            (
                r["run"],
                server,
                f"{r['rate']:,.0f}",
                f"{r['frames_s']:,.0f}",
                f"{r['cpu_util'] * 100:.0f}%",
                f"{r['cpu_us_per_frame']:.1f}",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['max_ms']:.0f}",
                f"{lag:.0f}",
                f"{str(r['exact_all']).lower()} ({r['batches_wrong_max']} wrong)",
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    n = summary[0]["repeats"] if summary else 0
    note = (
        f"medians of {n} interleaved runs; lag max: relay_reader_lag_ms (relay), the worst "
        "per-second median latency at the clients (baseline)"
    )
    return "\n".join([*lines, note])


def targets(summary: list[dict[str, Any]]) -> str:
    """The issue's three targets with met / not met."""
    out = []
    ours, base = _row(summary, "2k", "relay"), _row(summary, "2k", "naive")
    if ours and base:
        ratio = ours["cpu_us_per_frame"] / base["cpu_us_per_frame"]
        out.append(
            f"CPU per delivered frame at 2,000 upd/s, relay / baseline = "
            f"{ours['cpu_us_per_frame']:.1f} / {base['cpu_us_per_frame']:.1f} us = {ratio:.2f} "
            f"(target <= {CPU_RATIO_TARGET}): {_met(ratio <= CPU_RATIO_TARGET)}"
        )
    ours, pinned = _row(summary, "10k", "relay"), _row(summary, "10k-pinned", "relay")
    if ours:
        worst = max(ours["p99_ms"], pinned["p99_ms"] if pinned else 0.0)
        pinned_text = f", pinned {pinned['p99_ms']:.1f}" if pinned else ""
        out.append(
            f"p99 latency at 10,000 upd/s, default throttle = {ours['p99_ms']:.1f} ms"
            f"{pinned_text} (target <= {P99_TARGET_MS:.0f} ms): {_met(worst <= P99_TARGET_MS)}"
        )
    over = _row(summary, "overload", "relay")
    if over and over.get("capacity"):
        factor = over.get("factor") or over["rate"] / over["capacity"]
        ok = over["reader_lag_max_ms"] < LAG_TARGET_MS and over["exact_all"] and factor >= 1.95
        out.append(
            f"reader lag at {over['rate']:,.0f} upd/s = {factor:.2f} x capacity "
            f"({over['capacity']:,.0f} frames per CPU-second; medians) = max "
            f"{over['reader_lag_max_ms']:.0f} ms, every batch exact: "
            f"{str(over['exact_all']).lower()} (target < {LAG_TARGET_MS:.0f} ms at 2 x): {_met(ok)}"
        )
    return "\n".join(out)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """p50/p99 latency and the worst lag against offered load, relay vs baseline (log scale)."""
    import matplotlib  # noqa: PLC0415 - dev extra, only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [
        ("relay", 100, False, "relay (100 ms throttle)", "tab:blue"),
        ("relay", 0, False, "relay (no throttle)", "tab:green"),
        ("naive", None, False, "baseline (pub/sub, hand-written)", "tab:red"),
    ]
    for server, interval, pinned, label, color in series:
        rows = sorted(
            (
                r
                for r in summary
                if r["server"] == server
                and r["pinned"] == pinned
                and (interval is None or r["min_interval_ms"] == interval)
            ),
            key=lambda r: r["rate"],
        )
        if not rows:
            continue
        x = [r["rate"] for r in rows]
        axes[0].plot(x, [r["p99_ms"] for r in rows], "o-", color=color, label=f"{label} p99")
        axes[0].plot(x, [r["p50_ms"] for r in rows], "o--", color=color, alpha=0.6, label="p50")
        lag = [
            r["reader_lag_max_ms"] if server == "relay" else r["client_lag_max_ms"] for r in rows
        ]
        axes[1].plot(x, lag, "o-", color=color, label=label)
    axes[0].set_title("latency (client receive - updated_at)")
    axes[1].set_title("worst lag in the window")
    for ax in axes:
        ax.set_xlabel("offered updates/s (1,000 users)")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def lag_lines(runs: list[dict[str, Any]]) -> str:
    """relay_reader_lag_ms over time (s since the emission started: ms), one line per relay run
    at or above 10,000 updates/s, from the last repeat."""
    last = max((r.get("repeat", 0) for r in runs), default=0)
    out = ["relay_reader_lag_ms over time (s: ms; warm-up included):"]
    for r in runs:
        if r["server"] != "relay" or r.get("repeat", 0) != last or r["rate"] < 10_000:
            continue
        points = " ".join(f"{t:.1f}:{v:.0f}" for t, v in r["reader_lag_ms"])
        name = f"{r['run']} ({r['rate']:,}/s, {r['min_interval_ms']} ms)"
        out.append(f"  {name}: {points}")
    return "\n".join(out)


def load_markdown(summary: list[dict[str, Any]]) -> str:
    """The load table as Markdown (for docs/PERFORMANCE.md)."""
    lines = [
        "| run | server | updates/s | frames/s | CPU | µs/frame | p50 ms | p99 ms | max ms "
        "| worst lag ms | every batch exact |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in summary:
        server = f"relay {r['min_interval_ms']} ms" if r["server"] == "relay" else "baseline"
        lag = r["reader_lag_max_ms"] if r["server"] == "relay" else r["client_lag_max_ms"]
        cpu = "-" if r["cpu_util"] != r["cpu_util"] else f"{r['cpu_util'] * 100:.0f} %"
        us = (
            "-"
            if r["cpu_us_per_frame"] != r["cpu_us_per_frame"]
            else f"{r['cpu_us_per_frame']:.1f}"
        )
        lines.append(
            f"| {r['run']} | {server} | {r['rate']:,.0f} | {r['frames_s']:,.0f} | {cpu} | {us} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.0f} | {lag:.0f} "
            f"| {'yes' if r['exact_all'] else 'no'} ({r['batches_wrong_max']} wrong) |"
        )
    return "\n".join(lines)
