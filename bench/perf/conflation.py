"""Conflation: one 1,000,000-item batch at full speed: frames received, exact final state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from websockets.asyncio.client import connect

from perf.harness import SECRET
from perf.params import Ctx
from relay.auth import mint_token
from relay.emitter import AsyncEmitter


async def conflation(ctx: Ctx, port: int, emitter: AsyncEmitter) -> dict[str, Any]:
    p = ctx.params
    user, batch = "conf-user", f"conf-{time.time_ns()}"
    frames: list[dict[str, Any]] = []
    async with connect(f"ws://127.0.0.1:{port}/ws?token={mint_token(SECRET, user)}") as ws:
        await ws.recv()
        final_seq = asyncio.get_running_loop().create_future()

        async def collect() -> None:
            async for raw in ws:
                frame = json.loads(raw)
                if (
                    frame.get("action") == "batch_progress"
                    and frame["payload"]["batch_id"] == batch
                ):
                    frames.append(frame["payload"])
                    if final_seq.done() and frame["payload"]["seq"] >= final_seq.result():
                        return

        collector = asyncio.create_task(collect())
        calls = p.conflation_items // p.conflation_step
        next_call = 0

        async def worker() -> None:
            nonlocal next_call
            while next_call < calls:
                next_call += 1
                await emitter.incr(batch, user, successful=p.conflation_step)

        t0 = time.perf_counter()
        await emitter.start(batch, user, p.conflation_items, label="conflation")
        await asyncio.gather(*(worker() for _ in range(32)))
        duration = time.perf_counter() - t0
        state = await emitter.get(batch)
        assert state is not None
        final_seq.set_result(state.seq)
        if frames and frames[-1]["seq"] >= state.seq:
            collector.cancel()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(collector, 5)
    last = frames[-1] if frames else {}
    exact = all(
        last.get(k) == getattr(state, k)
        for k in ("status", "total", "processed", "successful", "failed", "seq")
    )
    bound = duration / 0.1 + 2
    return {
        "items": p.conflation_items,
        "calls": calls + 1,
        "incr_step": p.conflation_step,
        "duration_s": duration,
        "updates_s": (calls + 1) / duration,
        "frames": len(frames),
        "bound": bound,
        "last_frame_exact": exact,
        "final_state": state.to_dict(),
    }
