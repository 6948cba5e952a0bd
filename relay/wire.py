"""The wire formats, in one place.

- `BatchState`: a batch's absolute state, as the Lua script stores it in the batch hash and
  appends it to the shard stream (same field names in both). Shared by the SDK and the relay.
- The JSON frames the relay sends to browsers and the client frames it accepts.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Final

import msgspec

from relay.errors import BadEntry

SCHEMA_VERSION: Final = "1"
STATUSES: Final = frozenset({"pending", "processing", "completed", "failed", "cancelled"})
TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
MAX_COUNT: Final = 2**53 - 1  # largest integer every JSON client reads exactly
MAX_ID_LEN: Final = 128
MAX_LABEL_LEN: Final = 200
MAX_TIME_MS: Final = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last time iso_ms can write

_INT_FIELDS: Final = (
    "total",
    "processed",
    "successful",
    "failed",
    "seq",
    "started_at",
    "updated_at",
)


class BatchState(msgspec.Struct, frozen=True, kw_only=True):
    """A batch's absolute state. Times are Redis server time in ms since the epoch."""

    batch_id: str
    user_id: str
    status: str
    total: int
    processed: int
    successful: int
    failed: int
    seq: int
    started_at: int
    updated_at: int
    label: str | None = None

    @property
    def progress_percentage(self) -> float:
        """100 * processed / total, clamped to [0, 100]; 0 when total is 0; 100 once completed."""
        if self.status == "completed":
            return 100.0
        if self.total <= 0:
            return 0.0
        return round(min(100.0, max(0.0, 100.0 * self.processed / self.total)), 2)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, object]:
        """Plain dict with progress_percentage added (what `relay emit` prints)."""
        out: dict[str, object] = msgspec.structs.asdict(self)
        out["progress_percentage"] = self.progress_percentage
        return out


_INT_KEYS: Final = tuple((name, name.encode()) for name in _INT_FIELDS)
_STATUS_BY_BYTES: Final = {status.encode(): status for status in STATUSES}
_VERSION: Final = SCHEMA_VERSION.encode()


def _as_bytes(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Mapping[bytes, bytes]:
    """Stream entries come as bytes; a hash read with decode_responses=True comes as str."""
    for key in fields:
        if isinstance(key, bytes):
            return fields  # type: ignore[return-value]
        break
    return {str(k).encode(): str(v).encode() for k, v in fields.items()}


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise BadEntry("bad_encoding", f"field {name} is not UTF-8") from e


# The emit script's field order (relay/lua/emit.lua `state`); label, when set, comes last.
_SCRIPT_ORDER: Final = (b"v", b"batch_id", b"user_id", b"status", *(k for _, k in _INT_KEYS))


def state_from_flat(flat: Sequence[bytes]) -> BatchState:
    """state_from_fields for an entry as Redis sends it (flat name/value list). An entry in the
    emit script's field order is read by position (no dict); any other goes through a dict."""
    n = len(flat)
    if (n == 22 or (n == 24 and flat[22] == b"label")) and tuple(flat[0:22:2]) == _SCRIPT_ORDER:
        return _build(
            flat[1], flat[9:22:2], flat[3], flat[5], flat[7], flat[23] if n == 24 else None
        )
    return state_from_fields(dict(zip(flat[::2], flat[1::2], strict=False)))


def state_from_fields(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> BatchState:
    """Validate a stream entry / batch hash and build the state. Raises BadEntry(reason).

    On the reader's hot path: numbers are checked and parsed straight from the bytes (bytes'
    isdigit() is ASCII-only), only the text fields are decoded, unknown fields are not looked at.
    """
    f = _as_bytes(fields)
    return _build(
        f.get(b"v"),
        [f.get(key) for _, key in _INT_KEYS],
        f.get(b"batch_id"),
        f.get(b"user_id"),
        f.get(b"status"),
        f.get(b"label"),
    )


def _build(  # noqa: PLR0917 - the fields of an entry, in one place
    version: bytes | None,
    raw_ints: Sequence[bytes | None],
    raw_batch: bytes | None,
    raw_user: bytes | None,
    raw_status: bytes | None,
    raw_label: bytes | None,
) -> BatchState:
    if version != _VERSION:
        detail = "no schema version field `v`" if version is None else "unknown schema version"
        raise BadEntry("foreign", f"{detail} {(version or b'')[:20]!r}")
    # Fast path: every number present, plain ASCII digits, at most 16 of them, within range;
    # else the loop below finds the first fault, field by field, and names it.
    if (
        all(raw_ints)
        and b"".join(raw_ints).isdigit()  # type: ignore[arg-type]  # all() ruled out None
        and max(map(len, raw_ints)) <= 16  # type: ignore[arg-type]
        and max(ints := list(map(int, raw_ints))) <= MAX_COUNT  # type: ignore[arg-type]
    ):
        return _build_rest(ints, raw_batch, raw_user, raw_status, raw_label)
    ints = []
    for (name, _key), raw in zip(_INT_KEYS, raw_ints, strict=True):
        if raw is None:
            raise BadEntry("missing_field", name)
        if not raw.isdigit():
            raise BadEntry("bad_number", f"{name}={raw[:30]!r}")
        if len(raw) > 16 or (number := int(raw)) > MAX_COUNT:
            raise BadEntry("too_large", f"{name}={raw[:30]!r}")
        ints.append(number)
    return _build_rest(ints, raw_batch, raw_user, raw_status, raw_label)


def _build_rest(
    ints: list[int],
    raw_batch: bytes | None,
    raw_user: bytes | None,
    raw_status: bytes | None,
    raw_label: bytes | None,
) -> BatchState:
    total, processed, successful, failed, seq, started_at, updated_at = ints
    if started_at > MAX_TIME_MS or updated_at > MAX_TIME_MS:
        raise BadEntry("too_large", "started_at/updated_at past year 9999")
    if raw_batch is None or raw_user is None or raw_status is None:
        missing = "batch_id" if raw_batch is None else "user_id" if raw_user is None else "status"
        raise BadEntry("missing_field", missing)
    status = _STATUS_BY_BYTES.get(raw_status)
    if status is None:
        raise BadEntry("bad_status", repr(raw_status[:30]))
    batch_id, user_id = _text(raw_batch, "batch_id"), _text(raw_user, "user_id")
    if not (0 < len(batch_id) <= MAX_ID_LEN and 0 < len(user_id) <= MAX_ID_LEN):
        raise BadEntry("bad_id", "batch_id and user_id must be 1-128 chars")
    label = _text(raw_label, "label") if raw_label else None
    if label is not None and len(label) > MAX_LABEL_LEN:
        raise BadEntry("bad_label", "label longer than 200 chars")
    return BatchState(
        batch_id=batch_id,
        user_id=user_id,
        status=status,
        total=total,
        processed=processed,
        successful=successful,
        failed=failed,
        seq=seq,
        started_at=started_at,
        updated_at=updated_at,
        label=label,
    )


# ---------------------------------------------------------------------------------------------
# Frames sent to browsers. Tagged on "action" as the upload app's client expects.


class ProgressPayload(msgspec.Struct, kw_only=True):
    batch_id: str
    status: str
    total: int
    processed: int
    successful: int
    failed: int
    progress_percentage: float
    seq: int
    updated_at: str
    rate: float | None
    eta_seconds: float | None
    label: str | None


class BatchProgress(msgspec.Struct, tag_field="action", tag="batch_progress", kw_only=True):
    payload: ProgressPayload
    timestamp: str


class AuthSuccess(msgspec.Struct, tag_field="action", tag="auth_success"):
    user_id: str


class AuthError(msgspec.Struct, tag_field="action", tag="auth_error"):
    message: str


class Ping(msgspec.Struct, tag_field="action", tag="ping"):
    pass


class Pong(msgspec.Struct, tag_field="action", tag="pong"):
    pass


_encoder = msgspec.json.Encoder()


def encode(frame: msgspec.Struct) -> bytes:
    """Encode a frame to UTF-8 JSON, once; it is sent as a text frame to every connection."""
    return _encoder.encode(frame)


PING_TEXT: Final = encode(Ping())
PONG_TEXT: Final = encode(Pong())


def ws_text(payload: bytes) -> bytes:
    """`payload` as one WebSocket text frame from a server (RFC 6455 5.2: FIN, opcode 1, no
    mask, no extension): the same bytes for every connection, written straight to the socket."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65_536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def iso_ms(ms: int | float) -> str:
    """ISO-8601 UTC with millisecond precision and a trailing Z."""
    seconds, millis = divmod(math.floor(ms), 1000)  # both from one integer: no :02.999 round-up
    return f"{_iso_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def progress_frame(
    state: BatchState, *, rate: float | None, eta_seconds: float | None, now_ms: float | None = None
) -> bytes:
    """Build and encode one batch_progress frame (done once per update, shared by connections)."""
    if rate is not None and not math.isfinite(rate):
        rate = None
    payload = ProgressPayload(
        batch_id=state.batch_id,
        status=state.status,
        total=state.total,
        processed=state.processed,
        successful=state.successful,
        failed=state.failed,
        progress_percentage=state.progress_percentage,
        seq=state.seq,
        updated_at=iso_ms(state.updated_at),
        rate=rate,
        eta_seconds=eta_seconds,
        label=state.label,
    )
    ts = time.time() * 1000.0 if now_ms is None else now_ms
    return encode(BatchProgress(payload=payload, timestamp=iso_ms(ts)))


# ---------------------------------------------------------------------------------------------
# Frames received from browsers.


class ClientAuth(msgspec.Struct):
    token: str


class ClientPing:
    pass


class ClientPong:
    pass


class ClientOther:
    pass


CLIENT_PING: Final = ClientPing()
CLIENT_PONG: Final = ClientPong()
CLIENT_OTHER: Final = ClientOther()

ClientFrame = ClientAuth | ClientPing | ClientPong | ClientOther

_decoder = msgspec.json.Decoder()


class BadClientFrame(ValueError):
    """A client frame that is not JSON, or an auth message without a string token."""


def parse_client_frame(data: str | bytes) -> ClientFrame:
    """Classify one client frame. Raises BadClientFrame for invalid format (close 4004)."""
    try:
        obj = _decoder.decode(data)
    except msgspec.DecodeError as e:
        raise BadClientFrame("message is not valid JSON") from e
    except RecursionError as e:  # msgspec's nesting limit
        raise BadClientFrame("message is nested too deeply") from e
    if not isinstance(obj, dict):
        raise BadClientFrame("message is not a JSON object")
    if obj.get("type") == "auth":
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise BadClientFrame("auth message needs a string token")
        return ClientAuth(token)
    action = obj.get("action")
    if action == "ping":
        return CLIENT_PING
    if action == "pong":
        return CLIENT_PONG
    return CLIENT_OTHER
