"""Redis key layout. Cluster-safe: every key an operation touches shares its shard's hash tag.

Shard s of prefix P has the tag `{P:s}`; its keys are
  {P:s}:stream            the shard's stream of absolute states
  {P:s}:b:<batch_id>      hash: the batch's state (same fields as a stream entry)
  {P:s}:i:<batch_id>      hash: item_id -> "1" (successful) or "0" (failed)
  {P:s}:u:<user_id>       sorted set: batch_id scored by the time (ms) its keys expire
  {P:s}:seen:<batch_id>   bitmap: bit n set once numbered item id n was counted
  {P:s}:failed:<batch_id> bitmap: bit n set while numbered item id n counts as failed
A batch's shard is crc32(utf-8 batch_id) mod shards: stable, and one line in any language.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeySpace:
    prefix: str = "progress"
    shards: int = 1

    def shard_of(self, batch_id: str) -> int:
        return zlib.crc32(batch_id.encode()) % self.shards

    def tag(self, shard: int) -> str:
        return f"{{{self.prefix}:{shard}}}"

    def stream(self, shard: int) -> str:
        return f"{self.tag(shard)}:stream"

    def streams(self) -> list[str]:
        return [self.stream(s) for s in range(self.shards)]

    def batch(self, batch_id: str) -> str:
        return f"{self.tag(self.shard_of(batch_id))}:b:{batch_id}"

    def items(self, batch_id: str) -> str:
        return f"{self.tag(self.shard_of(batch_id))}:i:{batch_id}"

    def seen(self, batch_id: str) -> str:
        return f"{self.tag(self.shard_of(batch_id))}:seen:{batch_id}"

    def failed(self, batch_id: str) -> str:
        return f"{self.tag(self.shard_of(batch_id))}:failed:{batch_id}"

    def user_index(self, shard: int, user_id: str) -> str:
        return f"{self.tag(shard)}:u:{user_id}"

    def op_keys(self, batch_id: str, user_id: str) -> list[str]:
        """KEYS for the emit script, in order: batch, items, user index, stream, seen, failed."""
        tag = self.tag(self.shard_of(batch_id))
        return [
            f"{tag}:b:{batch_id}",
            f"{tag}:i:{batch_id}",
            f"{tag}:u:{user_id}",
            f"{tag}:stream",
            f"{tag}:seen:{batch_id}",
            f"{tag}:failed:{batch_id}",
        ]
