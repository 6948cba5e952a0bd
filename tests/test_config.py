"""Configuration: the example file, env overrides, and exit code 2 naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from relay.config import Config, load_config, masked, require_verifier
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_example_file_is_the_defaults_and_documents_every_key() -> None:
    assert load_config(ROOT / "relay.toml", env={}) == Config()
    text = (ROOT / "relay.toml").read_text()
    for section in msgspec.structs.fields(Config):
        assert f"[{section.name}]" in text
        for key in msgspec.structs.fields(section.type):
            assert f"\n{key.name} = " in text, f"{section.name}.{key.name} not in relay.toml"


def test_env_overrides_every_kind_of_value() -> None:
    cfg = load_config(
        env={
            "RELAY_REDIS_URL": "redis://10.0.0.1:6380/1",
            "RELAY_REDIS_SHARDS": "4",
            "RELAY_REDIS_CLUSTER": "true",
            "RELAY_SERVER_PORT": "9000",
            "RELAY_SERVER_ALLOWED_ORIGINS": "https://a.example, https://b.example",
            "RELAY_AUTH_REQUIRED_CLAIMS": "type=access,scope=progress",
            "RELAY_FANOUT_MIN_INTERVAL_MS": "250",
            "RELAY_FANOUT_WRITE_TIMEOUT_S": "2.5",
            "RELAY_CONFIG": "documented: the config file (read by the CLI)",
        }
    )
    assert cfg.redis.url == "redis://10.0.0.1:6380/1" and cfg.redis.shards == 4
    assert cfg.redis.cluster is True and cfg.server.port == 9000
    assert cfg.server.allowed_origins == ["https://a.example", "https://b.example"]
    assert cfg.auth.required_claims == {"type": "access", "scope": "progress"}
    assert cfg.fanout.min_interval_ms == 250 and cfg.fanout.write_timeout_s == 2.5


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ("[server]\nport = 'x'\n", {}, "server.port"),
        ("[server]\nprot = 1\n", {}, "server.prot"),
        ("[nope]\n", {}, "nope"),
        ("", {"RELAY_SERVER_PROT": "1"}, "server.prot"),
        ("", {"RELAY_FANOUT_MIN_INTERVAL_MS": "-1"}, "fanout.min_interval_ms"),
        ("", {"RELAY_REDIS_CLUSTER": "maybe"}, "redis.cluster"),
        ("", {"RELAY_REDIS_PREFIX": "a{b}"}, "redis.prefix"),
        ("", {"RELAY_AUTH_ALGORITHMS": "HS256,RS256"}, "auth.algorithms"),
        ("", {"RELAY_AUTH_ALGORITHMS": "none"}, "auth.algorithms"),
        ("", {"RELAY_SERVER_PATH": "ws"}, "server.path"),
        ("[retention]\nfinished_s = 100\nactive_s = 10\n", {}, "retention.finished_s"),
        # A typo in a variable name is an error too, named as the variable (issue 9, item 10).
        ("", {"RELAY_SERVR_PORT": "1"}, "RELAY_SERVR_PORT"),
        ("", {"RELAY_PORT": "1"}, "RELAY_PORT"),
        ("", {"RELAY_TEST_SOMETHING": "x"}, "RELAY_TEST_SOMETHING"),
        # Durations and rates are finite and within documented bounds.
        ("", {"RELAY_AUTH_LEEWAY_S": "inf"}, "auth.leeway_s"),
        ("", {"RELAY_AUTH_LEEWAY_S": "nan"}, "auth.leeway_s"),
        ("", {"RELAY_AUTH_LEEWAY_S": "-1"}, "auth.leeway_s"),
        ("", {"RELAY_FANOUT_HEARTBEAT_S": "1e-9"}, "fanout.heartbeat_s"),
        ("", {"RELAY_FANOUT_HEARTBEAT_S": "nan"}, "fanout.heartbeat_s"),
        ("", {"RELAY_FANOUT_WRITE_TIMEOUT_S": "inf"}, "fanout.write_timeout_s"),
        ("", {"RELAY_AUTH_AUTH_TIMEOUT_S": "1e308"}, "auth.auth_timeout_s"),
        ("", {"RELAY_LIFECYCLE_SHUTDOWN_TIMEOUT_S": "-inf"}, "lifecycle.shutdown_timeout_s"),
        ("", {"RELAY_SERVER_HANDSHAKE_TIMEOUT_S": "0"}, "server.handshake_timeout_s"),
        ("", {"RELAY_FANOUT_MAX_CLIENT_MESSAGES_PER_S": "inf"}, "fanout.max_client_messages_per_s"),
        ("", {"RELAY_FANOUT_MIN_INTERVAL_MS": "3600001"}, "fanout.min_interval_ms"),
        ("", {"RELAY_FANOUT_SNAPSHOT_MAX_BATCHES": "0"}, "fanout.snapshot_max_batches"),
        ("[fanout]\nheartbeat_s = inf\n", {}, "fanout.heartbeat_s"),
        ("[auth]\nleeway_s = nan\n", {}, "auth.leeway_s"),
        # keys from an identity provider (tests/test_jwks.py has the rest)
        ("", {"RELAY_AUTH_JWKS_URL": "ftp://idp.example/jwks"}, "auth.jwks_url"),
        ("", {"RELAY_AUTH_JWKS_URL": "https:///jwks"}, "auth.jwks_url"),
        ("", {"RELAY_AUTH_JWKS_URL": "https://idp.example/jwks"}, "auth.algorithms"),
        (
            "[auth]\nalgorithms = ['RS256']\npublic_key_file = 'k.pem'\n",
            {"RELAY_AUTH_JWKS_URL": "https://idp.example/jwks"},
            "auth.public_key_file",
        ),
        ("", {"RELAY_AUTH_JWKS_CACHE_S": "0"}, "auth.jwks_cache_s"),
        ("", {"RELAY_AUTH_JWKS_CACHE_S": "inf"}, "auth.jwks_cache_s"),
        ("", {"RELAY_AUTH_JWKS_CACHE_S": "nan"}, "auth.jwks_cache_s"),
        ("", {"RELAY_AUTH_JWKS_TIMEOUT_S": "0"}, "auth.jwks_timeout_s"),
    ],
)
def test_invalid_config_names_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], key: str
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    assert info.value.key == key


def test_no_default_secret() -> None:
    with pytest.raises(ConfigError) as info:
        require_verifier(load_config(env={}))
    assert info.value.key == "auth.secret"
    with pytest.raises(ConfigError) as info:
        require_verifier(load_config(env={"RELAY_AUTH_ALGORITHMS": "RS256"}))
    assert info.value.key == "auth.public_key_file"


def test_masked_hides_secrets() -> None:
    cfg = load_config(
        env={"RELAY_AUTH_SECRET": "s3cret-value", "RELAY_REDIS_URL": "redis://u:pw@h:1/0"}
    )
    out = masked(cfg)
    assert out["auth"]["secret"] == "***" and "pw" not in out["redis"]["url"]


@pytest.mark.parametrize(
    "url",
    [
        "redis://u:s3cr3t@h:1/0",
        "redis://:s3cr3t@h:1/0",
        "rediss://h:1/0?password=s3cr3t",
        "redis://h:1/0?ssl_cert_reqs=none&password=s3cr3t&db=1",
        "redis://h:1/0?PASSWORD=s3cr3t",
        "unix:///run/redis.sock?password=s3cr3t&db=0",
        "redis://u:s3cr3t@h:1/0?password=s3cr3t",
    ],
)
def test_masked_hides_every_credential_form_of_the_url(url: str) -> None:
    """Issue 9, item 9: `relay check` prints the config; no password may show."""
    out = masked(load_config(env={"RELAY_REDIS_URL": url}))["redis"]["url"]
    assert "s3cr3t" not in out and "***" in out, out


def _relay(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")} | env
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_exits_2_with_one_line_naming_the_key() -> None:
    out = _relay("check", env={"RELAY_SERVER_PORT": "eighty"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.port" in lines[0]
    out = _relay("serve", env={})
    assert out.returncode == 2 and "auth.secret" in out.stderr
    out = _relay("check", env={"RELAY_SERVR_PORT": "1"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "RELAY_SERVR_PORT" in lines[0], lines


def test_cli_check_and_emit_against_redis(redis_url: str, prefix: str) -> None:
    env = {
        "RELAY_REDIS_URL": redis_url,
        "RELAY_REDIS_PREFIX": prefix,
        "RELAY_AUTH_SECRET": "x" * 32,
    }
    out = _relay("check", env=env)
    assert out.returncode == 0, out.stderr
    assert "***" in out.stdout and "x" * 32 not in out.stdout
    out = _relay("emit", "start", "b1", "u1", "--total", "2", "--label", "CLI", env=env)
    assert out.returncode == 0, out.stderr
    assert '"status": "pending"' in out.stdout and '"label": "CLI"' in out.stdout
    out = _relay("emit", "item", "b1", "u1", "i1", env=env)
    assert '"processed": 1' in out.stdout
    out = _relay("emit", "item", "b1", "someone-else", "i1", env=env)
    assert out.returncode == 1 and "another user" in out.stderr
    out = _relay("token", "--user", "u1", "--ttl", "60", env=env)
    assert out.returncode == 0 and out.stdout.count(".") == 2
    out = _relay("check", env={**env, "RELAY_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert out.returncode == 1 and "unreachable" in out.stderr
