"""relay.auth: real JWTs (HMAC, RSA, EC, Ed25519) against TokenVerifier, one test per rule."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.auth import MAX_TOKEN_BYTES, REASONS, Claims, TokenVerifier, mint_token
from relay.config import AuthConfig
from relay.errors import AuthFailed, ConfigError

SECRET = "s" * 32
NOW = 1_700_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: object) -> str:
    return b64(json.dumps(obj).encode())


def hs_verifier(**kw: Any) -> TokenVerifier:
    return TokenVerifier.from_config(AuthConfig(algorithms=["HS256"], secret=SECRET, **kw))


def hs_token(payload: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=alg)


def payload(**claims: Any) -> dict[str, Any]:
    return {"sub": "alice", "iat": NOW, "exp": NOW + 60, **claims}


def refused(verifier: TokenVerifier, token: str, *, now: float = NOW) -> AuthFailed:
    with pytest.raises(AuthFailed) as info:
        verifier.verify(token, now=now)
    err = info.value
    assert err.code == 4003
    assert err.reason in REASONS
    assert not token or token not in err.message
    assert len(err.message) < 100
    return err


def private_pem(key: PrivateKeyTypes) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_pem(key: PrivateKeyTypes) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def key_file(tmp_path: Path) -> Callable[[PrivateKeyTypes], str]:
    def write(key: PrivateKeyTypes) -> str:
        path = tmp_path / "public.pem"
        path.write_bytes(public_pem(key))
        return str(path)

    return write


@pytest.fixture
def rs_verifier(
    rsa_key: rsa.RSAPrivateKey, key_file: Callable[[PrivateKeyTypes], str]
) -> TokenVerifier:
    cfg = AuthConfig(algorithms=["RS256"], public_key_file=key_file(rsa_key))
    return TokenVerifier.from_config(cfg)


# --- success ---------------------------------------------------------------------------------


def test_hs256_success() -> None:
    token = mint_token(SECRET, "alice", ttl_s=60, now=NOW)
    assert hs_verifier().verify(token, now=NOW) == Claims(user_id="alice", exp=NOW + 60)


def test_rs256_success(rsa_key: rsa.RSAPrivateKey, rs_verifier: TokenVerifier) -> None:
    token = mint_token(private_pem(rsa_key), "bob", algorithm="RS256", now=NOW)
    assert rs_verifier.verify(token, now=NOW) == Claims(user_id="bob", exp=NOW + 3600)


def test_es256_success(
    ec_key: ec.EllipticCurvePrivateKey, key_file: Callable[[PrivateKeyTypes], str]
) -> None:
    verifier = TokenVerifier.from_config(
        AuthConfig(algorithms=["ES256"], public_key_file=key_file(ec_key))
    )
    token = mint_token(private_pem(ec_key), "carol", algorithm="ES256", now=NOW)
    assert verifier.verify(token, now=NOW).user_id == "carol"


def test_eddsa_success(key_file: Callable[[PrivateKeyTypes], str]) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    verifier = TokenVerifier.from_config(
        AuthConfig(algorithms=["EdDSA"], public_key_file=key_file(key))
    )
    token = mint_token(private_pem(key), "dave", algorithm="EdDSA", now=NOW)
    assert verifier.verify(token, now=NOW).user_id == "dave"


def test_real_clock_by_default() -> None:
    claims = hs_verifier().verify(mint_token(SECRET, "alice", ttl_s=60))
    assert claims.user_id == "alice"


def test_mint_token_claims() -> None:
    token = mint_token(SECRET, "alice", ttl_s=10, now=NOW + 0.7, extra={"type": "access"})
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"sub": "alice", "iat": NOW, "exp": NOW + 10, "type": "access"}


# --- startup (ConfigError) -------------------------------------------------------------------


def test_bad_public_key_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    for path in (str(bad), str(tmp_path / "missing.pem"), ""):
        with pytest.raises(ConfigError) as info:
            TokenVerifier.from_config(AuthConfig(algorithms=["RS256"], public_key_file=path))
        assert info.value.key == "auth.public_key_file"


def test_key_that_does_not_fit_the_algorithm_is_a_config_error(
    ec_key: ec.EllipticCurvePrivateKey, key_file: Callable[[PrivateKeyTypes], str]
) -> None:
    path = key_file(ec_key)
    for algs in (["RS256"], ["ES384"], ["ES256", "EdDSA"]):
        with pytest.raises(ConfigError, match=r"^auth\.public_key_file: "):
            TokenVerifier.from_config(AuthConfig(algorithms=algs, public_key_file=path))


def test_bad_algorithm_config() -> None:
    cases: list[tuple[list[str], str]] = [
        ([], "auth.algorithms"),
        (["none"], "auth.algorithms"),
        (["HS256", "RS256"], "auth.algorithms"),
    ]
    for algs, key in cases:
        with pytest.raises(ConfigError) as info:
            TokenVerifier.from_config(AuthConfig(algorithms=algs, secret=SECRET))
        assert info.value.key == key
    with pytest.raises(ConfigError, match=r"^auth\.secret: "):
        TokenVerifier.from_config(AuthConfig(algorithms=["HS256"], secret=""))


def test_certificate_file_is_accepted(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(rsa_key, hashes.SHA256())
    )
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    verifier = TokenVerifier.from_config(
        AuthConfig(algorithms=["RS256"], public_key_file=str(path))
    )
    token = mint_token(private_pem(rsa_key), "bob", algorithm="RS256", now=NOW)
    assert verifier.verify(token, now=NOW).user_id == "bob"


# --- algorithms and signatures ---------------------------------------------------------------


def test_none_algorithm_refused() -> None:
    token = b64json({"alg": "none", "typ": "JWT"}) + "." + b64json(payload()) + "."
    assert refused(hs_verifier(), token).reason == "bad_algorithm"


def test_none_algorithm_refused_by_public_key_verifier(rs_verifier: TokenVerifier) -> None:
    token = b64json({"alg": "none", "typ": "JWT"}) + "." + b64json(payload()) + "."
    assert refused(rs_verifier, token).reason == "bad_algorithm"


def test_hs_rs_confusion_refused(rsa_key: rsa.RSAPrivateKey, rs_verifier: TokenVerifier) -> None:
    # PyJWT refuses to *sign* with a PEM as HMAC secret, so forge the token by hand.
    signing_input = b64json({"alg": "HS256", "typ": "JWT"}) + "." + b64json(payload())
    mac = hmac.new(public_pem(rsa_key), signing_input.encode(), hashlib.sha256).digest()
    err = refused(rs_verifier, signing_input + "." + b64(mac))
    assert err.reason == "bad_algorithm"
    assert isinstance(err.__cause__, jwt.InvalidAlgorithmError)


def test_algorithm_outside_allowlist_refused() -> None:
    token = hs_token(payload(), secret="k" * 64, alg="HS512")
    verifier = TokenVerifier.from_config(AuthConfig(algorithms=["HS256"], secret="k" * 64))
    assert refused(verifier, token).reason == "bad_algorithm"


def test_rs512_token_refused_when_only_rs256_allowed(
    rsa_key: rsa.RSAPrivateKey, rs_verifier: TokenVerifier
) -> None:
    token = mint_token(private_pem(rsa_key), "bob", algorithm="RS512", now=NOW)
    assert refused(rs_verifier, token).reason == "bad_algorithm"


def test_wrong_secret_refused() -> None:
    err = refused(hs_verifier(), hs_token(payload(), secret="t" * 32))
    assert err.reason == "bad_signature"
    assert isinstance(err.__cause__, jwt.InvalidSignatureError)


def test_tampered_payload_refused() -> None:
    header, _, signature = hs_token(payload()).split(".")
    forged = f"{header}.{b64json(payload(sub='mallory'))}.{signature}"
    assert refused(hs_verifier(), forged).reason == "bad_signature"


def test_other_rsa_key_refused(rs_verifier: TokenVerifier) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = mint_token(private_pem(other), "bob", algorithm="RS256", now=NOW)
    assert refused(rs_verifier, token).reason == "bad_signature"


# --- time claims -----------------------------------------------------------------------------


def test_exp_required() -> None:
    token = hs_token({"sub": "alice", "iat": NOW})
    err = refused(hs_verifier(), token)
    assert (err.reason, err.message) == ("missing_claim", "token is missing the 'exp' claim")


@pytest.mark.parametrize("exp", ["soon", True, [1], {"a": 1}])
def test_exp_must_be_a_number(exp: object) -> None:
    assert refused(hs_verifier(), hs_token(payload(exp=exp))).reason == "bad_claim"


def test_non_finite_exp_refused() -> None:
    # Python's json accepts Infinity/NaN and huge integers; none of them is a usable expiry.
    for raw in ("Infinity", "NaN", "1" + "0" * 400):
        body = b64(('{"sub":"alice","exp":' + raw + "}").encode())
        signing_input = b64json({"alg": "HS256", "typ": "JWT"}) + "." + body
        mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
        assert refused(hs_verifier(), signing_input + "." + b64(mac)).reason == "bad_claim"


def test_expired_refused_and_leeway_honoured() -> None:
    token = mint_token(SECRET, "alice", ttl_s=60, now=NOW)
    err = refused(hs_verifier(), token, now=NOW + 60)
    assert (err.reason, err.message) == ("expired", "token expired")
    assert hs_verifier().verify(token, now=NOW + 59.5).exp == NOW + 60
    lenient = hs_verifier(leeway_s=30)
    assert lenient.verify(token, now=NOW + 89).user_id == "alice"
    assert refused(lenient, token, now=NOW + 90).reason == "expired"


def test_not_yet_valid_refused() -> None:
    for claims in (payload(nbf=NOW + 100, exp=NOW + 600), payload(iat=NOW + 100, exp=NOW + 600)):
        token = hs_token(claims)
        assert refused(hs_verifier(), token).reason == "not_yet_valid"
        assert hs_verifier().verify(token, now=NOW + 100).user_id == "alice"
        assert hs_verifier(leeway_s=100).verify(token, now=NOW).user_id == "alice"


def test_nbf_must_be_a_number() -> None:
    assert refused(hs_verifier(), hs_token(payload(nbf="later"))).reason == "bad_claim"


# --- audience, issuer, required claims -------------------------------------------------------


def test_audience_checked_when_configured() -> None:
    verifier = hs_verifier(audience="relay")
    assert verifier.verify(hs_token(payload(aud="relay")), now=NOW).user_id == "alice"
    assert verifier.verify(hs_token(payload(aud=["api", "relay"])), now=NOW).user_id == "alice"
    assert refused(verifier, hs_token(payload(aud="api"))).reason == "bad_audience"
    assert refused(verifier, hs_token(payload(aud=["api"]))).reason == "bad_audience"
    assert refused(verifier, hs_token(payload())).reason == "missing_claim"


def test_audience_ignored_when_not_configured() -> None:
    # PyJWT alone would refuse this token ("Invalid audience").
    assert hs_verifier().verify(hs_token(payload(aud="api")), now=NOW).user_id == "alice"


def test_issuer_checked_when_configured() -> None:
    verifier = hs_verifier(issuer="https://auth.example")
    good = hs_token(payload(iss="https://auth.example"))
    assert verifier.verify(good, now=NOW).user_id == "alice"
    assert refused(verifier, hs_token(payload(iss="https://evil"))).reason == "bad_issuer"
    assert refused(verifier, hs_token(payload())).reason == "missing_claim"
    assert hs_verifier().verify(hs_token(payload(iss="anyone")), now=NOW).user_id == "alice"


def test_required_claims_enforced() -> None:
    verifier = hs_verifier(required_claims={"type": "access", "scope": "progress"})
    good = hs_token(payload(type="access", scope="progress"))
    assert verifier.verify(good, now=NOW).user_id == "alice"
    err = refused(verifier, hs_token(payload(type="refresh", scope="progress")))
    assert err.reason == "bad_claim"
    assert "refresh" not in err.message
    assert "access" not in err.message  # the expected value is not revealed
    assert refused(verifier, hs_token(payload(scope="progress"))).reason == "missing_claim"
    assert refused(verifier, hs_token(payload(type=1, scope="progress"))).reason == "bad_claim"


# --- user id ---------------------------------------------------------------------------------


def test_custom_user_claim() -> None:
    verifier = hs_verifier(user_claim="uid")
    token = hs_token(payload(uid="u-7"))
    assert verifier.verify(token, now=NOW).user_id == "u-7"
    err = refused(verifier, hs_token(payload()))
    assert (err.reason, err.message) == ("missing_claim", "token is missing the 'uid' claim")


def test_numeric_sub_accepted_as_string() -> None:
    # PyJWT >= 2.10 rejects a non-string sub by default (verify_sub); we convert it.
    assert hs_verifier().verify(hs_token(payload(sub=42)), now=NOW).user_id == "42"


@pytest.mark.parametrize("sub", ["", "x" * 129, True, 4.5, ["alice"], {"id": 1}])
def test_bad_user_id_refused(sub: object) -> None:
    assert refused(hs_verifier(), hs_token(payload(sub=sub))).reason == "bad_claim"


def test_user_id_limits() -> None:
    assert hs_verifier().verify(hs_token(payload(sub="x" * 128)), now=NOW).user_id == "x" * 128
    assert hs_verifier().verify(hs_token(payload(sub="é")), now=NOW).user_id == "é"
    assert refused(hs_verifier(), hs_token({"exp": NOW + 60})).reason == "missing_claim"


# --- format and size -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token", ["", "abc", "a.b", "a.b.c", "....", "é.é.é", "eyJ.eyJ.", " " + "x" * 50]
)
def test_malformed_refused(token: str) -> None:
    assert refused(hs_verifier(), token).reason == "malformed"


def test_non_string_token_refused() -> None:
    with pytest.raises(AuthFailed) as info:
        hs_verifier().verify(123)  # type: ignore[arg-type]
    assert info.value.reason == "malformed"


def test_header_and_payload_must_be_objects() -> None:
    for header, body in ((b64json([1]), b64json(payload())), (b64json({"alg": "HS256"}), "W10")):
        signing_input = f"{header}.{body}"
        mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
        assert refused(hs_verifier(), f"{signing_input}.{b64(mac)}").reason == "malformed"


def test_too_large_refused_without_decoding() -> None:
    big = hs_token(payload(pad="x" * 100_000))
    assert len(big) > 100_000
    err = refused(hs_verifier(), big)
    assert err.reason == "too_large"
    assert err.__cause__ is None
    # the limit is 8 KiB: a valid token just below it still works
    near = hs_token(payload(pad="x" * 5_900))
    assert len(near) <= MAX_TOKEN_BYTES
    assert hs_verifier().verify(near, now=NOW).user_id == "alice"


# --- fuzzing ---------------------------------------------------------------------------------

_VERIFIER = hs_verifier(audience="relay", issuer="iss", required_claims={"type": "access"})

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


def _only_auth_failed(token: str) -> None:
    try:
        claims = _VERIFIER.verify(token, now=NOW)
    except AuthFailed as e:
        assert e.code == 4003
        assert e.reason in REASONS
    else:
        assert 1 <= len(claims.user_id) <= 128


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_=.-]{0,200}", fullmatch=True))
def test_garbage_only_raises_auth_failed(token: str) -> None:
    _only_auth_failed(token)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit", "b64"]), _json),
    body=st.dictionaries(
        st.sampled_from(["sub", "exp", "nbf", "iat", "aud", "iss", "type", "jti"]), _json
    ),
)
def test_signed_garbage_claims_only_raise_auth_failed(
    header: dict[str, Any], body: dict[str, Any]
) -> None:
    try:
        token = jwt.encode(body, SECRET, algorithm="HS256", headers=header)
    except (TypeError, ValueError, NotImplementedError, jwt.PyJWTError):
        signing_input = b64json({**header, "alg": "HS256"}) + "." + b64json(body)
        mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
        token = signing_input + "." + b64(mac)
    _only_auth_failed(token)
