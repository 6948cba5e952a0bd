"""What the relay and the workers need from Redis, and checking it as the configured user.

`ACL DRYRUN` and `ACL GETUSER` are admin commands, so a least-privilege user checks itself:
- the relay's commands are all reads, so each is simply run once, harmlessly (XREAD of `$`
  without BLOCK returns at once, the other keys are ones no batch uses);
- the workers' commands write, so they are checked inside a read-only script with
  `redis.acl_check_cmd` (Redis 7): loaded with SCRIPT LOAD and run with EVALSHA, the two
  commands a worker needs anyway. The list comes from the emit script's own text.

A refused command raises NoPermissionError ("NOPERM"); anything else (no such key, a wrong
type) means the command was allowed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final

import redis

from relay.keys import KeySpace
from relay.redis_client import AsyncClient, denied

# What the relay runs: readiness (PING), the stream reader (XREAD, XINFO STREAM), snapshots
# and resyncs (relay/snapshot.py: ZRANGEBYSCORE on the user index, HGETALL, and HGET of
# `updated_at` when a user has more batches than fanout.snapshot_max_batches).
RELAY_COMMANDS: Final = ("ping", "xread", "xinfo|stream", "zrangebyscore", "hget", "hgetall")
# Recommended: INFO tells the relay at a reconnect that Redis restarted or failed over (run id,
# replication id). Without it the relay falls back on the stream's own entries and counts.
OPTIONAL_RELAY_COMMANDS: Final = ("info",)

# The emit script's keys, in KeySpace.op_keys order.
_BATCH, _ITEMS, _INDEX, _STREAM, _SEEN = 1, 2, 3, 4, 5
# How to ask acl_check_cmd about each command the script may run: the key it runs on (0: none)
# and arguments of the right shape. A command missing here is checked on the batch key.
_CHECK_ARGS: Final[dict[str, tuple[int, tuple[str, ...]]]] = {
    "hget": (_ITEMS, ("f",)),
    "hmget": (_BATCH, ("f",)),
    "hset": (_BATCH, ("f", "v")),
    "hdel": (_BATCH, ("f",)),
    "hsetnx": (_ITEMS, ("f", "v")),
    "exists": (_SEEN, ()),
    "getrange": (_SEEN, ("0", "0")),
    "setrange": (_SEEN, ("0", "x")),
    "bitfield": (_SEEN, ("GET", "u1", "0")),
    "bitcount": (_SEEN, ()),
    "hgetall": (_BATCH, ()),
    "pexpire": (_BATCH, ("1",)),
    "pexpireat": (_INDEX, ("1",)),
    "zadd": (_INDEX, ("1", "m")),
    "zrange": (_INDEX, ("0", "-1")),
    "zremrangebyscore": (_INDEX, ("-inf", "0")),
    "xadd": (_STREAM, ("*", "f", "v")),
    "time": (0, ()),
}

# Changes nothing: asks, for each ARGV entry ("command<TAB>key index<TAB>args..."), whether
# this user may run it; returns the refused ones (and "?name" for any it could not check).
CHECK_SCRIPT: Final = """\
local refused = {}
for _, spec in ipairs(ARGV) do
  local parts = {}
  for part in string.gmatch(spec, '[^\\t]+') do parts[#parts + 1] = part end
  local args = {parts[1]}
  local key = tonumber(parts[2])
  if key > 0 then args[#args + 1] = KEYS[key] end
  for i = 3, #parts do args[#args + 1] = parts[i] end
  local ok, allowed = pcall(redis.acl_check_cmd, unpack(args))
  if not ok then
    refused[#refused + 1] = '?' .. parts[1]
  elseif not allowed then
    refused[#refused + 1] = parts[1]
  end
end
return refused
"""
CHECK_SCRIPT_SHA: Final = hashlib.sha1(CHECK_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis' id

# redis.call('X', ...), and the script's helpers that run or check one: check('X', ...)
# (redis.acl_check_cmd) and chunked('X', ...).
_SCRIPT_CALL_RE = re.compile(r"(?:redis\.p?call|check|chunked)\(\s*['\"]([A-Za-z]+)['\"]")
_CHECK_ID = "relay-check"  # a batch and user id no batch uses (ids are uuids in practice)


def script_commands(script: str) -> list[str]:
    """The commands a Lua script calls through redis.call / redis.pcall, lower case, sorted."""
    return sorted({name.lower() for name in _SCRIPT_CALL_RE.findall(script)})


def worker_commands(script: str) -> list[str]:
    """Everything a worker runs: PING (health checks, `relay check`), EVALSHA and SCRIPT LOAD
    (redis-py loads the script on NOSCRIPT), the script's commands, and the reads of `get` and
    `batches_for`."""
    reads = {"hgetall", "zrange"}
    return ["ping", "evalsha", "script|load", *sorted({*script_commands(script), *reads})]


async def _allowed(call: Callable[[], Awaitable[Any]]) -> bool:
    try:
        await call()
    except redis.exceptions.NoPermissionError:
        return False
    except redis.ResponseError:
        return True  # allowed, and refused for another reason (no such key...)
    return True


async def missing_relay_commands(client: AsyncClient, keys: KeySpace) -> list[str]:
    """The relay's commands this user may not run (on its keys); [] when all are allowed.
    Raises a Redis error when Redis cannot be reached."""
    stream = keys.stream(0)
    probes: dict[str, Callable[[], Awaitable[Any]]] = {
        "ping": client.ping,
        "xread": lambda: client.xread({stream: "$"}, count=1),
        "xinfo|stream": lambda: client.xinfo_stream(stream),
        "zrangebyscore": lambda: client.zrangebyscore(keys.user_index(0, _CHECK_ID), 0, 0),
        "hget": lambda: client.hget(keys.batch(_CHECK_ID), "updated_at"),
        "hgetall": lambda: client.hgetall(keys.batch(_CHECK_ID)),
    }
    return [name for name, probe in probes.items() if not await _allowed(probe)]


async def missing_optional_relay_commands(client: AsyncClient) -> list[str]:
    """The recommended relay commands this user may not run (see OPTIONAL_RELAY_COMMANDS)."""
    return [] if await _allowed(lambda: client.info("server")) else ["info"]


async def missing_worker_commands(client: AsyncClient, keys: KeySpace, script: str) -> list[str]:
    """The worker's commands this user may not run on the emit script's keys. A name starting
    with "?" could not be checked (e.g. Redis older than 7 has no acl_check_cmd)."""
    missing: list[str] = []
    if not await _allowed(client.ping):
        missing.append("ping")
    if not await _allowed(lambda: client.script_load(CHECK_SCRIPT)):
        missing.append("script|load")
    op_keys = keys.op_keys(_CHECK_ID, _CHECK_ID)
    specs = []
    for name in worker_commands(script)[3:]:
        key, args = _CHECK_ARGS.get(name, (_BATCH, ()))
        specs.append("\t".join((name, str(key), *args)))
    try:
        refused: Any = await client.evalsha(CHECK_SCRIPT_SHA, len(op_keys), *op_keys, *specs)
    except redis.exceptions.NoPermissionError as e:
        what = denied(e)
        return [*missing, what if what == "evalsha" else f"evalsha ({what})"]
    except redis.exceptions.NoScriptError:
        return [*missing, "?script (not loaded: cannot check the script's commands)"]
    except redis.ResponseError as e:  # e.g. no redis.acl_check_cmd before Redis 7
        return [*missing, f"?script ({e})"]
    return missing + [r.decode() if isinstance(r, bytes) else str(r) for r in refused]
