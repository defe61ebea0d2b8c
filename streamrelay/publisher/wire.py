"""Wire protocol v1 framing, as spoken by a publisher.

A binary WebSocket message is one media unit::

    byte 0      flags: 0x01 KEY, 0x02 CONFIG (exclusive; every other bit 0)
    bytes 1-8   capture time, microseconds since the Unix epoch, unsigned big-endian
    bytes 9-    payload (for H.264: one Annex-B access unit, or SPS+PPS for CONFIG)

A text message is a JSON object with a ``type`` member: the publisher sends ``meta``;
the relay sends ``viewers`` and ``keyframe-request``.

The constants are the relay's own (:mod:`streamrelay.wire`); this module adds what a
publisher needs: checked packing, parsing into payload form, control messages.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from streamrelay.wire import (
    FLAG_CONFIG,
    FLAG_KEY,
    HEADER_SIZE,
    MAX_META_BYTES,
    SUBPROTOCOL,
    MediaFlags,
)

__all__ = ["FLAG_CONFIG", "FLAG_KEY", "HEADER_SIZE", "MAX_META_BYTES", "SUBPROTOCOL"]

_KNOWN_FLAGS: Final = FLAG_KEY | FLAG_CONFIG
MAX_TIMESTAMP_US: Final = 2**64 - 1

_HEADER = struct.Struct(">BQ")


class WireFormatError(ValueError):
    """A message does not follow wire protocol v1."""


def check_flags(flags: int) -> None:
    """Raise WireFormatError unless ``flags`` is 0, KEY or CONFIG."""
    if flags & ~_KNOWN_FLAGS & 0xFF or not 0 <= flags <= 0xFF:
        raise WireFormatError(f"reserved flag bits set: 0x{flags:02x}")
    if flags & FLAG_KEY and flags & FLAG_CONFIG:
        raise WireFormatError("KEY and CONFIG are exclusive")


def pack_header(flags: int, timestamp_us: int) -> bytes:
    """Return the 9-byte v1 header for a media message."""
    check_flags(flags)
    if not 0 <= timestamp_us <= MAX_TIMESTAMP_US:
        raise WireFormatError(f"timestamp out of range: {timestamp_us}")
    return _HEADER.pack(flags, timestamp_us)


def pack_media_message(flags: int, timestamp_us: int, payload: bytes) -> bytes:
    """Return a complete binary message: header followed by ``payload``."""
    return pack_header(flags, timestamp_us) + payload


@dataclass(frozen=True, slots=True)
class MediaMessage(MediaFlags):
    """One binary media message: flags, capture time and payload."""

    flags: int
    timestamp_us: int
    payload: bytes

    def pack(self) -> bytes:
        """Return the message as it goes on the wire."""
        return pack_media_message(self.flags, self.timestamp_us, self.payload)


def parse_media_message(data: bytes) -> MediaMessage:
    """Parse a binary v1 message, raising WireFormatError when it is malformed."""
    if len(data) < HEADER_SIZE:
        raise WireFormatError(f"message shorter than the {HEADER_SIZE}-byte header")
    flags, timestamp_us = _HEADER.unpack_from(data)
    check_flags(flags)
    return MediaMessage(flags, timestamp_us, bytes(data[HEADER_SIZE:]))


def now_us(clock_ns: Callable[[], int] = time.time_ns) -> int:
    """Return the wall-clock time in microseconds since the Unix epoch."""
    return clock_ns() // 1000


def meta_message(codec: str, width: int, height: int, fps: float, **extra: Any) -> dict[str, Any]:
    """Build a ``meta`` text message body (``extra`` members are passed through)."""
    fps_value: float | int = int(fps) if float(fps).is_integer() else round(float(fps), 3)
    return {
        "type": "meta",
        "codec": codec,
        "width": width,
        "height": height,
        "fps": fps_value,
        **extra,
    }


def encode_control(message: Mapping[str, Any]) -> bytes:
    """Serialise a text (control) message as compact UTF-8 JSON."""
    if "type" not in message:
        raise WireFormatError("a control message needs a 'type' member")
    return json.dumps(dict(message), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_control(payload: bytes | str) -> dict[str, Any]:
    """Parse a text message into a dict, raising WireFormatError if it is not a JSON object."""
    try:
        decoded = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as error:
        raise WireFormatError(f"text message is not JSON: {error}") from None
    if not isinstance(decoded, dict):
        raise WireFormatError("text message is not a JSON object")
    return decoded
