"""Least-privilege Redis users (ACL) for the relay and for workers, on a private redis-server.

The documented `ACL SETUSER` lines (docs/DEPLOYMENT.md) are enough for everything, and with any
one permission removed `relay check` (or `relay check --worker`) names it and exits 1, and the
relay's /readyz says "redis permission denied: <command>".
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
from redis_server import RedisServer
from relay_harness import open_client, running_relay, token
from test_faults_redis import Watcher, all_exact, eventually
from websockets.exceptions import ConnectionClosed

from relay import cli
from relay.acl import OPTIONAL_RELAY_COMMANDS, RELAY_COMMANDS, worker_commands
from relay.emitter import SCRIPT, AsyncEmitter

DOCS = Path(__file__).resolve().parent.parent / "docs" / "DEPLOYMENT.md"
PASSWORD = "s3cret-pw"


def relay_rules(
    prefix: str, commands: tuple[str, ...] | list[str] = (*RELAY_COMMANDS, *OPTIONAL_RELAY_COMMANDS)
) -> list[str]:
    return ["resetkeys", f"%R~{{{prefix}:*", "resetchannels", "-@all", *(f"+{c}" for c in commands)]


def worker_rules(prefix: str, commands: list[str] | None = None) -> list[str]:
    commands = worker_commands(SCRIPT) if commands is None else commands
    return ["resetkeys", f"~{{{prefix}:*", "resetchannels", "-@all", *(f"+{c}" for c in commands)]


def setuser_line(name: str, rules: list[str]) -> str:
    return f"ACL SETUSER {name} on >PASSWORD " + " ".join(rules)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def make_user(server: RedisServer, rules: list[str]) -> str:
    """A fresh ACL user with `rules`; its URL."""
    name = f"u{uuid.uuid4().hex[:10]}"
    with server.client() as admin:
        admin.execute_command("ACL", "SETUSER", name, "on", f">{PASSWORD}", *rules)
    return f"redis://{name}:{PASSWORD}@127.0.0.1:{server.port}/0"


async def check(
    url: str, prefix: str, monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str, str]:
    """`relay check [args]` in a thread (it runs its own event loop): exit code, out, err."""
    monkeypatch.setenv("RELAY_REDIS_URL", url)
    monkeypatch.setenv("RELAY_REDIS_PREFIX", prefix)
    monkeypatch.setenv("RELAY_AUTH_SECRET", "x" * 32)
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = await asyncio.to_thread(cli.main, ["check", *args])
    return code, out.getvalue(), err.getvalue()


def test_docs_show_the_exact_acl_lines() -> None:
    text = DOCS.read_text()
    assert setuser_line("progress-relay", relay_rules("progress")) in text
    assert setuser_line("progress-worker", worker_rules("progress")) in text


async def test_least_privilege_users_check_serve_and_emit(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay_url = make_user(server, relay_rules(prefix))
    worker_url = make_user(server, worker_rules(prefix))
    code, out, err = await check(relay_url, prefix, monkeypatch)
    assert code == 0, err
    assert "the relay's commands are allowed" in out
    code, out, err = await check(worker_url, prefix, monkeypatch, "--worker")
    assert code == 0, err
    worker = redis.asyncio.Redis.from_url(worker_url)
    try:
        em = AsyncEmitter(worker, prefix=prefix)
        batch = str(uuid.uuid4())
        await em.start(batch, "ann", 3)
        async with running_relay(relay_url, prefix) as relay:
            assert await relay.readiness() == (True, "ok")
            watcher = Watcher(f"ws://127.0.0.1:{relay.port}/ws", "ann").start()
            try:
                await watcher.snapshot_done.wait()
                for i in range(3):
                    await em.item(batch, "ann", f"i{i}", ok=True)
                await em.finish(batch, "ann", "completed")
                await all_exact([watcher], em.get, [batch])
            finally:
                await watcher.stop()
    finally:
        await worker.aclose()


@pytest.mark.parametrize("command", RELAY_COMMANDS)
async def test_relay_without_one_command_says_which(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    url = make_user(server, relay_rules(prefix, [*RELAY_COMMANDS, *OPTIONAL_RELAY_COMMANDS]))
    with server.client() as admin:  # take the one command away again
        admin.execute_command("ACL", "SETUSER", url.split("//")[1].split(":")[0], f"-{command}")
    code, _out, err = await check(url, prefix, monkeypatch)
    assert code == 1
    assert f"may not run what the relay needs: {command} " in err, err
    async with running_relay(url, prefix) as relay:
        reason = ""

        async def refused() -> str | None:
            nonlocal reason
            ready, reason = await relay.readiness()
            assert not ready or reason == "ok"
            return None if f"redis permission denied: {command}" in reason else reason

        await eventually(refused, 10.0)
        if command == "zrangebyscore":  # no snapshot: the client is told to retry later
            ws = await open_client(relay)
            await ws.send(json.dumps({"type": "auth", "token": token("ann")}))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1013
    print(f"\nwithout {command}: check says {err.strip()!r}; /readyz says {reason!r}")


async def test_relay_without_info_check_warns_and_passes(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_user(server, relay_rules(prefix, RELAY_COMMANDS))
    code, _out, err = await check(url, prefix, monkeypatch)
    assert code == 0
    assert "may not run info" in err, err
    async with running_relay(url, prefix) as relay:
        assert await relay.readiness() == (True, "ok")


async def test_worker_without_one_command_check_says_which(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    needed = worker_commands(SCRIPT)
    for command in needed:
        url = make_user(server, worker_rules(prefix, [c for c in needed if c != command]))
        code, _out, err = await check(url, prefix, monkeypatch, "--worker")
        assert code == 1, command
        named = err.split("needs: ", 1)[1].split(" (on keys")[0].split(", ")
        assert command in named or (command == "evalsha" and named[-1].startswith("evalsha")), err
    print(f"\nworker check names each of {len(needed)} commands when it is missing")
