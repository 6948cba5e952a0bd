"""Public keys from an identity provider's JWKS endpoint (`[auth] jwks_url`).

`JwksCache` keeps the last good key set in memory. `run()` (a background task of the relay)
loads it at start, refreshes it every `cache_s`, and retries with backoff when a fetch fails;
a failed fetch never drops the keys already held. `refetch_unknown()` is what a verifier awaits
when a token names a `kid` that is not in the set (a key rotation): at most one such refetch per
`min_refetch_s`, and callers that arrive while a fetch is running share it.

HTTP runs in a daemon thread (urllib from the standard library) so that a slow endpoint never
blocks the event loop and never holds up the process's exit; the whole fetch, body included,
is bounded by `timeout_s`, and the body by `MAX_JWKS_BYTES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from relay.errors import JwksError

log = structlog.get_logger("relay.jwks")

PublicKey: TypeAlias = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey

MAX_JWKS_BYTES: Final = 1_048_576
MIN_REFETCH_S: Final = 10.0  # unknown-kid refetches at most this often
RETRY_FIRST_S: Final = 0.5  # after a failed fetch: 0.5 s, 1 s, 2 s ... up to RETRY_MAX_S
RETRY_MAX_S: Final = 30.0
_ASYMMETRIC_KTY: Final = frozenset({"RSA", "EC", "OKP"})


@dataclass(frozen=True, slots=True)
class JwksKey:
    """One usable verification key and the allowed algorithms it can verify."""

    kid: str | None
    key: PublicKey
    algorithms: frozenset[str]


def parse_jwks(body: bytes, algorithms: Collection[str]) -> dict[str | None, tuple[JwksKey, ...]]:
    """The usable public keys of a JWK Set document, by `kid`. Raises JwksError.

    Skipped: encryption keys (`use` = "enc"), symmetric keys (`kty` = "oct"), key types PyJWT
    cannot load, and keys that no allowed algorithm can use (a key's own `alg`, when present,
    is the only algorithm it is used with). No usable key at all is an error, so that a broken
    document never replaces a good key set.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise JwksError(f"not JSON: {e}") from e
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise JwksError("not a JWK Set (no 'keys' list)")
    found: dict[str | None, list[JwksKey]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") not in _ASYMMETRIC_KTY:
            continue
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        key = _load_key(entry)
        if key is None:
            continue
        own_alg = entry.get("alg")
        usable = frozenset(
            alg for alg in algorithms if (own_alg is None or own_alg == alg) and _key_fits(alg, key)
        )
        if usable:
            found.setdefault(kid, []).append(JwksKey(kid, key, usable))
    if not found:
        raise JwksError("no usable signing key for the allowed algorithms")
    return {kid: tuple(keys) for kid, keys in found.items()}


def _load_key(entry: dict[str, Any]) -> PublicKey | None:
    try:
        key: object = jwt.PyJWK(entry).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    return key if isinstance(key, PublicKey) else None  # a private JWK is not published


def _key_fits(alg: str, key: PublicKey) -> bool:
    """True when `alg` can verify with `key` (RSA key for RS/PS, the right curve for ES...)."""
    try:
        jwt.get_algorithm_by_name(alg).prepare_key(key)
    except (jwt.InvalidKeyError, NotImplementedError, ValueError, TypeError):
        return False
    return True


def http_get(url: str, timeout_s: float) -> bytes:
    """GET `url` (blocking): the body of a 2xx answer, within `timeout_s` and MAX_JWKS_BYTES."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(  # noqa: S310 - config allows http(s) URLs only
        url, headers={"Accept": "application/json", "User-Agent": "progress-relay"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # noqa: S310
            chunks: list[bytes] = []
            size = 0
            while chunk := resp.read(65_536):
                size += len(chunk)
                if size > MAX_JWKS_BYTES:
                    raise JwksError(f"answer larger than {MAX_JWKS_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise JwksError(f"no complete answer within {timeout_s} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as e:
        raise JwksError(f"HTTP {e.code}") from e
    except (OSError, ValueError) as e:  # URLError, timeouts, refused, bad URL
        raise JwksError(f"unreachable: {e}") from e


async def fetch_in_thread(url: str, timeout_s: float) -> bytes:
    """http_get in a daemon thread: the loop keeps running, and exit never waits for it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()

    def deliver(body: bytes | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(body or b"")

    def work() -> None:
        body: bytes | None = None
        error: BaseException | None = None
        try:
            body = http_get(url, timeout_s)
        except Exception as e:  # handed to the awaiting task
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(deliver, body, error)

    threading.Thread(target=work, name="jwks-fetch", daemon=True).start()
    try:
        async with asyncio.timeout(timeout_s + 1.0):  # http_get bounds itself; belt and braces
            return await done
    except TimeoutError as e:
        raise JwksError(f"no answer within {timeout_s} s") from e


class JwksCache:
    """The key set of one JWKS URL, shared by every verification of the relay."""

    def __init__(
        self,
        url: str,
        *,
        algorithms: Collection[str],
        cache_s: float,
        timeout_s: float,
        min_refetch_s: float = MIN_REFETCH_S,
        on_fetch: Callable[[bool], None] | None = None,
    ) -> None:
        self.url = url
        self.algorithms = frozenset(algorithms)
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self.min_refetch_s = min_refetch_s
        self.on_fetch = on_fetch  # called with True/False after each fetch (metrics)
        self._keys: dict[str | None, tuple[JwksKey, ...]] = {}
        self.loaded_at: float | None = None  # monotonic time of the last good fetch
        self._inflight: asyncio.Task[bool] | None = None
        self._last_unknown_refetch = -math.inf

    @property
    def loaded(self) -> bool:
        """True once a key set has been loaded (it is then kept whatever happens)."""
        return self.loaded_at is not None

    def keys_for(self, kid: str | None) -> tuple[JwksKey, ...]:
        """Keys a token with this `kid` may be verified with. A token without `kid` is
        accepted only when the set holds exactly one key (then there is no ambiguity)."""
        if kid is not None:
            return self._keys.get(kid, ())
        every = [k for keys in self._keys.values() for k in keys]
        return tuple(every) if len(every) == 1 else ()

    async def refresh(self) -> bool:
        """Fetch now, or join the fetch already running. True when it brought a key set."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch())
            self._inflight.add_done_callback(self._fetch_done)
        return await asyncio.shield(self._inflight)

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def refetch_unknown(self) -> None:
        """A token named a key we do not hold: refetch, at most once per `min_refetch_s`
        (a fetch already running is joined whatever the limit). Never raises JwksError."""
        if self._inflight is None:
            now = time.monotonic()
            if now - self._last_unknown_refetch < self.min_refetch_s:
                return
            self._last_unknown_refetch = now
        await self.refresh()

    async def _fetch(self) -> bool:
        try:
            body = await fetch_in_thread(self.url, self.timeout_s)
            keys = parse_jwks(body, self.algorithms)
        except JwksError as e:
            log.warning(
                "jwks_fetch_failed", url=self.url, error=str(e), keeping_keys=len(self._keys)
            )
            if self.on_fetch is not None:
                self.on_fetch(False)
            return False
        if keys.keys() != self._keys.keys():
            log.info("jwks_loaded", url=self.url, kids=sorted(str(k) for k in keys))
        self._keys = keys
        self.loaded_at = time.monotonic()
        if self.on_fetch is not None:
            self.on_fetch(True)
        return True

    async def run(self) -> None:
        """Load at once, refresh every `cache_s`, retry failures with backoff (forever)."""
        retry = RETRY_FIRST_S
        try:
            while True:
                if await self.refresh():
                    retry = RETRY_FIRST_S
                    delay = self.cache_s
                else:
                    delay = min(retry, self.cache_s)
                    retry = min(retry * 2, RETRY_MAX_S)
                await asyncio.sleep(delay)
        finally:
            if self._inflight is not None:
                self._inflight.cancel()
