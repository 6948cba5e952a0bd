"""`[auth] jwks_url`: keys from a real local HTTP server, real JWTs, a real relay.

The JWKS endpoint is a ThreadingHTTPServer on 127.0.0.1 whose answer the test changes: the key
set (rotation), "down" (not listening at all), and "slow" (requests held until released).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from relay_harness import make_config, recv_json, wait_http, wait_until, ws_url
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.auth import TokenVerifier
from relay.config import AuthConfig, load_config, require_verifier
from relay.errors import AuthFailed, ConfigError, JwksError
from relay.jwks import JwksCache, parse_jwks
from relay.server import Relay

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class SigningKey:
    """A private key made for the test, its `kid`, algorithm and public JWK."""

    def __init__(self, kid: str, alg: str) -> None:
        self.kid, self.alg = kid, alg
        self.private: PrivateKey
        if alg.startswith("ES"):
            self.private = ec.generate_private_key(ec.SECP256R1())
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk: dict[str, Any] = {**jwk, "kid": kid, "use": "sig", "alg": alg}

    def token(self, user: str, ttl_s: float = 3600, **extra: Any) -> str:
        now = int(time.time())
        claims = {"sub": user, "iat": now, "exp": now + int(ttl_s), **extra}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid})


KEY_A = SigningKey("key-a", "RS256")
KEY_B = SigningKey("key-b", "RS256")
KEY_C = SigningKey("key-c", "ES256")


class JwksServer:
    """A JWKS endpoint on a fixed local port that can go down and come back."""

    def __init__(self) -> None:
        self.keys: list[SigningKey] = [KEY_A]
        self.hits = 0  # requests answered or held
        self.hold = False  # True: requests wait until release()
        self.held = threading.Event()  # set when a request is waiting
        self._release = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    def start(self) -> JwksServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                if outer.hold:
                    outer.held.set()
                    outer._release.wait(30)
                body = json.dumps({"keys": [k.jwk for k in outer.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Down: nothing listens on the port any more (connection refused)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def release(self) -> None:
        self.hold = False
        self._release.set()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer().start()
    yield server
    server.release()
    server.stop()


def jwks_auth(url: str, **more: Any) -> dict[str, Any]:
    return {"algorithms": ["RS256", "ES256"], "secret": "", "jwks_url": url, **more}


@pytest.fixture
async def jwks_relay(redis_url: str, prefix: str) -> AsyncIterator[Callable[..., Any]]:
    relays: list[Relay] = []

    async def start(url: str, **auth: Any) -> Relay:
        relay = Relay(make_config(redis_url, prefix, auth=jwks_auth(url, **auth)))
        await relay.start()
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        await relay.shutdown()


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(relay: Relay, line_start: str) -> float:
    text = relay.metrics.render().decode()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not in /metrics")


async def first_message(relay: Relay, tok: str) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(ws_url(relay), open_timeout=10)
    await ws.send(json.dumps({"type": "auth", "token": tok}))
    return ws, await recv_json(ws, timeout=40)


async def close_code(ws: ClientConnection) -> int | None:
    async with asyncio.timeout(10):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as e:
            return e.rcvd.code if e.rcvd else None


# -- the relay --------------------------------------------------------------------------------


async def test_rotation_to_a_new_key(
    jwks_server: JwksServer, jwks_relay: Callable[..., Any]
) -> None:
    jwks_server.keys = [KEY_A, KEY_C]
    relay: Relay = await jwks_relay(jwks_server.url)
    await wait_http(f"http://127.0.0.1:{relay.port}/readyz", 200)
    ws, frame = await first_message(relay, KEY_A.token("ann"))
    assert frame == {"action": "auth_success", "user_id": "ann"}
    ws_es, frame = await first_message(relay, KEY_C.token("esther"))  # ES256
    assert frame == {"action": "auth_success", "user_id": "esther"}
    hits = jwks_server.hits

    # The provider rotates: B replaces A. A token signed with B names an unknown kid: the
    # relay refetches once and accepts it, on both authentication paths.
    jwks_server.keys = [KEY_B, KEY_C]
    ws_b, frame = await first_message(relay, KEY_B.token("bob"))
    assert frame == {"action": "auth_success", "user_id": "bob"}
    assert jwks_server.hits == hits + 1
    hs = await connect(
        ws_url(relay), additional_headers={"Authorization": f"Bearer {KEY_B.token('hal')}"}
    )
    assert await recv_json(hs) == {"action": "auth_success", "user_id": "hal"}
    # A's tokens are refused now that A left the set; connections already open stay open.
    ws_old, frame = await first_message(relay, KEY_A.token("ann"))
    assert frame["action"] == "auth_error"
    assert await close_code(ws_old) == 4003
    assert metric(relay, 'relay_auth_failures_total{reason="unknown_key"}') == 1
    assert metric(relay, 'relay_jwks_fetches_total{result="ok"}') == hits + 1
    await ws.send(json.dumps({"action": "ping"}))
    assert await recv_json(ws) == {"action": "pong"}
    for client in (ws, ws_es, ws_b, hs):
        await client.close()


async def test_endpoint_down_at_start_then_later_keys_are_kept(
    jwks_server: JwksServer, jwks_relay: Callable[..., Any]
) -> None:
    jwks_server.stop()  # down before the relay starts
    relay: Relay = await jwks_relay(jwks_server.url, jwks_cache_s=1.0)
    base = f"http://127.0.0.1:{relay.port}"
    status, body = await asyncio.to_thread(http_get, f"{base}/readyz")
    assert status == 503 and "JWKS" in json.loads(body)["reason"], body
    assert "relay_ready 0.0" in (await asyncio.to_thread(http_get, f"{base}/metrics"))[1]
    # The token may be fine: "try again later", not "invalid token" (the browser retries 1013).
    ws, frame = await first_message(relay, KEY_A.token("early"))
    assert frame["action"] == "auth_error"
    assert await close_code(ws) == 1013
    with pytest.raises(InvalidStatus) as info:
        await connect(ws_url(relay, f"?token={KEY_A.token('early')}"))
    assert info.value.response.status_code == 503

    jwks_server.start()  # comes up on the same port: the background retry loads the set
    await wait_http(f"{base}/readyz", 200)
    ws, frame = await first_message(relay, KEY_A.token("ann"))
    assert frame == {"action": "auth_success", "user_id": "ann"}
    await ws.close()

    jwks_server.stop()  # down again: refreshes (every second) fail, the keys stay
    failed = metric(relay, 'relay_jwks_fetches_total{result="error"}')
    await wait_until(
        lambda: metric(relay, 'relay_jwks_fetches_total{result="error"}') >= failed + 2
    )
    assert await asyncio.to_thread(http_get, f"{base}/readyz") == (
        200,
        '{"ready": true, "reason": "ok"}\n',
    )
    ws, frame = await first_message(relay, KEY_A.token("ann"))
    assert frame == {"action": "auth_success", "user_id": "ann"}
    ws_b, frame = await first_message(relay, KEY_B.token("bob"))  # unknown, refetch fails
    assert frame["action"] == "auth_error"
    assert await close_code(ws_b) == 4003
    await ws.close()


async def test_slow_endpoint_blocks_nothing_else(
    jwks_server: JwksServer, jwks_relay: Callable[..., Any]
) -> None:
    relay: Relay = await jwks_relay(jwks_server.url, jwks_timeout_s=30.0)
    base = f"http://127.0.0.1:{relay.port}"
    await wait_http(f"{base}/readyz", 200)
    jwks_server.keys = [KEY_A, KEY_B]
    jwks_server.hold = True
    # A token naming the new key makes the relay refetch; the endpoint holds the request.
    waiting = await connect(ws_url(relay))
    await waiting.send(json.dumps({"type": "auth", "token": KEY_B.token("bob")}))
    assert await asyncio.to_thread(jwks_server.held.wait, 20)
    # Meanwhile the relay serves HTTP and authenticates other connections on both paths.
    assert (await asyncio.to_thread(http_get, f"{base}/healthz"))[0] == 200
    assert (await asyncio.to_thread(http_get, f"{base}/metrics"))[0] == 200
    ws, frame = await first_message(relay, KEY_A.token("ann"))
    assert frame == {"action": "auth_success", "user_id": "ann"}
    hs = await connect(ws_url(relay, f"?token={KEY_A.token('hal')}"))
    assert await recv_json(hs) == {"action": "auth_success", "user_id": "hal"}
    # The held refetch completes: the waiting connection is authenticated with the new key.
    jwks_server.release()
    assert await recv_json(waiting, timeout=30) == {"action": "auth_success", "user_id": "bob"}
    for client in (waiting, ws, hs):
        await client.close()


# -- the cache and verifier on their own (still real HTTP) -------------------------------------


async def test_unknown_kid_refetch_is_rate_limited(jwks_server: JwksServer) -> None:
    jwks_server.keys = [KEY_A]
    cache = JwksCache(
        jwks_server.url, algorithms=["RS256"], cache_s=3600, timeout_s=10, min_refetch_s=3600
    )
    verifier = TokenVerifier(algorithms=["RS256"], key="", jwks=cache)
    assert await cache.refresh() and jwks_server.hits == 1
    assert (await verifier.verify_async(KEY_A.token("ann"))).user_id == "ann"
    assert jwks_server.hits == 1  # a known kid never fetches
    for i in range(20):  # a client spraying made-up kids
        forged = jwt.encode(
            {"sub": "x", "exp": int(time.time()) + 60},
            KEY_B.private,
            algorithm="RS256",
            headers={"kid": f"made-up-{i}"},
        )
        with pytest.raises(AuthFailed) as info:
            await verifier.verify_async(forged)
        assert (info.value.code, info.value.reason) == (4003, "unknown_key")
    assert jwks_server.hits == 2  # one refetch for twenty unknown kids
    # Concurrent refreshes share one request.
    await asyncio.gather(*(cache.refresh() for _ in range(10)))
    assert jwks_server.hits == 3


async def test_cache_keeps_keys_when_a_fetch_fails(jwks_server: JwksServer) -> None:
    cache = JwksCache(jwks_server.url, algorithms=["RS256"], cache_s=60, timeout_s=5)
    assert await cache.refresh()
    jwks_server.keys = []  # a broken answer (no usable key) does not replace the set
    assert not await cache.refresh()
    jwks_server.stop()
    assert not await cache.refresh()
    assert [k.kid for k in cache.keys_for("key-a")] == ["key-a"] and cache.loaded


async def test_algorithm_confusion_and_forgery_refused(jwks_server: JwksServer) -> None:
    jwks_server.keys = [KEY_A, KEY_C]
    cache = JwksCache(jwks_server.url, algorithms=["RS256", "ES256"], cache_s=60, timeout_s=5)
    verifier = TokenVerifier(algorithms=["RS256", "ES256"], key="", jwks=cache)
    assert await cache.refresh()
    now = int(time.time())
    cases = {
        # signed by B but naming A's kid
        "bad_signature": jwt.encode(
            {"sub": "x", "exp": now + 60}, KEY_B.private, "RS256", headers={"kid": "key-a"}
        ),
        # RS256 token naming the ES256 key
        "bad_algorithm": jwt.encode(
            {"sub": "x", "exp": now + 60}, KEY_A.private, "RS256", headers={"kid": "key-c"}
        ),
        # HS256 with a public key's bytes as the secret: HS256 is not allowed at all
        "bad_algorithm ": jwt.encode(
            {"sub": "x", "exp": now + 60}, "x" * 32, "HS256", headers={"kid": "key-a"}
        ),
        "malformed": "not.a.jwt",
    }
    for reason, tok in cases.items():
        with pytest.raises(AuthFailed) as info:
            await verifier.verify_async(tok)
        assert info.value.reason == reason.strip(), (reason, info.value)
    assert verifier.verify(KEY_C.token("esther")).user_id == "esther"


def test_parse_jwks_skips_unusable_keys() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    doc = {
        "keys": [
            {**KEY_A.jwk, "use": "enc"},  # encryption key
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},  # symmetric
            {**jwt.algorithms.ECAlgorithm.to_jwk(p384, as_dict=True), "kid": "p384"},  # ES384
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},  # no exponent
            {**KEY_B.jwk, "alg": "PS256"},  # usable only with PS256
            KEY_C.jwk,
        ]
    }
    keys = parse_jwks(json.dumps(doc).encode(), ["RS256", "ES256"])
    assert list(keys) == ["key-c"]
    with pytest.raises(JwksError):
        parse_jwks(json.dumps({"keys": [KEY_A.jwk]}).encode(), ["ES256"])
    with pytest.raises(JwksError):
        parse_jwks(b"<html>", ["RS256"])


# -- configuration ----------------------------------------------------------------------------


def test_jwks_config_from_env() -> None:
    cfg = load_config(
        env={
            "RELAY_AUTH_ALGORITHMS": "RS256,ES256",
            "RELAY_AUTH_JWKS_URL": "https://idp.example/.well-known/jwks.json",
            "RELAY_AUTH_JWKS_CACHE_S": "600",
            "RELAY_AUTH_JWKS_TIMEOUT_S": "2.5",
        }
    )
    assert cfg.auth.jwks_url == "https://idp.example/.well-known/jwks.json"
    assert (cfg.auth.jwks_cache_s, cfg.auth.jwks_timeout_s) == (600.0, 2.5)
    require_verifier(cfg)  # no secret and no key file needed
    verifier = TokenVerifier.from_config(cfg.auth)
    assert verifier.jwks is not None and not verifier.jwks.loaded
    with pytest.raises(ConfigError) as info:
        TokenVerifier.from_config(AuthConfig(jwks_url="https://idp.example/jwks"))
    assert info.value.key == "auth.algorithms"
