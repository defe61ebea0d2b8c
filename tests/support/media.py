"""Wire protocol v1 media messages, built from the documented format (``docs/protocol.md``:
a flags byte, the capture time in microseconds as a big-endian unsigned 64-bit integer,
then the payload), not with the relay's codec."""

from __future__ import annotations

import struct
import time

DELTA = 0x00
KEY = 0x01
CONFIG = 0x02
HEADER = struct.Struct("!BQ")
_SEQUENCE = struct.Struct("!Q")


def now_us() -> int:
    """Wall-clock microseconds since the Unix epoch (the v1 capture time)."""
    return time.time_ns() // 1000


def media(flags: int, payload: bytes = b"", capture_us: int | None = None) -> bytes:
    """A v1 binary message: flags, capture time (now unless given), payload."""
    return HEADER.pack(flags, now_us() if capture_us is None else capture_us) + payload


def flags_of(message: bytes) -> int:
    """The flags byte of a v1 binary message."""
    return message[0]


def capture_of(message: bytes) -> int:
    """The capture time (microseconds) of a v1 binary message."""
    return int(HEADER.unpack_from(message)[1])


def numbered_payload(index: int, size: int) -> bytes:
    """``size`` bytes that identify message ``index`` (so reorders and damage show)."""
    stamp = b"#%08d:" % index
    return (stamp * (size // len(stamp) + 1))[:size]


def media_message(sequence: int, flags: int = DELTA, size: int = 64) -> bytes:
    """A v1 message of ``size`` bytes carrying the sequence number first in its payload,
    then a filler derived from it (so any corruption or truncation is detectable)."""
    body = _SEQUENCE.pack(sequence)
    filler_length = max(0, size - HEADER.size - len(body))
    filler = bytes((sequence + index) & 0xFF for index in range(min(filler_length, 256)))
    if filler_length > 256:
        filler = (filler * (filler_length // 256 + 1))[:filler_length]
    return media(flags, body + filler)


def media_sequence(message: bytes) -> int:
    """The sequence number a :func:`media_message` carries."""
    return int(_SEQUENCE.unpack_from(message, HEADER.size)[0])


def media_is_intact(message: bytes, expected_size: int | None = None) -> bool:
    """True when ``message`` is exactly what :func:`media_message` built for its
    sequence (the capture time aside)."""
    if len(message) < HEADER.size + _SEQUENCE.size:
        return False
    if expected_size is not None and len(message) != expected_size:
        return False
    rebuilt = media_message(media_sequence(message), flags_of(message), len(message))
    return rebuilt[HEADER.size :] == message[HEADER.size :] and rebuilt[0] == message[0]


def flags_for(sequence: int, gop: int) -> int:
    """CONFIG first, a KEY every ``gop`` messages after it, deltas in between."""
    if sequence == 0:
        return CONFIG
    return KEY if (sequence - 1) % gop == 0 else DELTA
