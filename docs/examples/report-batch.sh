#!/bin/sh
# Report one batch's progress to the relay with nothing but redis-cli (and a POSIX shell).
#
#   REDIS_URL=redis://127.0.0.1:6379/0 ./report-batch.sh BATCH_ID USER_ID [ITEMS]
#
# It does what a worker in any language does (docs/PROTOCOL.md, sections 1 and 2):
#   1. SCRIPT LOAD the shipped relay/lua/emit.lua once, keep its SHA-1;
#   2. EVALSHA it with 6 KEYS (batch hash, item hash, user index, stream, seen and failed
#      bitmaps: all with the batch's shard tag {PREFIX:SHARD}) and ARGV: op, batch_id, user_id,
#      live TTL ms, terminal TTL ms, stream MAXLEN, then the op's name/value pairs.
# Here: `start` (total ITEMS, a label), one `item` per row (the last one fails, ok 0), then
# `finish status failed` because a row failed. Every change is one stream entry, which the
# relay pushes to USER_ID's browsers.
#
# Settings (environment): REDIS_URL (default redis://127.0.0.1:6379/0), PREFIX (default
# progress) and SHARDS (default 1): the same as the relay's [redis] url, prefix and shards.
# EMIT_LUA: path of emit.lua (default: the copy in this repository). REDIS_CLI: the binary.
set -eu

usage="usage: $0 BATCH_ID USER_ID [ITEMS]"
BATCH=${1:?$usage}
OWNER=${2:?$usage}
ITEMS=${3:-5}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
PREFIX=${PREFIX:-progress}
SHARDS=${SHARDS:-1}
REDIS_CLI=${REDIS_CLI:-redis-cli}
EMIT_LUA=${EMIT_LUA:-$(dirname "$0")/../../relay/lua/emit.lua}
ACTIVE_MS=86400000    # keys of a live batch expire after 24 h without a change
FINISHED_MS=3600000   # ... of a finished batch after 1 h
MAXLEN=100000         # approximate cap of the stream

# 1. Load the script (idempotent: the same file always has the same SHA-1).
SHA=$("$REDIS_CLI" -u "$REDIS_URL" -x SCRIPT LOAD < "$EMIT_LUA")
case $SHA in
  *[!0-9a-f]* | "") echo "SCRIPT LOAD failed: $SHA" >&2; exit 1 ;;
esac

# The batch's shard: crc32(batch_id) mod SHARDS. gzip's 8-byte trailer starts with the CRC-32
# of its input (the same CRC as zlib's), least significant byte first.
SHARD=0
if [ "$SHARDS" -gt 1 ]; then
  set -- $(printf '%s' "$BATCH" | gzip -c | tail -c 8 | od -An -tu1 -N4)
  SHARD=$((($1 + 256 * $2 + 65536 * $3 + 16777216 * $4) % SHARDS))
fi
TAG="{$PREFIX:$SHARD}"

# 2. One operation: emit OP [NAME VALUE ...]. An error reply (BADARG, WRONGUSER...) stops us.
emit() {
  op=$1
  shift
  reply=$("$REDIS_CLI" -u "$REDIS_URL" --no-raw EVALSHA "$SHA" 6 \
    "$TAG:b:$BATCH" "$TAG:i:$BATCH" "$TAG:u:$OWNER" "$TAG:stream" \
    "$TAG:seen:$BATCH" "$TAG:failed:$BATCH" \
    "$op" "$BATCH" "$OWNER" "$ACTIVE_MS" "$FINISHED_MS" "$MAXLEN" "$@")
  case $reply in
    "(error)"*) echo "$op: $reply" >&2; exit 1 ;;
  esac
}

emit start total "$ITEMS" label "rows from redis-cli"
i=1
while [ "$i" -le "$ITEMS" ]; do
  ok=1
  [ "$i" -eq "$ITEMS" ] && ok=0    # the last row fails, to show a failed item
  emit item item_id "row-$i" ok "$ok"
  i=$((i + 1))
done
emit finish status failed
echo "reported $BATCH for $OWNER: $ITEMS items on $TAG"
