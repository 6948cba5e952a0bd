"""Wire formats (relay.wire): batch_progress frames, stream entry validation, client frames."""

from __future__ import annotations

import contextlib
import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import BadEntry
from relay.wire import (
    CLIENT_OTHER,
    CLIENT_PING,
    CLIENT_PONG,
    MAX_COUNT,
    MAX_TIME_MS,
    STATUSES,
    BadClientFrame,
    BatchState,
    ClientAuth,
    iso_ms,
    parse_client_frame,
    progress_frame,
    state_from_fields,
    state_from_flat,
    ws_text,
)

PAYLOAD_KEYS = {
    "batch_id",
    "status",
    "total",
    "processed",
    "successful",
    "failed",
    "progress_percentage",
    "seq",
    "updated_at",
    "rate",
    "eta_seconds",
    "label",
}
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
T0 = 1_700_000_000_000


def fields(**overrides: bytes | None) -> dict[bytes, bytes]:
    """A valid stream entry as the Lua script writes it; None removes a field."""
    base: dict[str, bytes | None] = {
        "v": b"1",
        "batch_id": b"8f1c7a8e-4a8b-4d6e-9a59-2f3c1f3b9d10",
        "user_id": b"user-1",
        "status": b"processing",
        "total": b"10",
        "processed": b"4",
        "successful": b"3",
        "failed": b"1",
        "seq": b"5",
        "started_at": str(T0).encode(),
        "updated_at": str(T0 + 1234).encode(),
        "label": b"upload",
    }
    base.update(overrides)
    return {k.encode(): v for k, v in base.items() if v is not None}


def state(**kw: Any) -> BatchState:
    args: dict[str, Any] = {
        "batch_id": "b1",
        "user_id": "u1",
        "status": "processing",
        "total": 10,
        "processed": 4,
        "successful": 3,
        "failed": 1,
        "seq": 5,
        "started_at": T0,
        "updated_at": T0 + 1234,
        "label": None,
    }
    args.update(kw)
    return BatchState(**args)


# -- batch_progress frames -------------------------------------------------------------------------


def check_frame(text: bytes) -> dict[str, Any]:
    obj = json.loads(text)
    assert isinstance(obj, dict)
    assert set(obj) == {"action", "payload", "timestamp"}
    assert obj["action"] == "batch_progress"
    assert isinstance(obj["timestamp"], str)
    assert ISO_Z.match(obj["timestamp"])
    p = obj["payload"]
    assert isinstance(p, dict)
    assert set(p) == PAYLOAD_KEYS
    for name in ("total", "processed", "successful", "failed", "seq"):
        assert type(p[name]) is int
        assert p[name] >= 0
    assert type(p["progress_percentage"]) is float
    assert 0.0 <= p["progress_percentage"] <= 100.0
    assert isinstance(p["status"], str)
    assert isinstance(p["batch_id"], str)
    assert isinstance(p["updated_at"], str)
    assert ISO_Z.match(p["updated_at"])
    assert p["rate"] is None or type(p["rate"]) is float
    assert p["eta_seconds"] is None or type(p["eta_seconds"]) is float
    assert p["label"] is None or isinstance(p["label"], str)
    return obj


def test_progress_frame_shape() -> None:
    text = progress_frame(state(label="photos"), rate=2.5, eta_seconds=2.4, now_ms=T0 + 2000)
    obj = check_frame(text)
    p = obj["payload"]
    assert p == {
        "batch_id": "b1",
        "status": "processing",
        "total": 10,
        "processed": 4,
        "successful": 3,
        "failed": 1,
        "progress_percentage": 40.0,
        "seq": 5,
        "updated_at": "2023-11-14T22:13:21.234Z",
        "rate": 2.5,
        "eta_seconds": 2.4,
        "label": "photos",
    }
    assert obj["timestamp"] == "2023-11-14T22:13:22.000Z"


def test_progress_frame_nulls() -> None:
    p = check_frame(progress_frame(state(), rate=None, eta_seconds=None, now_ms=T0))["payload"]
    assert p["rate"] is None
    assert p["eta_seconds"] is None
    assert p["label"] is None


@pytest.mark.parametrize("rate", [math.inf, -math.inf, math.nan])
def test_progress_frame_non_finite_rate_is_null(rate: float) -> None:
    p = check_frame(progress_frame(state(), rate=rate, eta_seconds=None, now_ms=T0))["payload"]
    assert p["rate"] is None


def test_progress_frame_percentage_is_float_at_bounds() -> None:
    for st_ in (state(total=0, processed=0), state(status="completed", total=0, processed=0)):
        check_frame(progress_frame(st_, rate=None, eta_seconds=None, now_ms=T0))
    p = check_frame(
        progress_frame(state(total=3, processed=9), rate=None, eta_seconds=None, now_ms=T0)
    )["payload"]
    assert p["progress_percentage"] == 100.0


def test_progress_frame_default_timestamp_is_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    obj = check_frame(progress_frame(state(), rate=None, eta_seconds=None))
    stamp = datetime.strptime(obj["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before <= stamp <= datetime.now(UTC)


def test_iso_ms() -> None:
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(T0 + 7) == "2023-11-14T22:13:20.007Z"
    assert iso_ms(T0 + 999.6) == "2023-11-14T22:13:20.999Z"
    assert iso_ms(MAX_TIME_MS) == "9999-12-31T23:59:59.999Z"


def test_iso_ms_never_rounds_into_the_next_second() -> None:
    # 1.9999999 s: seconds and millis must come from the same truncated value.
    assert iso_ms(1999.9999) == "1970-01-01T00:00:01.999Z"
    assert iso_ms(59_999.99995) == "1970-01-01T00:00:59.999Z"


@settings(max_examples=200, deadline=None)
@given(st.floats(0, float(MAX_TIME_MS), allow_nan=False))
def test_iso_ms_matches_floor(ms: float) -> None:
    text = iso_ms(ms)
    assert ISO_Z.match(text)
    parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    back = (parsed - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert back == math.floor(ms)


# -- state_from_fields -----------------------------------------------------------------------------


def test_valid_entry() -> None:
    s = state_from_fields(fields())
    assert s == BatchState(
        batch_id="8f1c7a8e-4a8b-4d6e-9a59-2f3c1f3b9d10",
        user_id="user-1",
        status="processing",
        total=10,
        processed=4,
        successful=3,
        failed=1,
        seq=5,
        started_at=T0,
        updated_at=T0 + 1234,
        label="upload",
    )


def test_valid_entry_from_str_mapping() -> None:
    as_str = {k.decode(): v.decode() for k, v in fields().items()}
    assert state_from_fields(as_str) == state_from_fields(fields())


@given(st.permutations(list(range(12))))
def test_flat_entry_in_any_field_order(order: list[int]) -> None:
    """An entry as Redis sends it (flat name/value list): the same state in any field order,
    including the emit script's."""
    items = list(fields().items())
    items = [items[i % len(items)] for i in order if i < len(items)]
    flat = [x for pair in items for x in pair]
    assert state_from_flat(flat) == state_from_fields(fields())


def test_empty_label_is_none() -> None:
    assert state_from_fields(fields(label=b"")).label is None
    assert state_from_fields(fields(label=None)).label is None


def test_bounds_accepted() -> None:
    big = str(MAX_COUNT).encode()
    s = state_from_fields(fields(total=big, processed=big, seq=big, updated_at=b"0"))
    assert s.total == s.processed == s.seq == MAX_COUNT
    assert state_from_fields(fields(updated_at=str(MAX_TIME_MS).encode())).updated_at == (
        MAX_TIME_MS
    )
    assert state_from_fields(fields(batch_id=b"x" * 128, label=b"l" * 200)).label == "l" * 200


def reason(entry: dict[bytes, bytes]) -> str:
    with pytest.raises(BadEntry) as info:
        state_from_fields(entry)
    return info.value.reason


@pytest.mark.parametrize(
    "name",
    [
        "batch_id",
        "user_id",
        "status",
        "total",
        "processed",
        "successful",
        "failed",
        "seq",
        "started_at",
        "updated_at",
    ],
)
def test_missing_field(name: str) -> None:
    with pytest.raises(BadEntry) as info:
        state_from_fields(fields(**{name: None}))
    assert info.value.reason == "missing_field"
    assert info.value.detail == name


@pytest.mark.parametrize("value", [b"", b"abc", b"1.5", b"1e3", b" 1", b"0x10", b"\xd9\xa3", b"+1"])
def test_non_numeric(value: bytes) -> None:
    assert reason(fields(total=value)) == "bad_number"


@pytest.mark.parametrize("name", ["total", "processed", "seq", "updated_at"])
def test_negative(name: str) -> None:
    assert reason(fields(**{name: b"-1"})) == "bad_number"


@pytest.mark.parametrize(
    "value", [str(MAX_COUNT + 1).encode(), str(2**64).encode(), b"9" * 400, b"0" * 17 + b"1"]
)
def test_huge(value: bytes) -> None:
    assert reason(fields(processed=value)) == "too_large"


@pytest.mark.parametrize("name", ["started_at", "updated_at"])
def test_time_past_year_9999(name: str) -> None:
    assert reason(fields(**{name: str(MAX_TIME_MS + 1).encode()})) == "too_large"


@pytest.mark.parametrize("value", [b"done", b"PROCESSING", b"", b"completed "])
def test_unknown_status(value: bytes) -> None:
    assert reason(fields(status=value)) == "bad_status"


def test_bad_utf8() -> None:
    assert reason(fields(label=b"\xff\xfe")) == "bad_encoding"
    assert reason(fields(batch_id=b"\xc3\x28")) == "bad_encoding"
    # Fields the schema does not name are ignored (forward compatible), whatever their bytes.
    assert state_from_fields({**fields(), b"\xc3\x28": b"\xff"}).batch_id


def test_foreign_entries() -> None:
    assert reason(fields(v=None)) == "foreign"
    assert reason(fields(v=b"2")) == "foreign"
    assert reason({b"hello": b"world"}) == "foreign"
    assert reason({}) == "foreign"


def test_bad_ids_and_label() -> None:
    assert reason(fields(batch_id=b"")) == "bad_id"
    assert reason(fields(user_id=b"u" * 129)) == "bad_id"
    assert reason(fields(label=b"l" * 201)) == "bad_label"


_FIELD_NAMES = (
    b"v",
    b"batch_id",
    b"user_id",
    b"status",
    b"total",
    b"processed",
    b"successful",
    b"failed",
    b"seq",
    b"started_at",
    b"updated_at",
    b"label",
)
_name = st.sampled_from(_FIELD_NAMES) | st.binary(max_size=12)
_value = (
    st.binary(max_size=24)
    | st.integers(-(2**70), 2**70).map(lambda i: str(i).encode())
    | st.sampled_from([b"1", b"0", b"completed", b"pending", str(MAX_COUNT).encode()])
    | st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass"))
)


@settings(max_examples=200, deadline=None)
@given(
    base=st.booleans(),
    extra=st.dictionaries(_name, _value, max_size=14),
)
def test_arbitrary_entries_raise_only_bad_entry(base: bool, extra: dict[bytes, bytes]) -> None:
    entry = {**fields(), **extra} if base else extra
    try:
        s = state_from_fields(entry)
    except BadEntry as e:
        assert e.reason in {
            "foreign",
            "missing_field",
            "bad_number",
            "too_large",
            "bad_status",
            "bad_encoding",
            "bad_id",
            "bad_label",
        }
        return
    # Whatever is accepted can be sent to a browser.
    assert s.status in STATUSES
    assert 0 <= s.total <= MAX_COUNT
    check_frame(progress_frame(s, rate=None, eta_seconds=None, now_ms=T0))


# -- client frames ---------------------------------------------------------------------------------


def test_client_auth() -> None:
    frame = parse_client_frame('{"type":"auth","token":"abc.def.ghi"}')
    assert isinstance(frame, ClientAuth)
    assert frame.token == "abc.def.ghi"
    frame = parse_client_frame(b'{"type":"auth","token":"t","action":"ping"}')
    assert isinstance(frame, ClientAuth)
    assert frame.token == "t"


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"auth"}',
        '{"type":"auth","token":""}',
        '{"type":"auth","token":null}',
        '{"type":"auth","token":42}',
        '{"type":"auth","token":["x"]}',
    ],
)
def test_client_auth_without_token(text: str) -> None:
    with pytest.raises(BadClientFrame):
        parse_client_frame(text)


def test_client_ping_pong() -> None:
    assert parse_client_frame('{"action":"ping"}') is CLIENT_PING
    assert parse_client_frame(b'{"action":"pong"}') is CLIENT_PONG
    assert parse_client_frame('{"action":"ping","extra":1}') is CLIENT_PING


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"action":"subscribe","batch_id":"b1"}',
        '{"action":"PING"}',
        '{"action":null}',
        '{"type":"hello"}',
        '{"type":"auth2","token":"x"}',
    ],
)
def test_client_other_objects_are_ignored(text: str) -> None:
    assert parse_client_frame(text) is CLIENT_OTHER


@pytest.mark.parametrize("data", ["", "not json", "{", "{'a':1}", b"\xff\xfe", '{"a":1} x'])
def test_client_not_json(data: str | bytes) -> None:
    with pytest.raises(BadClientFrame, match="not valid JSON"):
        parse_client_frame(data)


@pytest.mark.parametrize("data", ["[]", '["auth"]', '"ping"', "42", "null", "true"])
def test_client_not_an_object(data: str) -> None:
    with pytest.raises(BadClientFrame, match="not a JSON object"):
        parse_client_frame(data)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_client_frames_raise_only_bad_client_frame(data: bytes | str) -> None:
    with contextlib.suppress(BadClientFrame):
        parse_client_frame(data)


def test_deeply_nested_client_frame_is_a_format_error() -> None:
    with pytest.raises(BadClientFrame):
        parse_client_frame("[" * 5000 + "]" * 5000)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, 70_000])
def test_ws_text_frame_header(size: int) -> None:
    """What websockets itself writes for a server text frame (no mask, FIN, opcode 1)."""
    from websockets.frames import Frame, Opcode  # noqa: PLC0415

    payload = b"x" * size
    assert ws_text(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


def _outcome(parse: Any, arg: Any) -> object:
    try:
        return parse(arg)
    except BadEntry as e:
        return ("rejected", e.reason)


@given(
    name=st.sampled_from([k.decode() for k in fields()]),
    value=st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"", b"-1", b"1.5", b"99999999999999999", b"\xff\xfe", b"completed"]),
        st.text(min_size=100, max_size=300).map(str.encode),
    ),
    with_label=st.booleans(),
)
def test_flat_entry_in_script_order_reads_like_the_dict(
    name: str, value: bytes, with_label: bool
) -> None:
    """The positional fast path (emit script order) accepts and rejects exactly like the dict
    path, with the same reasons."""
    f = fields(**{name: value})
    if not with_label and name != "label":
        del f[b"label"]
    flat = [x for pair in f.items() for x in pair]
    assert _outcome(state_from_flat, flat) == _outcome(state_from_fields, f)
