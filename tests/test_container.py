"""What can be tested of the container without Docker: the Dockerfile and compose.yaml say what
they should, `relay serve` starts with exactly their environment and answers /healthz, and the
logging set-up (relay/logs.py) writes what operators and log shippers expect."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from relay.auth import mint_token
from relay.emitter import Emitter
from relay.logs import configure

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 15.0
SECRET = "container-test-secret-0123456789abcdef"


# -- the files ----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile():
        if instruction == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def compose_relay_env() -> dict[str, str]:
    """The relay service's `environment:` mapping (compose.yaml keeps it as KEY: value lines)."""
    text = (ROOT / "compose.yaml").read_text()
    service = text.split("\n  relay:\n", 1)[1]
    block = service.split("    environment:\n", 1)[1]
    env: dict[str, str] = {}
    for line in block.splitlines():
        m = re.fullmatch(r" {6}([A-Z][A-Z0-9_]*): (.+)", line)
        if not m:
            break
        env[m.group(1)] = m.group(2)
    return env


def test_dockerfile_is_slim_non_root_with_healthcheck() -> None:
    steps = dockerfile()
    instructions = dict(steps)
    assert re.fullmatch(r"python:3\.\d+-slim", instructions["FROM"])
    user = instructions["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric non-root user (runAsNonRoot can check it)"
    assert '".[speed]"' in instructions["RUN"], "uvloop via the speed extra"
    assert "/healthz" in instructions["HEALTHCHECK"]
    assert json.loads(instructions["CMD"]) == ["relay", "serve"]
    assert [i for i, _ in steps].index("USER") < [i for i, _ in steps].index("CMD")
    env = dockerfile_env()
    assert env["RELAY_SERVER_HOST"] == "0.0.0.0"
    assert env["RELAY_SERVER_PORT"] == "8765"
    assert env["RELAY_LOG_FORMAT"] == "json"
    assert not any("SECRET" in key for key in env), "no secret baked into the image"


def test_compose_wires_redis_and_a_required_secret() -> None:
    text = (ROOT / "compose.yaml").read_text()
    env = compose_relay_env()
    assert env["RELAY_REDIS_URL"] == "redis://redis:6379/0"
    assert env["RELAY_AUTH_SECRET"].startswith("${RELAY_AUTH_SECRET:?"), "no default secret"
    assert '"8765:8765"' in text
    assert "build: ." in text
    assert text.count("healthcheck:") == 2
    assert "condition: service_healthy" in text


# -- `relay serve` as the image runs it -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _relay_command() -> list[str]:
    script = Path(sys.executable).with_name("relay")  # the console script the image runs
    return (
        [str(script), "serve"] if script.exists() else [sys.executable, "-m", "relay.cli", "serve"]
    )


def _image_env(redis_url: str, prefix: str, port: int) -> dict[str, str]:
    """The Dockerfile's ENV plus compose's environment, with the test's Redis, port and secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env |= dockerfile_env() | compose_relay_env()
    env |= {
        "RELAY_REDIS_URL": redis_url,
        "RELAY_AUTH_SECRET": SECRET,
        "RELAY_SERVER_PORT": str(port),
        "RELAY_REDIS_PREFIX": prefix,  # the fixtures clean up keys under it
    }
    return env


def test_relay_serve_with_the_image_environment(
    redis_url: str, prefix: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    port = _free_port()
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            _relay_command(),
            env=_image_env(redis_url, prefix, port),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=tmp_path,
        )
    token = mint_token(SECRET, "alice", ttl_s=60)
    bad_token = mint_token("not-the-secret-" * 3, "alice", ttl_s=60)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for path in ("/healthz", "/readyz"):  # ready once Redis answers and the reader runs
            while _status(port, path) != 200:
                assert proc.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, f"no {path}: " + stderr_path.read_text()
                time.sleep(0.05)

        # one authenticated connection (token in the query string) receiving 40 updates
        emitter = Emitter(redis_client, prefix=prefix)
        with connect(f"ws://127.0.0.1:{port}/ws?token={token}", open_timeout=5) as ws:
            assert json.loads(ws.recv(timeout=5)) == {"action": "auth_success", "user_id": "alice"}
            emitter.start("b-1", "alice", 40)
            for i in range(40):
                emitter.item("b-1", "alice", f"i{i}")
            while True:
                frame = json.loads(ws.recv(timeout=5))
                if (
                    frame["action"] == "batch_progress"
                    and frame["payload"]["status"] == "completed"
                ):
                    break
        with pytest.raises(InvalidStatus) as refused:  # refused before the upgrade
            connect(f"ws://127.0.0.1:{port}/ws?token={bad_token}", open_timeout=5)
        assert refused.value.response.status_code == 401

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(EXIT_TIMEOUT_S) == 0, stderr_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_TIMEOUT_S)

    text = stderr_path.read_text()
    assert token not in text and bad_token not in text, "a token reached the logs"
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # all JSON
    events = [r["event"] for r in records]
    assert events[0] == "relay_started" and events[-1] == "relay_stopped", events
    assert all(r["level"] in {"info", "warning"} and r["timestamp"].endswith("Z") for r in records)
    opened = [r for r in records if r["event"] == "connection_opened"]
    assert [r.get("user_id") for r in opened] == ["alice"], opened
    closed = [r for r in records if r["event"] == "connection_closed"]
    assert any(r.get("user_id") == "alice" for r in closed), closed
    for r in closed:
        assert isinstance(r["code"], int) and isinstance(r["duration_s"], float | int)
    # per connection a handful of lines (open, close, auth failure), never one per frame
    assert len(records) <= 10, events


# -- relay/logs.py ------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in ("websockets", "asyncio", "redis")}
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)
        structlog.contextvars.clear_contextvars()


def _records(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_with_level_filter_and_context() -> None:
    out = io.StringIO()
    configure("info", "auto", stream=out)  # not a TTY: JSON
    log = structlog.get_logger("relay.test")
    structlog.contextvars.bind_contextvars(conn_id="c1")
    log.debug("hidden")
    log.info("connection_closed", code=1000, duration_s=1.5)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second = _records(out)
    assert first["event"] == "connection_closed" and first["level"] == "info"
    assert (first["code"], first["duration_s"], first["conn_id"]) == (1000, 1.5, "c1")
    assert first["timestamp"].endswith("Z")
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]


@pytest.mark.usefixtures("restore_logging")
def test_library_loggers_are_quiet_below_warning_and_rendered_alike() -> None:
    out = io.StringIO()
    configure("debug", "json", stream=out)
    structlog.get_logger("relay.test").debug("relay_debug_is_on")
    ws_log = logging.getLogger("websockets.server")
    ws_log.debug("< GET /ws?token=secret-token HTTP/1.1")  # the request line websockets logs
    ws_log.info("connection open")
    logging.getLogger("asyncio").info("poll took 120 ms")
    ws_log.warning("something odd")
    records = _records(out)
    assert [r["event"] for r in records] == ["relay_debug_is_on", "something odd"]
    assert records[1]["logger"] == "websockets.server" and records[1]["level"] == "warning"
    assert "secret-token" not in out.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_warning_level_hides_info() -> None:
    out = io.StringIO()
    configure("WARNING", "json", stream=out)
    log = structlog.get_logger("relay.test")
    log.info("hidden")
    log.warning("shown")
    assert [r["event"] for r in _records(out)] == ["shown"]


@pytest.mark.usefixtures("restore_logging")
def test_console_format() -> None:
    out = io.StringIO()
    configure("info", "console", stream=out)
    structlog.get_logger("relay.test").info("relay_started", port=8765)
    logging.getLogger("websockets.server").error("handler failed")
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 2, text
    assert "relay_started" in lines[0] and "port=8765" in lines[0]
    assert "handler failed" in lines[1]
    assert "\x1b[" not in text, "no colour codes when the stream is not a TTY"
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


@pytest.mark.usefixtures("restore_logging")
def test_configure_twice_keeps_one_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure("info", "json", stream=first)
    configure("info", "json", stream=second)
    logging.getLogger("redis").warning("once")
    assert first.getvalue() == ""
    assert [r["event"] for r in _records(second)] == ["once"]


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure("verbose")
    with pytest.raises(ValueError, match="log format"):
        configure("info", "xml")
