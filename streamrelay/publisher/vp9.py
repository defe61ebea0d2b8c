"""VP9 helpers for the v1 VP9 profile: frame headers, the codec string, packaging.

The VP9 profile of wire protocol v1 (docs/protocol.md, "VP9 profile of v1"):

- every media payload is one VP9 frame as the encoder produced it (a superframe, when the
  encoder makes one, stays one message); no invisible frames are sent on their own;
- a KEY is a VP9 key frame (``frame_type`` 0, shown), from which a decoder can start;
- CONFIG carries the 8-byte body of a ``VPCodecConfigurationRecord`` (the ``vpcC`` box of
  ISO-BMFF, without its version/flags): profile, level, bit depth, chroma subsampling,
  range and colour fields.  It is sent before the first KEY and whenever it changes; a
  decoder needs none of it (WebCodecs takes no ``description`` for VP9);
- the ``meta`` codec string is ``vp09.PP.LL.DD`` from that record.

VP9 bitstreams carry no level: the level is the lowest of the VP9 level table (VP9
bitstream specification, Annex A) whose picture size and luma sample rate hold the
stream's size and frame rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Final

from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, MediaMessage

_SYNC_CODE: Final = b"\x49\x83\x42"
CS_RGB: Final = 7

# (level, max luma picture size, max luma sample rate per second), VP9 spec Annex A.
_LEVELS: Final = (
    (10, 36_864, 829_440),
    (11, 73_728, 2_764_800),
    (20, 122_880, 4_608_000),
    (21, 245_760, 9_216_000),
    (30, 552_960, 20_736_000),
    (31, 983_040, 36_864_000),
    (40, 2_228_224, 83_558_400),
    (41, 2_228_224, 160_432_128),
    (50, 8_912_896, 311_951_360),
    (51, 8_912_896, 588_251_136),
    (52, 8_912_896, 1_176_502_272),
    (60, 35_651_584, 1_176_502_272),
    (61, 35_651_584, 2_353_004_544),
    (62, 35_651_584, 4_706_009_088),
)

# VP9 color_space -> ISO/IEC 23091-2 (colour primaries, transfer, matrix) for vpcC;
# 2 is "unspecified".
_COLOUR: Final = {
    0: (2, 2, 2),  # CS_UNKNOWN
    1: (5, 6, 5),  # CS_BT_601 (625-line primaries, BT.601 matrix)
    2: (1, 1, 1),  # CS_BT_709
    3: (6, 6, 6),  # CS_SMPTE_170
    4: (7, 7, 7),  # CS_SMPTE_240
    5: (9, 14, 9),  # CS_BT_2020 (non-constant luminance)
    6: (2, 2, 2),  # CS_RESERVED
    7: (1, 13, 0),  # CS_RGB (sRGB, identity matrix)
}


class Vp9Error(ValueError):
    """Malformed or unusable VP9 data."""


class _Bits:
    """Reads bits most significant first."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    def read(self, count: int) -> int:
        value = 0
        for _ in range(count):
            byte_index, bit_index = divmod(self._position, 8)
            if byte_index >= len(self._data):
                raise Vp9Error("VP9 frame header ends early")
            value = (value << 1) | ((self._data[byte_index] >> (7 - bit_index)) & 1)
            self._position += 1
        return value


@dataclass(frozen=True, slots=True)
class Vp9FrameInfo:
    """What the uncompressed header of a VP9 frame says about it."""

    profile: int
    show_existing_frame: bool
    key: bool
    show_frame: bool
    # Known for key frames only (None otherwise).
    bit_depth: int | None = None
    color_space: int | None = None
    full_range: bool | None = None
    subsampling: tuple[int, int] | None = None
    width: int | None = None
    height: int | None = None


def split_superframe(data: bytes) -> list[bytes]:
    """The frames of a VP9 superframe, or ``[data]`` for a plain frame."""
    if not data:
        raise Vp9Error("empty VP9 frame")
    marker = data[-1]
    if marker & 0xE0 != 0xC0:
        return [data]
    size_bytes = ((marker >> 3) & 0x3) + 1
    count = (marker & 0x7) + 1
    index_size = 2 + size_bytes * count
    if len(data) < index_size or data[-index_size] != marker:
        return [data]  # a frame that merely ends in a marker-like byte
    sizes = []
    position = len(data) - index_size + 1
    for _ in range(count):
        sizes.append(int.from_bytes(data[position : position + size_bytes], "little"))
        position += size_bytes
    frames, offset = [], 0
    for size in sizes:
        if offset + size > len(data) - index_size:
            raise Vp9Error("VP9 superframe index runs past the data")
        frames.append(data[offset : offset + size])
        offset += size
    return frames


def parse_frame_header(frame: bytes) -> Vp9FrameInfo:
    """Parse the start of a VP9 uncompressed header (VP9 spec 6.2)."""
    bits = _Bits(frame)
    if bits.read(2) != 2:
        raise Vp9Error("no VP9 frame marker")
    profile = bits.read(1) | (bits.read(1) << 1)
    if profile == 3:
        bits.read(1)  # reserved_zero
    if bits.read(1):
        bits.read(3)  # frame_to_show_map_idx
        return Vp9FrameInfo(profile, True, False, True)
    key = bits.read(1) == 0
    show_frame = bool(bits.read(1))
    bits.read(1)  # error_resilient_mode
    if not key:
        return Vp9FrameInfo(profile, False, False, show_frame)
    if bytes(bits.read(8) for _ in range(3)) != _SYNC_CODE:
        raise Vp9Error("VP9 key frame without its sync code")
    bit_depth = 8
    if profile >= 2:
        bit_depth = 12 if bits.read(1) else 10
    color_space = bits.read(3)
    if color_space != CS_RGB:
        full_range = bool(bits.read(1))
        subsampling = (1, 1)
        if profile in (1, 3):
            subsampling = (bits.read(1), bits.read(1))
            bits.read(1)  # reserved_zero
    else:
        full_range = True
        subsampling = (0, 0)
        if profile in (1, 3):
            bits.read(1)
    width = bits.read(16) + 1
    height = bits.read(16) + 1
    return Vp9FrameInfo(
        profile,
        False,
        True,
        show_frame,
        bit_depth,
        color_space,
        full_range,
        subsampling,
        width,
        height,
    )


def vp9_level(width: int, height: int, fps: Fraction | float) -> int:
    """The lowest VP9 level (10 for 1, 31 for 3.1...) that holds this size and rate."""
    picture = width * height
    rate = picture * float(fps)
    for level, max_picture, max_rate in _LEVELS:
        if picture <= max_picture and rate <= max_rate:
            return level
    raise Vp9Error(f"{width}x{height} at {float(fps)} fps is beyond every VP9 level")


def configuration_record(info: Vp9FrameInfo, level: int) -> bytes:
    """The 8-byte ``VPCodecConfigurationRecord`` body for a key frame's header."""
    if not info.key or info.bit_depth is None or info.subsampling is None:
        raise Vp9Error("a configuration record needs a key frame header")
    chroma = {(1, 1): 1, (1, 0): 2, (0, 0): 3}.get(info.subsampling)
    if chroma is None:
        raise Vp9Error(f"VP9 subsampling {info.subsampling} has no vpcC value")
    primaries, transfer, matrix = _COLOUR[info.color_space or 0]
    packed = (info.bit_depth << 4) | (chroma << 1) | int(bool(info.full_range))
    return bytes((info.profile, level, packed, primaries, transfer, matrix, 0, 0))


def codec_string_from_record(record: bytes) -> str:
    """``vp09.PP.LL.DD`` from a configuration record body (see :func:`configuration_record`)."""
    if len(record) < 8:
        raise Vp9Error("VP9 configuration record too short")
    return f"vp09.{record[0]:02d}.{record[1]:02d}.{record[2] >> 4:02d}"


class Vp9Packager:
    """Turns VP9 frames (or superframes) from an encoder into v1 media messages.

    ``key`` comes from the encoder (PyAV's ``packet.is_keyframe``) and is checked against
    the frame header: a KEY must be a shown key frame.  Before a KEY whose configuration
    record differs from the last one sent (the first one, always) comes a CONFIG.
    """

    def __init__(self, width: int, height: int, fps: Fraction | float) -> None:
        self._level = vp9_level(width, height, fps)
        self._record: bytes | None = None
        self._record_sent: bytes | None = None

    @property
    def codec_string(self) -> str | None:
        """The codec string, once a key frame has been seen."""
        return None if self._record is None else codec_string_from_record(self._record)

    @property
    def config_payload(self) -> bytes | None:
        """The current CONFIG payload, once a key frame has been seen."""
        return self._record

    def package(self, data: bytes, key: bool, capture_time_us: int) -> list[MediaMessage]:
        """Return the v1 messages for one encoded VP9 packet (see the class docstring)."""
        frames = split_superframe(data)
        first = parse_frame_header(frames[0])
        if not key:
            if self._record is None:
                raise Vp9Error("VP9 inter frame before any key frame")
            return [MediaMessage.build(0, capture_time_us, data)]
        if not (first.key and first.show_frame):
            raise Vp9Error("encoder flagged a packet as key that is no shown VP9 key frame")
        self._record = configuration_record(first, self._level)
        messages: list[MediaMessage] = []
        if self._record != self._record_sent:
            self._record_sent = self._record
            messages.append(MediaMessage.build(FLAG_CONFIG, capture_time_us, self._record))
        messages.append(MediaMessage.build(FLAG_KEY, capture_time_us, data))
        return messages
