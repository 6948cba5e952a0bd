"""Configuration: relay.toml + RELAY_<SECTION>_<KEY> environment overrides, frozen and validated.

Errors are ConfigError naming the key (`server.port: ...`); the CLI prints that one line and
exits 2.
"""

from __future__ import annotations

import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from relay.errors import ConfigError

Positive = Annotated[int, Meta(ge=1)]

# Durations are finite and bounded (no inf/nan, no heartbeat of a nanosecond): relay.toml
# documents each key's range.
Timeout = Annotated[float, Meta(ge=0.1, le=3600)]  # seconds

# Environment variables that are not config keys but are documented (anything else RELAY_* is
# a typo and exits 2).
DOCUMENTED_ENV: Final = frozenset({"RELAY_CONFIG"})

HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class RedisConfig(_Section, frozen=True):
    url: str = "redis://127.0.0.1:6379/0"
    prefix: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")] = (
        "progress"
    )
    shards: Annotated[int, Meta(ge=1, le=1024)] = 1
    cluster: bool = False
    # More Cluster seed nodes ("host:port"), tried after url's host when it does not answer.
    cluster_nodes: list[str] = msgspec.field(default_factory=list)
    # Sentinel: "host:port" of each sentinel; the master's address comes from them, `url` gives
    # its credentials, database and TLS parameters.
    sentinels: list[str] = msgspec.field(default_factory=list)
    sentinel_service: Annotated[str, Meta(min_length=1)] = "mymaster"
    sentinel_username: str = ""
    sentinel_password: str = ""


class ServerConfig(_Section, frozen=True):
    host: str = "0.0.0.0"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8765
    path: Annotated[str, Meta(pattern=r"^/[^?#\s]*$")] = "/ws"
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    max_connections: Positive = 10_000
    max_connections_per_user: Positive = 20
    max_unauthenticated: Positive = 2_000
    handshake_timeout_s: Timeout = 10.0


class AuthConfig(_Section, frozen=True):
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["HS256"])
    secret: str = ""
    public_key_file: str = ""
    user_claim: Annotated[str, Meta(min_length=1)] = "sub"
    audience: str = ""
    issuer: str = ""
    required_claims: dict[str, str] = msgspec.field(default_factory=dict)
    leeway_s: Annotated[float, Meta(ge=0, le=600)] = 0.0
    auth_timeout_s: Timeout = 5.0
    jwks_url: str = ""
    jwks_cache_s: Annotated[float, Meta(ge=1, le=86_400)] = 300.0
    jwks_timeout_s: Annotated[float, Meta(ge=0.1, le=60)] = 5.0


class FanoutConfig(_Section, frozen=True):
    min_interval_ms: Annotated[int, Meta(ge=0, le=60_000)] = 100
    heartbeat_s: Timeout = 30.0
    max_buffer_bytes: Annotated[int, Meta(ge=1024)] = 1_048_576
    write_timeout_s: Timeout = 10.0
    max_message_bytes: Annotated[int, Meta(ge=256)] = 4096
    max_client_messages_per_s: Annotated[float, Meta(ge=0.1, le=10_000)] = 20.0
    snapshot_max_batches: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000


class RetentionConfig(_Section, frozen=True):
    active_s: Positive = 86_400
    finished_s: Positive = 3_600
    stream_maxlen: Annotated[int, Meta(ge=100)] = 100_000


class LifecycleConfig(_Section, frozen=True):
    shutdown_timeout_s: Timeout = 10.0


class LogConfig(_Section, frozen=True):
    level: Annotated[str, Meta(pattern=r"^(?i:debug|info|warning|error)$")] = "info"
    format: Annotated[str, Meta(pattern=r"^(auto|json|console)$")] = "auto"


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    fanout: FanoutConfig = msgspec.field(default_factory=FanoutConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    lifecycle: LifecycleConfig = msgspec.field(default_factory=LifecycleConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)


def _sections() -> dict[str, type[_Section]]:
    fields = msgspec.structs.fields(Config)
    return {f.name: f.type for f in fields}


def _env_value(section: str, key: str, text: str) -> Any:
    """Turn an environment string into the JSON-ish value msgspec.convert will validate."""
    typ = {f.name: f.type for f in msgspec.structs.fields(_sections()[section])}[key]
    origin = str(typ)
    if "list[" in origin:
        return [part.strip() for part in text.split(",") if part.strip()]
    if "dict[" in origin:
        out: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"{section}.{key}", f"expected name=value pairs, got {part!r}")
            out[name.strip()] = value.strip()
        return out
    if typ is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{section}.{key}", f"expected true or false, got {text!r}")
    return text


def _env_overrides(env: Mapping[str, str], data: dict[str, Any]) -> None:
    sections = _sections()
    names = sorted(sections, key=len, reverse=True)
    for var, text in env.items():
        if not var.startswith("RELAY_") or var in DOCUMENTED_ENV:
            continue
        rest = var[len("RELAY_") :].lower()
        section = next((s for s in names if rest.startswith(s + "_")), None)
        if section is None:  # a typo must not pass silently
            raise ConfigError(var, "unknown environment variable (not RELAY_<SECTION>_<KEY>)")
        key = rest[len(section) + 1 :]
        keys = {f.name for f in msgspec.structs.fields(sections[section])}
        if key not in keys:
            raise ConfigError(f"{section}.{key}", f"unknown key (from environment variable {var})")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(section, "must be a table")
        data[section][key] = _env_value(section, key, text)


_PATH_RE = re.compile(r"at `\$\.([^`]+)`")
_UNKNOWN_RE = re.compile(r"unknown field `([^`]+)`")


def _key_from_error(err: msgspec.ValidationError) -> tuple[str, str]:
    text = str(err)
    message, _, _ = text.partition(" - at ")
    where = _PATH_RE.search(text)
    path = where.group(1) if where else ""
    unknown = _UNKNOWN_RE.search(text)
    if unknown:
        key = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        return key, "unknown key"
    return path or "config", message


def _cross_checks(cfg: Config) -> None:
    algs = cfg.auth.algorithms
    if not algs:
        raise ConfigError("auth.algorithms", "at least one algorithm is required")
    for alg in algs:
        if alg not in HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS:
            raise ConfigError("auth.algorithms", f"unsupported algorithm {alg!r}")
    if set(algs) & HMAC_ALGORITHMS and set(algs) & PUBLIC_KEY_ALGORITHMS:
        raise ConfigError(
            "auth.algorithms", "cannot mix HMAC (HS*) and public-key algorithms (confusion risk)"
        )
    _jwks_checks(cfg.auth)
    if cfg.retention.finished_s > cfg.retention.active_s:
        raise ConfigError("retention.finished_s", "must not exceed retention.active_s")
    if not cfg.redis.url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis.url", "must start with redis://, rediss:// or unix://")
    if cfg.redis.cluster_nodes:
        if not cfg.redis.cluster:
            raise ConfigError("redis.cluster_nodes", "needs redis.cluster = true")
        for addr in cfg.redis.cluster_nodes:
            host_port(addr, "redis.cluster_nodes")
    if "," in urllib.parse.urlsplit(cfg.redis.url).netloc.rpartition("@")[2]:
        raise ConfigError(
            "redis.url", "one address only; list more Cluster seed nodes in redis.cluster_nodes"
        )
    if cfg.redis.sentinels:
        if cfg.redis.cluster:
            raise ConfigError("redis.sentinels", "cannot be used with redis.cluster = true")
        for addr in cfg.redis.sentinels:
            host_port(addr, "redis.sentinels")


def host_port(addr: str, key: str) -> tuple[str, int]:
    """ "host:port" (or "[v6]:port") -> (host, port); ConfigError naming `key` otherwise."""
    host, sep, port = addr.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(key, f"expected host:port, got {addr!r}")
    return host, int(port)


def _jwks_checks(auth: AuthConfig) -> None:
    if not auth.jwks_url:
        return
    url = urlsplit(auth.jwks_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError("auth.jwks_url", "must be an http:// or https:// URL with a host")
    if set(auth.algorithms) & HMAC_ALGORITHMS:
        raise ConfigError(
            "auth.algorithms",
            "auth.jwks_url needs public-key algorithms (e.g. RS256, ES256), not HS*",
        )
    if auth.public_key_file:
        raise ConfigError("auth.public_key_file", "cannot be combined with auth.jwks_url")


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load a TOML file (optional) and apply environment overrides. Raises ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError("config", f"cannot read {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("config", f"{path} is not valid TOML: {e}") from e
    _env_overrides(os.environ if env is None else env, data)
    try:
        cfg = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        key, message = _key_from_error(e)
        raise ConfigError(key, message) from e
    _cross_checks(cfg)
    return cfg


def require_verifier(cfg: Config) -> None:
    """`relay serve` refuses to start without a way to verify tokens (there is no default)."""
    if set(cfg.auth.algorithms) & HMAC_ALGORITHMS:
        if not cfg.auth.secret:
            raise ConfigError("auth.secret", "required for HS* algorithms (no default secret)")
    elif cfg.auth.jwks_url:
        return  # keys come from the JWKS endpoint (load_config checked the URL)
    elif not cfg.auth.public_key_file:
        raise ConfigError("auth.public_key_file", "required for public-key algorithms")
    elif not Path(cfg.auth.public_key_file).is_file():
        raise ConfigError("auth.public_key_file", f"no such file: {cfg.auth.public_key_file}")


def masked(cfg: Config) -> dict[str, Any]:
    """The effective config as a dict, secrets replaced by '***' (for `relay check`)."""
    out: dict[str, Any] = msgspec.to_builtins(cfg)
    if out["auth"]["secret"]:
        out["auth"]["secret"] = "***"
    if out["redis"]["sentinel_password"]:
        out["redis"]["sentinel_password"] = "***"
    out["redis"]["url"] = mask_url(out["redis"]["url"])
    return out


def mask_url(url: str) -> str:
    """A Redis URL with every credential redis-py accepts replaced by '***': the password in
    `user:password@` and any `password=` query parameter (any case)."""
    url = re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)
