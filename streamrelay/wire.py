"""The streamrelay wire format, version 1: the one codec (docs/protocol.md is the contract).

A binary WebSocket message is one media unit::

    byte 0      flags: 0x01 KEY, 0x02 CONFIG, 0x04 AUDIO (exclusive; every other bit 0)
    bytes 1-8   capture time, microseconds since the Unix epoch, unsigned big-endian
    bytes 9-    payload (for H.264: one Annex-B access unit, or SPS+PPS for CONFIG;
                for AUDIO: one Opus packet)

A text message is a JSON object with a ``type`` member.  The relay, the publisher, the
tests and relay-to-relay clients all parse and build messages here; this module does no
I/O.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

SUBPROTOCOL: Final = "streamrelay.v1"

FLAG_KEY: Final = 0x01
FLAG_CONFIG: Final = 0x02
# A v1 extension (docs/protocol.md, "Audio"): relayed only to viewers that ask for it.
FLAG_AUDIO: Final = 0x04
_KNOWN_FLAGS: Final = FLAG_KEY | FLAG_CONFIG | FLAG_AUDIO

HEADER_SIZE: Final = 9
MAX_CAPTURE_TIME_US: Final = 2**64 - 1
_HEADER = struct.Struct("!BQ")

MAX_META_BYTES: Final = 64 * 1024
MAX_VIEWER_MESSAGE_BYTES: Final = 4 * 1024

# WebSocket close codes used by the relay.
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_INVALID_PAYLOAD: Final = 1007
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TRY_AGAIN_LATER: Final = 1013
CLOSE_PUBLISHER_REPLACED: Final = 4409


class WireError(ValueError):
    """A message that breaks wire protocol v1; ``str()`` is the close reason."""


class MediaFlags:
    """What the flags byte says; shared by :class:`MediaMessage` and :class:`MediaInfo`."""

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

    @property
    def is_audio(self) -> bool:
        """True when this message is one audio packet (never KEY or CONFIG)."""
        return bool(self.flags & FLAG_AUDIO)


@dataclass(frozen=True, slots=True)
class MediaInfo(MediaFlags):
    """A media message's description without its bytes.

    Caches and queues keep this beside the prepared WebSocket frame, which holds the
    bytes: one copy of each message, not two.
    """

    flags: int
    capture_time_us: int
    size: int


@dataclass(frozen=True, slots=True)
class MediaMessage(MediaFlags):
    """One media unit; ``data`` is the whole message as it travels, header included."""

    flags: int
    capture_time_us: int
    data: bytes

    @classmethod
    def build(cls, flags: int, capture_time_us: int, payload: bytes) -> MediaMessage:
        """A checked message from its parts (raises :class:`WireError`)."""
        return cls(flags, capture_time_us, encode_media(flags, capture_time_us, payload))

    @property
    def payload(self) -> bytes:
        """The bytes after the header (a copy: the relay itself never needs it)."""
        return self.data[HEADER_SIZE:]

    @property
    def size(self) -> int:
        """The size of the whole message in bytes."""
        return len(self.data)

    def info(self) -> MediaInfo:
        """This message's description, for holders that keep the bytes elsewhere."""
        return MediaInfo(self.flags, self.capture_time_us, len(self.data))


def check_flags(flags: int) -> None:
    """Raise :class:`WireError` unless ``flags`` is 0, KEY, CONFIG or AUDIO."""
    if not 0 <= flags <= 0xFF or flags & ~_KNOWN_FLAGS:
        raise WireError("reserved flag bits set")
    if flags & FLAG_KEY and flags & FLAG_CONFIG:
        raise WireError("KEY and CONFIG flags are exclusive")
    if flags & FLAG_AUDIO and flags != FLAG_AUDIO:
        raise WireError("the AUDIO flag is exclusive with KEY and CONFIG")


def encode_header(flags: int, capture_time_us: int) -> bytes:
    """The checked 9-byte header of a media message."""
    check_flags(flags)
    if not 0 <= capture_time_us <= MAX_CAPTURE_TIME_US:
        raise WireError(f"capture time out of range: {capture_time_us}")
    return _HEADER.pack(flags, capture_time_us)


def encode_media(flags: int, capture_time_us: int, payload: bytes) -> bytes:
    """A complete binary message: the checked header, then ``payload``."""
    return encode_header(flags, capture_time_us) + payload


def parse_media(data: bytes) -> MediaMessage:
    """Parse a binary message, raising :class:`WireError` when it breaks v1."""
    if len(data) < HEADER_SIZE:
        raise WireError(f"media message shorter than {HEADER_SIZE} bytes")
    flags, capture_time_us = _HEADER.unpack_from(data)
    check_flags(flags)
    return MediaMessage(flags, capture_time_us, bytes(data))


def _refuse_constant(name: str) -> Any:
    # json.loads calls this for NaN, Infinity and -Infinity: Python extensions that
    # browsers' JSON.parse refuses, so a player would drop the message silently.
    raise WireError(f"text message is not standard JSON ({name})")


def parse_text(payload: bytes | str) -> dict[str, Any]:
    """Parse a text message, raising :class:`WireError` unless it is a JSON object in
    standard JSON (RFC 8259: no ``NaN``, ``Infinity`` or ``-Infinity``, at any depth)."""
    try:
        text = payload if isinstance(payload, str) else payload.decode("utf-8")
        value = json.loads(text, parse_constant=_refuse_constant)
    except WireError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        # RecursionError: deeply nested arrays fit in a few KiB.
        raise WireError("text message is not JSON") from error
    if not isinstance(value, dict):
        raise WireError("text message is not a JSON object")
    return value


def encode_text(message: Mapping[str, Any]) -> bytes:
    """Encode a JSON object as a compact UTF-8 text message; a value standard JSON
    cannot carry (NaN, an infinity) raises :class:`WireError` instead of being sent."""
    try:
        text = json.dumps(
            dict(message), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except ValueError as error:
        raise WireError(f"not encodable as standard JSON: {error}") from error
    return text.encode("utf-8")


def meta_message(codec: str, width: int, height: int, fps: float, **extra: Any) -> dict[str, Any]:
    """A publisher's ``meta`` text message (``extra`` members are passed through)."""
    fps_value: float | int = int(fps) if float(fps).is_integer() else round(float(fps), 3)
    return {
        "type": "meta",
        "codec": codec,
        "width": width,
        "height": height,
        "fps": fps_value,
        **extra,
    }


def now_us(clock_ns: Callable[[], int] = time.time_ns) -> int:
    """The wall-clock time in microseconds since the Unix epoch: a capture time."""
    return clock_ns() // 1000


# -- thumbnails, clock exchange and viewer reports (v1 extensions, docs/protocol.md) ------

# The decoded JPEG of a ``thumbnail`` message; its text message is under MAX_META_BYTES
# anyway (base64 of this many bytes plus the JSON around it).
MAX_THUMBNAIL_BYTES: Final = 46 * 1024
JPEG_SOI: Final = b"\xff\xd8\xff"


def thumbnail_message(jpeg: bytes) -> dict[str, Any]:
    """A publisher's ``thumbnail`` text message: the JPEG, standard base64 with padding."""
    return {"type": "thumbnail", "jpeg": base64.b64encode(jpeg).decode("ascii")}


def time_answer(t0: float | int, server_us: int) -> dict[str, Any]:
    """The relay's answer to a viewer's ``time`` request: ``t0`` echoed, its clock added."""
    return {"type": "time", "t0": t0, "server_us": server_us}
