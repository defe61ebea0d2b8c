"""The streamrelay wire format, version 1 (see docs/protocol.md for the contract).

A binary message is one media unit: a 9-byte header (flags, capture time) then an
opaque payload.  A text message is a JSON object.  This module only parses and builds;
it does no I/O.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

SUBPROTOCOL = "streamrelay.v1"

FLAG_KEY = 0x01
FLAG_CONFIG = 0x02
_KNOWN_FLAGS = FLAG_KEY | FLAG_CONFIG

HEADER_SIZE = 9
_HEADER = struct.Struct("!BQ")

MAX_META_BYTES = 64 * 1024
MAX_VIEWER_MESSAGE_BYTES = 4 * 1024

# WebSocket close codes used by the relay.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_PUBLISHER_REPLACED = 4409


class WireError(ValueError):
    """A message that breaks wire protocol v1; ``str()`` is the close reason."""


class MediaFlags:
    """What the flags byte says; shared by the relay's and the publisher's messages."""

    __slots__ = ()
    flags: int

    @property
    def is_key(self) -> bool:
        """True when decoding can start at this message."""
        return bool(self.flags & FLAG_KEY)

    @property
    def is_config(self) -> bool:
        """True when this message carries codec configuration rather than a frame."""
        return bool(self.flags & FLAG_CONFIG)


@dataclass(frozen=True, slots=True)
class MediaMessage(MediaFlags):
    """One media unit as the publisher sent it; ``data`` is the whole message, header included."""

    flags: int
    capture_time_us: int
    data: bytes
    length: int = -1

    def without_payload(self) -> MediaMessage:
        """The same message's description, without its bytes (they live in the
        prepared WebSocket frame): caches and queues hold one copy, not two."""
        return MediaMessage(self.flags, self.capture_time_us, b"", self.size)

    @property
    def size(self) -> int:
        """The size of the whole message in bytes."""
        return self.length if self.length >= 0 else len(self.data)


def parse_media(data: bytes) -> MediaMessage:
    """Parse a publisher's binary message, raising :class:`WireError` when it breaks v1."""
    if len(data) < HEADER_SIZE:
        raise WireError(f"media message shorter than {HEADER_SIZE} bytes")
    flags, capture_time_us = _HEADER.unpack_from(data)
    if flags & ~_KNOWN_FLAGS:
        raise WireError("reserved flag bits set")
    if flags & FLAG_KEY and flags & FLAG_CONFIG:
        raise WireError("KEY and CONFIG flags are exclusive")
    return MediaMessage(flags, capture_time_us, bytes(data))


def encode_media(flags: int, capture_time_us: int, payload: bytes) -> bytes:
    """Build a v1 binary message from its parts."""
    return _HEADER.pack(flags, capture_time_us) + payload


def parse_text(payload: bytes) -> dict[str, Any]:
    """Parse a text message, raising :class:`WireError` unless it is a JSON object."""
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        # RecursionError: deeply nested arrays fit in a few KiB.
        raise WireError("text message is not JSON") from error
    if not isinstance(value, dict):
        raise WireError("text message is not a JSON object")
    return value


def encode_text(message: dict[str, Any]) -> bytes:
    """Encode a JSON object as a compact UTF-8 text message."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
