"""Wire protocol v1 parsing (docs/protocol.md) and stream names, with no I/O."""

from __future__ import annotations

import pytest

from streamrelay import wire
from streamrelay.names import is_valid_stream_name
from streamrelay.wire import (
    FLAG_CONFIG,
    FLAG_KEY,
    WireError,
    encode_media,
    encode_text,
    parse_media,
    parse_text,
)

# -- binary (media) messages ---------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 8])
def test_media_shorter_than_header_is_refused(size: int) -> None:
    """A binary message shorter than 9 bytes breaks v1 (the publisher gets 1007)."""
    with pytest.raises(WireError, match="shorter"):
        parse_media(b"\x01" * size)


def test_media_with_key_and_config_is_refused() -> None:
    """KEY and CONFIG are exclusive."""
    with pytest.raises(WireError, match="exclusive"):
        parse_media(bytes([FLAG_KEY | FLAG_CONFIG]) + bytes(8) + b"x")


@pytest.mark.parametrize("flags", [0x08, 0x10, 0x20, 0x80, 0x81, 0x42, 0xFC])
def test_media_with_reserved_bits_is_refused(flags: int) -> None:
    """Flag bits other than KEY, CONFIG and AUDIO must be 0."""
    with pytest.raises(WireError, match="reserved"):
        parse_media(bytes([flags]) + bytes(8) + b"payload")


@pytest.mark.parametrize(
    ("flags", "is_key", "is_config"),
    [(0, False, False), (FLAG_KEY, True, False), (FLAG_CONFIG, False, True)],
)
def test_media_parses_header_and_keeps_bytes(flags: int, is_key: bool, is_config: bool) -> None:
    """A valid message keeps its flags, its big-endian microsecond capture time and its
    exact bytes (the viewer gets them byte for byte)."""
    capture = 1_700_000_000_123_456
    data = encode_media(flags, capture, b"\x00\xffpayload")
    message = parse_media(data)
    assert message.flags == flags
    assert message.is_key is is_key
    assert message.is_config is is_config
    assert message.capture_time_us == capture
    assert message.data == data
    assert message.size == len(data) == 9 + 9
    assert data[1:9] == capture.to_bytes(8, "big")


def test_media_header_only_is_valid() -> None:
    """Exactly 9 bytes (an empty payload) is a valid message."""
    assert parse_media(bytes(9)).size == 9


def test_media_accepts_bytearray_and_memoryview_as_bytes() -> None:
    """Whatever buffer type arrives, the kept data is immutable bytes."""
    raw = encode_media(FLAG_KEY, 5, b"abc")
    for buffer in (bytearray(raw), memoryview(raw)):
        message = parse_media(buffer)  # type: ignore[arg-type]
        assert message.data == raw
        assert type(message.data) is bytes


def test_largest_capture_time_round_trips() -> None:
    """The capture time is unsigned 64-bit."""
    assert parse_media(encode_media(0, 2**64 - 1, b"")).capture_time_us == 2**64 - 1


# -- text messages -----------------------------------------------------------------------


def test_text_object_parses() -> None:
    """A JSON object is a valid text message."""
    assert parse_text(b'{"type": "meta", "codec": "h264", "width": 1280}') == {
        "type": "meta",
        "codec": "h264",
        "width": 1280,
    }


@pytest.mark.parametrize("payload", [b"", b"not json", b"{", b"{'a': 1}", b'{"a":1} x'])
def test_text_that_is_not_json_is_refused(payload: bytes) -> None:
    """Text that is not JSON breaks v1 (1007)."""
    with pytest.raises(WireError, match="not JSON"):
        parse_text(payload)


@pytest.mark.parametrize("payload", [b"[]", b"[1]", b"1", b'"meta"', b"null", b"true"])
def test_text_that_is_not_an_object_is_refused(payload: bytes) -> None:
    """Only a JSON object is a message."""
    with pytest.raises(WireError, match="not a JSON object"):
        parse_text(payload)


@pytest.mark.parametrize("payload", [b"\xff", b'{"a": "\xc3"}', b'{"a": "\xed\xa0\x80"}'])
def test_text_with_bad_utf8_is_refused(payload: bytes) -> None:
    """Bad UTF-8 is a WireError, never a UnicodeDecodeError."""
    with pytest.raises(WireError):
        parse_text(payload)


@pytest.mark.parametrize("depth", [3000, 60000])
def test_deeply_nested_json_is_a_wire_error(depth: int) -> None:
    """Deeply nested JSON (a 4 KiB viewer message can nest 4000 levels) is refused with
    WireError like any other bad text, not with an exception the protocol does not expect
    (which ends in 1011 and a logged traceback)."""
    with pytest.raises(WireError):
        parse_text(b'{"a":' + b"[" * depth + b"]" * depth + b"}")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize(
    "template",
    [
        '{"type":"meta","a":%s}',
        '{"type":"meta","a":[1,%s]}',
        '{"type":"meta","a":{"b":{"c":[%s]}}}',
        '{"type":"keyframe-request","n":%s}',
        '{"type":"meta","a":%s ,"b":1}',
    ],
)
def test_text_with_nan_or_infinity_is_refused(template: str, constant: str) -> None:
    """NaN, Infinity and -Infinity are Python's extensions, not JSON (browsers'
    JSON.parse refuses them): at any depth they break v1 (the publisher gets 1007)."""
    with pytest.raises(WireError, match="not standard JSON") as caught:
        parse_text((template % constant).encode())
    assert constant in str(caught.value)


@pytest.mark.parametrize(
    "payload",
    [b'{"a":"NaN"}', b'{"NaN":1}', b'{"a":1e308}', b'{"a":-0.0}', b'{"a":"Infinity"}'],
)
def test_nan_lookalikes_that_are_json_still_parse(payload: bytes) -> None:
    """Strings spelling NaN and ordinary numbers are standard JSON and still parse."""
    assert isinstance(parse_text(payload), dict)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_encode_text_refuses_nan_and_infinity(value: float) -> None:
    """The relay never sends text a browser cannot parse: NaN and infinities raise."""
    with pytest.raises(WireError, match="standard JSON"):
        encode_text({"type": "meta", "fps": value})
    with pytest.raises(WireError):
        encode_text({"type": "meta", "nested": [{"x": value}]})


def test_encode_text_is_compact_utf8() -> None:
    """Server text messages are compact JSON in UTF-8 and parse back."""
    raw = encode_text({"type": "status", "state": "live", "name": "café"})
    assert raw == '{"type":"status","state":"live","name":"café"}'.encode()
    assert parse_text(raw)["name"] == "café"


def test_close_codes_match_the_protocol_document() -> None:
    """The close codes are those of docs/protocol.md."""
    assert (
        wire.CLOSE_GOING_AWAY,
        wire.CLOSE_UNSUPPORTED_DATA,
        wire.CLOSE_INVALID_PAYLOAD,
        wire.CLOSE_POLICY_VIOLATION,
        wire.CLOSE_MESSAGE_TOO_BIG,
        wire.CLOSE_PUBLISHER_REPLACED,
    ) == (1001, 1003, 1007, 1008, 1009, 4409)
    assert wire.SUBPROTOCOL == "streamrelay.v1"


# -- stream names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a", "Z", "0", "cam1", "my.stream", "my-stream", "my_stream", "a" * 64, "0._-",
        "A" + "_" * 63,
    ],
)
def test_valid_stream_names(name: str) -> None:
    """``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``: up to 64 characters."""
    assert is_valid_stream_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 65,
        ".hidden",
        "..",
        "-a",
        "_a",
        "a/b",
        "a\\b",
        "a b",
        "a\n",
        "a\x00",
        "caf\u00e9",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: a digit, but not [0-9]
        "a%2Fb",
        "a?b",
        "a:b",
    ],
)
def test_invalid_stream_names(name: str) -> None:
    """Leading dot/dash/underscore, separators, unicode and 65+ characters are refused."""
    assert not is_valid_stream_name(name)
