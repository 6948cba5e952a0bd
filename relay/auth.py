"""JWT verification for WebSocket clients, and token minting for development.

`TokenVerifier.from_config(cfg.auth)` loads the key once at startup (a bad key is a ConfigError);
`verifier.verify(token)` returns `Claims(user_id, exp)` or raises `AuthFailed(4003, message,
reason)`. The message is safe to send to the client; `reason` is one of `REASONS` (for metrics).

With `[auth] jwks_url` the keys come from a `JwksCache` (`verifier.jwks`, whose `run()` the relay
runs in the background): `await verifier.verify_async(token)` first awaits one rate-limited
refetch when the token names a `kid` the cache does not hold (a key rotation), then verifies;
`verify()` uses the keys held right now. While no key set was ever loaded, a token is refused
with 1013 ("try again later", reason `keys_unavailable`): it may well be valid.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.types import Options

from relay.config import HMAC_ALGORITHMS, PUBLIC_KEY_ALGORITHMS, AuthConfig
from relay.errors import AuthFailed, ConfigError
from relay.jwks import JwksCache, PublicKey

INVALID_TOKEN: Final = 4003
TRY_AGAIN_LATER: Final = 1013
MAX_TOKEN_BYTES: Final = 8192
MAX_USER_ID_CHARS: Final = 128
REASONS: Final = frozenset(
    {
        "expired",
        "not_yet_valid",
        "bad_signature",
        "bad_algorithm",
        "bad_audience",
        "bad_issuer",
        "missing_claim",
        "bad_claim",
        "malformed",
        "too_large",
        "unknown_key",
        "keys_unavailable",
    }
)

VerifyKey: TypeAlias = PublicKey | str

# PyJWT exception -> (reason, message). Order matters: subclasses before their bases.
_PYJWT_ERRORS: Final[tuple[tuple[type[jwt.PyJWTError], str, str], ...]] = (
    (jwt.InvalidSignatureError, "bad_signature", "invalid token signature"),
    (jwt.InvalidAlgorithmError, "bad_algorithm", "token algorithm not allowed"),
    (jwt.InvalidAudienceError, "bad_audience", "token audience not accepted"),
    (jwt.InvalidIssuerError, "bad_issuer", "token issuer not accepted"),
)


@dataclass(frozen=True, slots=True)
class Claims:
    """What the relay needs from a verified token."""

    user_id: str
    exp: float  # seconds since the epoch; the server closes with 4005 at this time


def _fail(reason: str, message: str) -> AuthFailed:
    return AuthFailed(INVALID_TOKEN, message, reason)


def _load_public_key(path: str) -> PublicKey:
    """Read a PEM public key (or the key of a PEM X.509 certificate)."""
    key_name = "auth.public_key_file"
    if not path:
        raise ConfigError(key_name, "required for public-key algorithms")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(key_name, f"cannot read {path}: {e.strerror}") from e
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ConfigError(key_name, f"{path} is not a PEM public key or certificate") from e
    if not isinstance(key, PublicKey):
        raise ConfigError(key_name, f"{path}: unsupported key type {type(key).__name__}")
    return key


def _time_claim(payload: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim as a finite float, None when absent; bad_claim otherwise."""
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            return number
    raise _fail("bad_claim", f"token claim {name!r} must be a number")


class TokenVerifier:
    """Verifies JWTs against a fixed algorithm allowlist and one key.

    Rules (in addition to PyJWT's signature and format checks):

    - `alg` must be in the allowlist; `none` is never accepted, and HMAC and public-key
      algorithms are never mixed, so a token signed with the public key as an HMAC secret fails.
    - `exp` is required; `exp`, `nbf` and `iat` (when present) are checked against `now`
      with `leeway_s` (a token with `iat` in the future is `not_yet_valid`, as in PyJWT).
    - `aud`: when an audience is configured the token must name it. When none is configured,
      a token's `aud` claim is ignored (PyJWT would reject any token carrying `aud`, which
      would break tokens issued for several services).
    - `iss` must equal the configured issuer, if any.
    - every `required_claims` name must be present with exactly the configured string value.
    - the user id comes from `user_claim`: a string of 1-128 characters, or an integer, which
      is converted to its decimal string (many apps put numeric ids in `sub`).
    - tokens longer than 8 KiB are refused before decoding.
    """

    def __init__(
        self,
        *,
        algorithms: Sequence[str],
        key: VerifyKey,
        user_claim: str = "sub",
        audience: str = "",
        issuer: str = "",
        required_claims: Mapping[str, str] | None = None,
        leeway_s: float = 0.0,
        jwks: JwksCache | None = None,
    ) -> None:
        """`key` verifies every token, unless `jwks` is given: then the token's `kid` picks
        the key from the cache (and `key` is unused)."""
        self._algorithms = list(algorithms)
        self._key = key
        self.jwks = jwks
        self._user_claim = user_claim
        self._audience = audience or None
        self._issuer = issuer or None
        self._required = dict(required_claims or {})
        self._leeway = leeway_s
        self._options: Options = {
            # Time claims are checked in verify() so that `now` can be injected.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": self._audience is not None,
            # We convert numeric user ids ourselves; jti is not used.
            "verify_sub": False,
            "verify_jti": False,
        }

    @classmethod
    def from_config(
        cls, cfg: AuthConfig, *, on_jwks_fetch: Callable[[bool], None] | None = None
    ) -> TokenVerifier:
        """Build a verifier, loading the key once (or, with `jwks_url`, a JwksCache that is
        still empty: run its `run()`). Raises ConfigError on a bad setup."""
        algs = list(cfg.algorithms)
        if not algs:
            raise ConfigError("auth.algorithms", "at least one algorithm is required")
        unknown = [a for a in algs if a not in HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS]
        if unknown:
            raise ConfigError("auth.algorithms", f"unsupported algorithm {unknown[0]!r}")
        hs_algs = set(algs) & HMAC_ALGORITHMS
        if hs_algs and len(hs_algs) != len(set(algs)):
            raise ConfigError("auth.algorithms", "cannot mix HMAC and public-key algorithms")
        key: VerifyKey
        if cfg.jwks_url:
            if hs_algs:
                raise ConfigError("auth.algorithms", "auth.jwks_url needs public-key algorithms")
            jwks = JwksCache(
                cfg.jwks_url,
                algorithms=algs,
                cache_s=cfg.jwks_cache_s,
                timeout_s=cfg.jwks_timeout_s,
                on_fetch=on_jwks_fetch,
            )
            return cls(
                algorithms=algs,
                key="",
                user_claim=cfg.user_claim,
                audience=cfg.audience,
                issuer=cfg.issuer,
                required_claims=cfg.required_claims,
                leeway_s=cfg.leeway_s,
                jwks=jwks,
            )
        if hs_algs:
            if not cfg.secret:
                raise ConfigError("auth.secret", "required for HS* algorithms")
            key, key_name = cfg.secret, "auth.secret"
        else:
            key, key_name = _load_public_key(cfg.public_key_file), "auth.public_key_file"
        for alg in algs:  # e.g. an EC key with RS256, or a P-384 key with ES256
            try:
                jwt.get_algorithm_by_name(alg).prepare_key(key)
            except (jwt.InvalidKeyError, ValueError, TypeError) as e:
                raise ConfigError(key_name, f"key cannot be used with {alg}: {e}") from e
        return cls(
            algorithms=algs,
            key=key,
            user_claim=cfg.user_claim,
            audience=cfg.audience,
            issuer=cfg.issuer,
            required_claims=cfg.required_claims,
            leeway_s=cfg.leeway_s,
        )

    async def verify_async(self, token: str, *, now: float | None = None) -> Claims:
        """Like verify(), but a token naming a key that the JWKS cache does not hold first
        waits for one refetch (rate-limited, at most `jwks_timeout_s`; the loop keeps running).
        """
        jwks = self.jwks
        if jwks is not None and isinstance(token, str) and len(token) <= MAX_TOKEN_BYTES:
            with contextlib.suppress(AuthFailed):  # verify() below reports a bad header
                _alg, kid = self._header(token)
                if not jwks.keys_for(kid):
                    await jwks.refetch_unknown()
        return self.verify(token, now=now)

    def _header(self, token: str) -> tuple[str, str | None]:
        """The token's allowed `alg` and its `kid` (None when absent), from the unverified
        header. Raises AuthFailed."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise _fail("malformed", "malformed token") from e
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _fail("bad_algorithm", "token algorithm not allowed")
        if kid is not None and not isinstance(kid, str):
            raise _fail("malformed", "malformed token")
        return alg, kid

    def _jwks_key(self, jwks: JwksCache, token: str) -> tuple[VerifyKey, list[str]]:
        """The key (and the one algorithm) to verify `token` with, picked by its `kid`."""
        alg, kid = self._header(token)
        if not jwks.loaded:
            raise AuthFailed(
                TRY_AGAIN_LATER, "signing keys not loaded yet, retry later", "keys_unavailable"
            )
        candidates = jwks.keys_for(kid)
        if not candidates:
            raise _fail("unknown_key", "token signed with an unknown key")
        for candidate in candidates:
            if alg in candidate.algorithms:
                return candidate.key, [alg]
        raise _fail("bad_algorithm", "token algorithm does not match its key")

    def verify(self, token: str, *, now: float | None = None) -> Claims:
        """Verify `token` at time `now` (default: the real clock). Raises AuthFailed(4003)
        (or 1013 while a JWKS key set was never loaded)."""
        if not isinstance(token, str) or not token:
            raise _fail("malformed", "malformed token")
        if len(token) > MAX_TOKEN_BYTES:
            raise _fail("too_large", "token too large")
        if not token.isascii():  # compact JWS is base64url and dots only
            raise _fail("malformed", "malformed token")
        key, algorithms = (
            (self._key, self._algorithms) if self.jwks is None else self._jwks_key(self.jwks, token)
        )
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                options=self._options,
                audience=self._audience,
                issuer=self._issuer,
            )
        except jwt.MissingRequiredClaimError as e:  # aud or iss absent while configured
            raise _fail("missing_claim", f"token is missing the {e.claim!r} claim") from e
        except jwt.PyJWTError as e:
            for exc_type, reason, message in _PYJWT_ERRORS:
                if isinstance(e, exc_type):
                    raise _fail(reason, message) from e
            raise _fail("malformed", "malformed token") from e
        return self._check_claims(payload, time.time() if now is None else now)

    def _check_claims(self, payload: Mapping[str, Any], now: float) -> Claims:
        exp = _time_claim(payload, "exp")
        if exp is None:
            raise _fail("missing_claim", "token is missing the 'exp' claim")
        if exp <= now - self._leeway:
            raise _fail("expired", "token expired")
        for name in ("nbf", "iat"):
            start = _time_claim(payload, name)
            if start is not None and start > now + self._leeway:
                raise _fail("not_yet_valid", "token not yet valid")
        for name, expected in self._required.items():
            value = payload.get(name)
            if value is None:
                raise _fail("missing_claim", f"token is missing the {name!r} claim")
            if value != expected:
                raise _fail("bad_claim", f"token claim {name!r} has an unexpected value")
        return Claims(user_id=self._user_id(payload), exp=exp)

    def _user_id(self, payload: Mapping[str, Any]) -> str:
        name = self._user_claim
        value = payload.get(name)
        if value is None:
            raise _fail("missing_claim", f"token is missing the {name!r} claim")
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_USER_ID_CHARS:
            raise _fail("bad_claim", f"token claim {name!r} is not a valid user id")
        return value


def mint_token(
    secret: str,
    user_id: str,
    *,
    ttl_s: float = 3600,
    algorithm: str = "HS256",
    extra: dict[str, object] | None = None,
    now: float | None = None,
) -> str:
    """Sign a token for development and tests: `sub`, `iat`, `exp` (whole seconds) + `extra`.

    `secret` is the HMAC secret, or a PEM private key for public-key algorithms. Claims in
    `extra` override the defaults.
    """
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {
        "sub": user_id,
        "iat": math.floor(issued),
        "exp": math.floor(issued + ttl_s),
    }
    payload.update(extra or {})
    return jwt.encode(payload, secret, algorithm=algorithm)
