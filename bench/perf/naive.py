"""The latency workload and the reconnect test through the hand-written pub/sub relay."""

from __future__ import annotations

import time
from typing import Any

from naive_relay import CHANNEL, naive_message

from perf.harness import BENCH, PY, SECRET, LineProc, async_redis, free_port, log
from perf.latency import LATENCY_STEPS, Step, reconnect_test, run_latency
from perf.params import Ctx


async def phase_naive(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params
    port = free_port()
    errlog = (ctx.logdir / "naive.log").open("ab")
    naive = await LineProc.spawn(
        [
            PY,
            str(BENCH / "naive_relay.py"),
            "--port",
            str(port),
            "--redis-url",
            ctx.redis_url,
            "--secret",
            SECRET,
        ],
        errlog,
    )
    client = async_redis(ctx.redis_url)
    states: dict[str, dict[str, Any]] = {}

    async def publish(batch: str, user: str, total: int | None, add: int) -> None:
        await client.publish(CHANNEL + user, state(batch, user, total, add))

    def state(batch: str, user: str, total: int | None, add: int) -> str:
        now = time.time() * 1000
        s = states.get(batch)
        if s is None or total is not None:
            s = states[batch] = {
                "batch_id": batch,
                "user_id": user,
                "status": "pending",
                "total": total or 0,
                "processed": 0,
                "successful": 0,
                "failed": 0,
                "seq": 0,
                "started_at": now,
                "updated_at": now,
                "label": "bench",
            }
        s["successful"] += add
        s["processed"] += add
        s["seq"] += 1
        s["updated_at"] = now
        if s["processed"] > 0:
            s["status"] = "processing"
        if s["total"] > 0 and s["processed"] >= s["total"]:
            s["status"] = "completed"
        return naive_message(s)

    try:
        await naive.recv()

        async def op(calls: list[Step]) -> None:
            pipe = client.pipeline(transaction=False)
            for u, gen, step in calls:
                batch, user = f"nlat-b{u}-{gen}", f"lat-u{u}"
                message = state(batch, user, LATENCY_STEPS - 1 if step == 0 else None, min(step, 1))
                pipe.publish(CHANNEL + user, message)
            await pipe.execute()

        out: dict[str, Any] = {"latency": await run_latency(ctx, port, naive.proc.pid, op, "naive")}
        log(f"naive latency: {out['latency']['lat_clean']}")

        async def start(b: str, u: str) -> None:
            await publish(b, u, 40, 0)

        async def incr(b: str, u: str) -> None:
            await publish(b, u, None, 1)

        out["reconnect"] = await reconnect_test(port, p.reconnect_users, start, incr, "naive")
    finally:
        naive.proc.terminate()
        await naive.proc.wait()
        errlog.close()
        await client.aclose()
    return out
