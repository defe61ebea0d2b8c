"""WebSocket frames (RFC 6455) written and parsed by hand, so that a test can send what
no client library would (wrong lengths, unmasked frames, reserved bits, half frames)
and read exactly what the relay wrote."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# Clients must mask; a fixed key keeps the bytes of a test reproducible.
MASK = b"\x37\xfa\x21\x3d"

_KINDS = {OP_TEXT: "text", OP_BINARY: "binary", OP_CLOSE: "close", OP_PING: "ping", OP_PONG: "pong"}


def mask_payload(payload: bytes, mask: bytes = MASK, offset: int = 0) -> bytes:
    """XOR ``payload`` with the mask key, starting ``offset`` bytes into the payload
    (masking and unmasking are the same operation)."""
    if not payload:
        return b""
    key = (mask * 2)[offset % 4 : offset % 4 + 4]
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def frame_header(
    opcode: int,
    length: int,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    mask: bytes = MASK,
) -> bytes:
    """The header of one frame claiming ``length`` payload bytes (any value up to
    2^63-1, whatever follows), with the mask key when ``masked``."""
    first = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0xF)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    return header + (mask if masked else b"")


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    mask: bytes = MASK,
    claimed_length: int | None = None,
) -> bytes:
    """One client-to-server frame (masked unless ``masked=False``). ``claimed_length``
    writes a length field that differs from the payload actually appended."""
    length = len(payload) if claimed_length is None else claimed_length
    header = frame_header(opcode, length, fin=fin, rsv=rsv, masked=masked, mask=mask)
    return header + (mask_payload(payload, mask) if masked else payload)


def binary_frame(payload: bytes) -> bytes:
    """A whole binary message in one client frame."""
    return client_frame(OP_BINARY, payload)


def text_frame(value: str | bytes | dict[str, Any]) -> bytes:
    """A whole text message in one client frame; a dict is sent as JSON."""
    if isinstance(value, dict):
        value = json.dumps(value)
    if isinstance(value, str):
        value = value.encode("utf-8")
    return client_frame(OP_TEXT, value)


def close_frame(code: int | None = 1000, reason: bytes = b"", *, masked: bool = True) -> bytes:
    """A close frame with ``code`` (no payload at all when ``code`` is None)."""
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return client_frame(OP_CLOSE, payload, masked=masked)


@dataclass
class Frame:
    """One frame as read from the wire (payload unmasked)."""

    opcode: int
    payload: bytes
    fin: bool = True
    masked: bool = False

    @property
    def close_code(self) -> int | None:
        """The status code of a close frame (None when it carries none)."""
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])

    @property
    def close_reason(self) -> str:
        """The reason of a close frame."""
        return self.payload[2:].decode("utf-8", "replace")


class FrameParser:
    """Incremental frame parser; :meth:`feed` returns the frames now complete.

    ``expect_masked``: False for what a server writes (a masked frame fails the test),
    True for what a client writes, None to accept both."""

    def __init__(self, expect_masked: bool | None = False) -> None:
        self._buffer = bytearray()
        self._expect_masked = expect_masked

    @property
    def pending(self) -> bytes:
        """Bytes received that do not make a complete frame yet."""
        return bytes(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every frame now complete."""
        self._buffer += data
        frames: list[Frame] = []
        while (frame := self._next()) is not None:
            frames.append(frame)
        return frames

    def _next(self) -> Frame | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        masked = bool(second & 0x80)
        if self._expect_masked is not None:
            side = "client" if self._expect_masked else "server"
            assert masked == self._expect_masked, f"a {side} frame with the wrong mask bit"
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            length = struct.unpack_from("!H", buffer, 2)[0]
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            length = struct.unpack_from("!Q", buffer, 2)[0]
            offset = 10
        mask = b""
        if masked:
            if len(buffer) < offset + 4:
                return None
            mask = bytes(buffer[offset : offset + 4])
            offset += 4
        if len(buffer) < offset + length:
            return None
        payload = bytes(buffer[offset : offset + length])
        del buffer[: offset + length]
        if masked:
            payload = mask_payload(payload, mask)
        return Frame(first & 0x0F, payload, fin=bool(first & 0x80), masked=masked)


def parse_frames(data: bytes, expect_masked: bool | None = False) -> tuple[list[Frame], bytes]:
    """Split bytes into frames; return them and the incomplete tail."""
    parser = FrameParser(expect_masked)
    frames = parser.feed(data)
    return frames, parser.pending


@dataclass
class Message:
    """One whole message: ``kind`` is ``text``, ``binary``, ``close``, ``ping`` or
    ``pong``."""

    kind: str
    payload: bytes

    @property
    def json(self) -> Any:
        """The text message decoded as JSON."""
        assert self.kind == "text", self
        return json.loads(self.payload)

    @property
    def close_code(self) -> int | None:
        """The status code of a close message."""
        assert self.kind == "close", self
        return Frame(OP_CLOSE, self.payload).close_code


def assemble(frames: list[Frame]) -> list[Message]:
    """Join fragmented data frames into messages (control frames stand alone)."""
    messages: list[Message] = []
    pending: tuple[int, list[bytes]] | None = None
    for frame in frames:
        if frame.opcode >= 8:
            messages.append(Message(_KINDS[frame.opcode], frame.payload))
            continue
        if frame.opcode != OP_CONTINUATION:
            assert pending is None, "new data message inside a fragmented one"
            pending = (frame.opcode, [])
        assert pending is not None, "continuation frame outside a message"
        pending[1].append(frame.payload)
        if frame.fin:
            messages.append(Message(_KINDS[pending[0]], b"".join(pending[1])))
            pending = None
    return messages
