"""The relay on a TLS-only redis-server: mutual TLS end to end, and failures that say why.

Certificates are made in the test (tests/tls_certs.py); the server has no plain-text port.
"""

from __future__ import annotations

import asyncio
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.asyncio
import structlog
from redis_server import RedisServer, ServerTls
from relay_harness import running_relay, wait_until
from test_faults_redis import Watcher, all_exact
from tls_certs import CertificateAuthority

from relay import cli
from relay.emitter import AsyncEmitter


@dataclass(frozen=True)
class TlsSetup:
    server: RedisServer
    ca: Path
    wrong_ca: Path
    client_cert: Path
    client_key: Path

    def url(self, *, ca: Path | None = None, client_cert: bool = True) -> str:
        params = {"ssl_ca_certs": str(ca or self.ca)}
        if client_cert:
            params |= {"ssl_certfile": str(self.client_cert), "ssl_keyfile": str(self.client_key)}
        return f"rediss://127.0.0.1:{self.server.port}/0?{urllib.parse.urlencode(params)}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSetup]:
    """One redis-server speaking TLS only, requiring a client certificate (mutual TLS)."""
    d = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority(d)
    wrong = CertificateAuthority(d, "some other CA")
    server_files = ca.issue("server", "localhost", server=True)
    client_files = ca.issue("client", "relay", server=False)
    settings = ServerTls(
        ca=ca.files.cert, cert=server_files.cert, key=server_files.key,
        client_cert=client_files.cert, client_key=client_files.key, auth_clients=True,
    )  # fmt: skip
    with RedisServer(tls=settings) as server:
        yield TlsSetup(server, ca.files.cert, wrong.files.cert, client_files.cert, client_files.key)


async def test_mutual_tls_check_serve_and_emit(
    tls: TlsSetup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    url = tls.url()
    monkeypatch.setenv("RELAY_REDIS_URL", url)
    monkeypatch.setenv("RELAY_AUTH_SECRET", "x" * 32)
    assert await asyncio.to_thread(cli.main, ["check"]) == 0
    assert "redis: ok" in capsys.readouterr().out
    client = redis.asyncio.Redis.from_url(url)
    try:
        em = AsyncEmitter(client, prefix=prefix)
        async with running_relay(url, prefix) as relay:
            assert await relay.readiness() == (True, "ok")
            batch = str(uuid.uuid4())
            await em.start(batch, "ann", 5)
            watcher = Watcher(f"ws://127.0.0.1:{relay.port}/ws", "ann").start()
            try:
                await watcher.snapshot_done.wait()
                for i in range(5):
                    await em.item(batch, "ann", f"i{i}", ok=i != 2)
                await em.finish(batch, "ann", "completed")
                await all_exact([watcher], em.get, [batch])
                assert watcher.states[batch]["successful"] == 4
            finally:
                await watcher.stop()
    finally:
        await client.aclose()


async def test_wrong_ca_names_the_certificate_problem(tls: TlsSetup) -> None:
    """The server's certificate is not signed by the CA the relay trusts: /readyz and the
    reader's log line both say "certificate verify failed", not just `ConnectionError`."""
    url = tls.url(ca=tls.wrong_ca)
    with structlog.testing.capture_logs() as logs:
        async with running_relay(url, f"t{uuid.uuid4().hex[:12]}") as relay:
            ready, reason = await relay.readiness()
            assert not ready
            assert "certificate verify failed" in reason, reason
            assert reason.startswith("redis unreachable: ConnectionError: "), reason
            await wait_until(lambda: any(e["event"] == "redis_read_failed" for e in logs))
    failed = next(e for e in logs if e["event"] == "redis_read_failed")
    assert failed["error_type"] == "ConnectionError"
    assert "CERTIFICATE_VERIFY_FAILED" in failed["error"], failed
    print(f"\nwrong CA: /readyz reason {reason!r}")


def test_check_without_client_certificate_fails_with_the_reason(
    tls: TlsSetup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mutual TLS: no client certificate, the server refuses; `relay check` exits 1 and says why."""
    monkeypatch.setenv("RELAY_REDIS_URL", tls.url(client_cert=False))
    monkeypatch.setenv("RELAY_AUTH_SECRET", "x" * 32)
    assert cli.main(["check"]) == 1
    err = capsys.readouterr().err
    assert "redis: unreachable" in err
    print(f"\nno client certificate: {err.strip()}")
