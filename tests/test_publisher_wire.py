"""Wire protocol v1 framing as the publisher writes it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrelay.publisher.wire import (
    FLAG_CONFIG,
    FLAG_KEY,
    HEADER_SIZE,
    MAX_TIMESTAMP_US,
    MediaMessage,
    WireFormatError,
    encode_control,
    meta_message,
    now_us,
    pack_header,
    pack_media_message,
    parse_control,
    parse_media_message,
)


def test_header_layout_is_flags_then_big_endian_microseconds() -> None:
    """The header is one flags byte, then the capture time as 8 unsigned big-endian bytes."""
    header = pack_header(FLAG_KEY, 0x0102030405060708)
    assert header == bytes([0x01, 1, 2, 3, 4, 5, 6, 7, 8])
    assert len(header) == HEADER_SIZE == 9
    assert pack_header(FLAG_CONFIG, 0)[0] == 0x02
    assert pack_header(0, MAX_TIMESTAMP_US) == b"\x00" + b"\xff" * 8


@given(
    flags=st.sampled_from([0, FLAG_KEY, FLAG_CONFIG]),
    timestamp_us=st.integers(min_value=0, max_value=MAX_TIMESTAMP_US),
    payload=st.binary(max_size=256),
)
def test_pack_and_parse_round_trip(flags: int, timestamp_us: int, payload: bytes) -> None:
    """Any valid message parses back to the same flags, timestamp and payload."""
    packed = pack_media_message(flags, timestamp_us, payload)
    assert packed[HEADER_SIZE:] == payload
    message = parse_media_message(packed)
    assert message == MediaMessage(flags, timestamp_us, payload)
    assert message.pack() == packed
    assert message.is_key == (flags == FLAG_KEY)
    assert message.is_config == (flags == FLAG_CONFIG)


@pytest.mark.parametrize("flags", [FLAG_KEY | FLAG_CONFIG, 0x04, 0x80, 0xFF, -1, 0x100])
def test_invalid_flags_are_refused(flags: int) -> None:
    """KEY together with CONFIG, or any reserved bit, is refused when packing and parsing."""
    with pytest.raises(WireFormatError):
        pack_header(flags, 1)
    if 0 <= flags <= 0xFF:
        with pytest.raises(WireFormatError):
            parse_media_message(bytes([flags]) + bytes(8) + b"payload")


def test_short_messages_and_bad_timestamps_are_refused() -> None:
    """A message shorter than the header, or a timestamp outside 64 unsigned bits, is refused."""
    with pytest.raises(WireFormatError):
        parse_media_message(b"\x01" + bytes(7))
    with pytest.raises(WireFormatError):
        pack_header(0, -1)
    with pytest.raises(WireFormatError):
        pack_header(0, MAX_TIMESTAMP_US + 1)
    assert parse_media_message(bytes(9)).payload == b""


def test_now_us_is_wall_clock_microseconds() -> None:
    """now_us() converts the wall clock's nanoseconds to microseconds."""
    assert now_us(lambda: 1_700_000_000_123_456_789) == 1_700_000_000_123_456
    assert abs(now_us() - 1_700_000_000_000_000) < 10**17  # plausibly microseconds


def test_meta_and_control_messages() -> None:
    """meta carries codec, size and fps; control messages are compact JSON objects."""
    meta = meta_message("avc1.42C01F", 1280, 720, 30.0, source="testsrc")
    assert meta == {
        "type": "meta",
        "codec": "avc1.42C01F",
        "width": 1280,
        "height": 720,
        "fps": 30,
        "source": "testsrc",
    }
    assert meta_message("avc1.42C01F", 640, 480, 30000 / 1001)["fps"] == 29.97
    encoded = encode_control(meta)
    assert b" " not in encoded
    assert json.loads(encoded) == meta
    assert parse_control(b'{"type":"viewers","count":2}') == {"type": "viewers", "count": 2}
    for bad in (b"[1, 2]", b"not json", b'"text"', b"\xff"):
        with pytest.raises(WireFormatError):
            parse_control(bad)
    with pytest.raises(WireFormatError):
        encode_control({"count": 1})
