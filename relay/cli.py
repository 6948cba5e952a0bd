"""Command line: relay serve | token | emit | check | demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any

from relay.config import HMAC_ALGORITHMS, Config, load_config, masked, require_verifier
from relay.errors import ConfigError, EmitError, describe

EXIT_CONFIG = 2


def _config(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("RELAY_CONFIG") or None
    return load_config(path)


def _run_loop(coro: object) -> None:
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.logs import configure  # noqa: PLC0415
    from relay.server import Relay  # noqa: PLC0415

    cfg = _config(args)
    require_verifier(cfg)
    configure(cfg.log.level, cfg.log.format)
    relay = Relay(cfg)

    async def main() -> None:
        await relay.start()
        relay.install_signal_handlers()
        await relay.serve_forever()

    _run_loop(main())
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from relay.auth import mint_token  # noqa: PLC0415

    cfg = _config(args)
    require_verifier(cfg)
    algorithm = cfg.auth.algorithms[0]
    if algorithm not in HMAC_ALGORITHMS:
        raise ConfigError(
            "auth.algorithms", "`relay token` mints HS* tokens only (needs auth.secret)"
        )
    extra: dict[str, object] = dict(cfg.auth.required_claims)
    if cfg.auth.audience:
        extra["aud"] = cfg.auth.audience
    if cfg.auth.issuer:
        extra["iss"] = cfg.auth.issuer
    if cfg.auth.user_claim != "sub":
        extra[cfg.auth.user_claim] = args.user
    print(mint_token(cfg.auth.secret, args.user, ttl_s=args.ttl, algorithm=algorithm, extra=extra))
    return 0


def cmd_emit(args: argparse.Namespace) -> int:
    from relay.emitter import Emitter  # noqa: PLC0415
    from relay.redis_client import sync_client  # noqa: PLC0415

    cfg = _config(args)
    client = sync_client(cfg.redis)
    emitter = Emitter(
        client,
        prefix=cfg.redis.prefix,
        shards=cfg.redis.shards,
        active_s=cfg.retention.active_s,
        finished_s=cfg.retention.finished_s,
        stream_maxlen=cfg.retention.stream_maxlen,
    )
    b, u = args.batch_id, args.user_id
    if args.op == "start":
        state = emitter.start(b, u, args.total, label=args.label)
    elif args.op == "item":
        state = emitter.item(b, u, args.item_id, ok=not args.failed)
    elif args.op == "items":
        state = _emit_items(emitter, b, u, sys.stdin, default_ok=not args.failed, chunk=args.chunk)
    elif args.op == "incr":
        state = emitter.incr(b, u, successful=args.successful, failed=args.failed)
    elif args.op == "set":
        state = emitter.set(
            b,
            u,
            total=args.total,
            processed=args.processed,
            successful=args.successful,
            failed=args.failed,
            status=args.status,
        )
    else:
        state = emitter.finish(b, u, args.status)
    print(json.dumps(state.to_dict() if state else None))
    return 0


ITEMS_LINES = """\
stdin: one item per line, `ITEM_ID` or `ITEM_ID<TAB>ok` or `ITEM_ID<TAB>failed`
(a line without a tab is `ok`, or `failed` with --failed; blank lines are skipped). Sent
through `items` in chunks of --chunk lines, each chunk atomic; prints the final state."""


def _emit_items(
    emitter: Any, batch_id: str, user_id: str, lines: Iterable[str], *, default_ok: bool, chunk: int
) -> Any:
    state = None
    outcomes: list[tuple[str, bool]] = []
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line:
            continue
        item_id, tab, outcome = line.rpartition("\t")
        if not tab:
            item_id, ok = line, default_ok
        elif outcome in ("ok", "failed"):
            ok = outcome == "ok"
        else:
            raise EmitError(
                f"stdin line {number}: outcome must be `ok` or `failed`, got {outcome!r}"
            )
        outcomes.append((item_id, ok))
        if len(outcomes) >= chunk:
            state = emitter.items(batch_id, user_id, outcomes)
            outcomes = []
    if outcomes or state is None:
        state = emitter.items(batch_id, user_id, outcomes)
    return state


async def _check_redis(cfg: Config, *, worker: bool) -> list[str]:
    """The commands the relay (or, with `worker`, a worker) needs that the configured user may
    not run. Raises when Redis cannot be reached."""
    from relay import acl  # noqa: PLC0415
    from relay.emitter import SCRIPT  # noqa: PLC0415
    from relay.keys import KeySpace  # noqa: PLC0415
    from relay.redis_client import async_client  # noqa: PLC0415

    client = async_client(cfg.redis)
    keys = KeySpace(cfg.redis.prefix, cfg.redis.shards)
    try:
        if worker:
            return await acl.missing_worker_commands(client, keys, SCRIPT)
        missing = await acl.missing_relay_commands(client, keys)
        if not missing and (optional := await acl.missing_optional_relay_commands(client)):
            print(
                f"redis: warning: the user may not run {', '.join(optional)}: the relay then "
                "tells a Redis restart or failover apart by the stream alone (recommended: +info)",
                file=sys.stderr,
            )
        return missing
    finally:
        await client.aclose()


def cmd_check(args: argparse.Namespace) -> int:
    from relay import acl  # noqa: PLC0415
    from relay.emitter import SCRIPT  # noqa: PLC0415

    cfg = _config(args)
    print(json.dumps(masked(cfg), indent=2))
    if not args.worker:
        require_verifier(cfg)
    url = masked(cfg)["redis"]["url"]
    try:
        missing = asyncio.run(_check_redis(cfg, worker=args.worker))
    except Exception as e:  # unreachable, TLS, auth, cluster down: one line, no traceback
        print(f"redis: unreachable at {url}: {describe(e)}", file=sys.stderr)
        return 1
    role = "worker" if args.worker else "relay"
    needed = acl.worker_commands(SCRIPT) if args.worker else list(acl.RELAY_COMMANDS)
    if missing:
        user = urllib.parse.urlsplit(cfg.redis.url).username or "default"
        print(
            f"redis: user {user!r} may not run what the {role} needs: {', '.join(missing)} "
            f"(on keys {{{cfg.redis.prefix}:*); see docs/DEPLOYMENT.md, Least-privilege users",
            file=sys.stderr,
        )
        return 1
    print(f"redis: ok ({url}); the {role}'s commands are allowed: {' '.join(needed)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from relay.demo import run_demo  # noqa: PLC0415

    return run_demo(args)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description="Live batch progress over WebSocket.")
    p.add_argument("--config", help="TOML config file (default: $RELAY_CONFIG, else none)")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, epilog: str | None = None) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help_text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file")
        return sp

    command("serve", "run the relay").set_defaults(func=cmd_serve)
    tok = command("token", "mint a development token with the configured secret")
    tok.add_argument("--user", required=True)
    tok.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    tok.set_defaults(func=cmd_token)

    emit = command(
        "emit",
        "run one operation and print the new state as JSON",
        epilog=f"relay emit items: {ITEMS_LINES}",
    )
    ops = emit.add_subparsers(dest="op", required=True)
    for name in ("start", "item", "items", "incr", "set", "finish"):
        o = ops.add_parser(
            name,
            description=ITEMS_LINES if name == "items" else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        o.add_argument("batch_id")
        o.add_argument("user_id")
        if name == "start":
            o.add_argument("--total", type=int, required=True)
            o.add_argument("--label")
        elif name == "item":
            o.add_argument("item_id")
            o.add_argument("--failed", action="store_true", help="the item failed")
        elif name == "items":
            o.add_argument("--failed", action="store_true", help="lines without a tab failed")
            o.add_argument(
                "--chunk", type=_positive, default=1000, help="lines per call (default 1000)"
            )
        elif name == "incr":
            o.add_argument("--successful", type=int, default=0)
            o.add_argument("--failed", type=int, default=0)
        elif name == "set":
            for field in ("total", "processed", "successful", "failed"):
                o.add_argument(f"--{field}", type=int)
            o.add_argument("--status")
        else:
            o.add_argument("--status", default="completed")
    emit.set_defaults(func=cmd_emit)

    check = command("check", "validate the config, ping Redis, check the user's permissions")
    check.add_argument(
        "--worker", action="store_true", help="check what a worker needs instead of the relay"
    )
    check.set_defaults(func=cmd_check)
    demo = command("demo", "everything on one machine: Redis, relay, workers, a live page")
    demo.add_argument("--port", type=int, default=8765, help="HTTP/WebSocket port (0: any)")
    demo.add_argument("--no-browser", action="store_true", help="accepted for compatibility")
    demo.add_argument(
        "--config-secret",
        action="store_true",
        help="sign the page's tokens with the configured [auth] secret (default: a random one)",
    )
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as e:
        print(f"relay: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except EmitError as e:
        print(f"relay: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
