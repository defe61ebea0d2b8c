"""AV1 helpers for the v1 AV1 profile: OBUs, the sequence header, the codec string, packaging.

The AV1 profile of wire protocol v1 (docs/protocol.md, "AV1 profile of v1"):

- every media payload is one temporal unit in the low-overhead bitstream format (OBUs
  with ``obu_has_size_field`` set, a temporal delimiter first when the encoder writes one),
  which is what WebCodecs expects of an AV1 chunk;
- a KEY is a temporal unit whose frame is a shown KEY_FRAME and which carries the sequence
  header OBU, so that a decoder can start at any KEY;
- CONFIG carries the sequence header OBU alone (header and size field included).  It is
  sent before the first KEY and whenever it changes; a decoder needs no ``description``
  (WebCodecs reads the sequence header in band);
- the ``meta`` codec string is ``av01.P.LLT.DD`` from the sequence header: seq_profile,
  seq_level_idx[0] (two digits), seq_tier[0] (``M``/``H``) and the bit depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, MediaMessage

OBU_SEQUENCE_HEADER: Final = 1
OBU_TEMPORAL_DELIMITER: Final = 2
OBU_FRAME_HEADER: Final = 3
OBU_FRAME: Final = 6

KEY_FRAME: Final = 0


class Av1Error(ValueError):
    """Malformed or unusable AV1 data."""


@dataclass(frozen=True, slots=True)
class Obu:
    """One OBU: its type and the whole OBU as it was (header and size included)."""

    type: int
    data: bytes
    payload: bytes


def _leb128(data: bytes, position: int) -> tuple[int, int]:
    value = 0
    for index in range(8):
        if position + index >= len(data):
            raise Av1Error("leb128 runs past the data")
        byte = data[position + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, position + index + 1
    raise Av1Error("leb128 longer than 8 bytes")


def split_obus(data: bytes) -> list[Obu]:
    """Split a low-overhead format temporal unit into its OBUs."""
    obus: list[Obu] = []
    position = 0
    while position < len(data):
        start = position
        header = data[position]
        if header & 0x80:
            raise Av1Error("OBU forbidden bit set")
        obu_type = (header >> 3) & 0xF
        position += 2 if header & 0x04 else 1
        if not header & 0x02:
            raise Av1Error("OBU without a size field (not the low-overhead format)")
        size, position = _leb128(data, position)
        if position + size > len(data):
            raise Av1Error("OBU runs past the data")
        obus.append(Obu(obu_type, data[start : position + size], data[position : position + size]))
        position += size
    return obus


class _Bits:
    """Reads bits most significant first (AV1 spec 4.10 f(n), uvlc)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    def f(self, count: int) -> int:
        value = 0
        for _ in range(count):
            byte_index, bit_index = divmod(self._position, 8)
            if byte_index >= len(self._data):
                raise Av1Error("AV1 header ends early")
            value = (value << 1) | ((self._data[byte_index] >> (7 - bit_index)) & 1)
            self._position += 1
        return value

    def uvlc(self) -> int:
        leading_zeros = 0
        while not self.f(1):
            leading_zeros += 1
            if leading_zeros >= 32:
                return (1 << 32) - 1
        return self.f(leading_zeros) + (1 << leading_zeros) - 1


@dataclass(frozen=True, slots=True)
class SequenceInfo:
    """The sequence header fields a codec string and a player care about."""

    profile: int
    level: int
    tier: int
    bit_depth: int
    monochrome: bool
    subsampling: tuple[int, int]
    max_width: int
    max_height: int

    @property
    def codec_string(self) -> str:
        """``av01.P.LLT.DD`` (AV1 codec ISO-BMFF binding, "Codecs Parameter String")."""
        tier = "H" if self.tier else "M"
        return f"av01.{self.profile}.{self.level:02d}{tier}.{self.bit_depth:02d}"


def parse_sequence_header(payload: bytes) -> SequenceInfo:
    """Parse a sequence_header_obu payload (AV1 spec 5.5) up to its colour config."""
    bits = _Bits(payload)
    profile = bits.f(3)
    bits.f(1)  # still_picture
    reduced = bits.f(1)
    tier = 0
    if reduced:
        level = bits.f(5)
    else:
        decoder_model_info = False
        buffer_delay_length = 0
        if bits.f(1):  # timing_info_present_flag
            bits.f(32)  # num_units_in_display_tick
            bits.f(32)  # time_scale
            if bits.f(1):  # equal_picture_interval
                bits.uvlc()
            decoder_model_info = bool(bits.f(1))
            if decoder_model_info:
                buffer_delay_length = bits.f(5) + 1
                bits.f(32)  # num_units_in_decoding_tick
                bits.f(5)  # buffer_removal_time_length_minus_1
                bits.f(5)  # frame_presentation_time_length_minus_1
        initial_display_delay = bits.f(1)
        level = -1
        for _ in range(bits.f(5) + 1):
            bits.f(12)  # operating_point_idc
            op_level = bits.f(5)
            op_tier = bits.f(1) if op_level > 7 else 0
            if level < 0:  # operating point 0 is what the codec string names
                level, tier = op_level, op_tier
            if decoder_model_info and bits.f(1):
                bits.f(buffer_delay_length)  # decoder_buffer_delay
                bits.f(buffer_delay_length)  # encoder_buffer_delay
                bits.f(1)  # low_delay_mode_flag
            if initial_display_delay and bits.f(1):
                bits.f(4)
    width_bits = bits.f(4) + 1
    height_bits = bits.f(4) + 1
    max_width = bits.f(width_bits) + 1
    max_height = bits.f(height_bits) + 1
    if not reduced and bits.f(1):  # frame_id_numbers_present_flag
        bits.f(4)
        bits.f(3)
    bits.f(3)  # use_128x128_superblock, enable_filter_intra, enable_intra_edge_filter
    if not reduced:
        bits.f(4)  # interintra, masked compound, warped motion, dual filter
        order_hint = bits.f(1)
        if order_hint:
            bits.f(2)  # enable_jnt_comp, enable_ref_frame_mvs
        force_screen_content_tools = 2 if bits.f(1) else bits.f(1)
        if force_screen_content_tools and not bits.f(1):  # seq_choose_integer_mv
            bits.f(1)  # seq_force_integer_mv
        if order_hint:
            bits.f(3)
    bits.f(3)  # enable_superres, enable_cdef, enable_restoration
    high_bitdepth = bits.f(1)
    bit_depth = 8
    if profile == 2 and high_bitdepth:
        bit_depth = 12 if bits.f(1) else 10
    elif high_bitdepth:
        bit_depth = 10
    monochrome = False if profile == 1 else bool(bits.f(1))
    primaries = transfer = matrix = 2
    if bits.f(1):  # color_description_present_flag
        primaries, transfer, matrix = bits.f(8), bits.f(8), bits.f(8)
    if monochrome:
        subsampling = (1, 1)
    elif (primaries, transfer, matrix) == (1, 13, 0):
        subsampling = (0, 0)
    else:
        bits.f(1)  # color_range
        if profile == 0:
            subsampling = (1, 1)
        elif profile == 1:
            subsampling = (0, 0)
        elif bit_depth == 12:
            x = bits.f(1)
            subsampling = (x, bits.f(1) if x else 0)
        else:
            subsampling = (1, 0)
    return SequenceInfo(
        profile, level, tier, bit_depth, monochrome, subsampling, max_width, max_height
    )


def frame_is_shown_key(obus: Sequence[Obu], reduced_still_picture: bool = False) -> bool:
    """Whether the first frame (header) OBU of a temporal unit is a shown KEY_FRAME."""
    for obu in obus:
        if obu.type in (OBU_FRAME, OBU_FRAME_HEADER):
            if reduced_still_picture:
                return True
            bits = _Bits(obu.payload)
            if bits.f(1):  # show_existing_frame: not a new key frame here
                return False
            return bits.f(2) == KEY_FRAME and bool(bits.f(1))
    return False


class Av1Packager:
    """Turns AV1 temporal units from an encoder into v1 media messages.

    ``key`` comes from the encoder (PyAV's ``packet.is_keyframe``).  A KEY that lacks a
    sequence header OBU gets the last known one inserted (after the temporal delimiter),
    so that every KEY stands alone; before a KEY whose sequence header differs from the
    last one sent (the first one, always) comes a CONFIG carrying it.
    """

    def __init__(self) -> None:
        self._sequence_header: Obu | None = None
        self._sent: bytes | None = None

    @property
    def sequence_info(self) -> SequenceInfo | None:
        """The parsed current sequence header, once one has been seen."""
        header = self._sequence_header
        return None if header is None else parse_sequence_header(header.payload)

    @property
    def codec_string(self) -> str | None:
        """The codec string of the current sequence header, once one has been seen."""
        info = self.sequence_info
        return None if info is None else info.codec_string

    @property
    def config_payload(self) -> bytes | None:
        """The current CONFIG payload (the sequence header OBU), once one has been seen."""
        return None if self._sequence_header is None else self._sequence_header.data

    def package(self, data: bytes, key: bool, capture_time_us: int) -> list[MediaMessage]:
        """Return the v1 messages for one temporal unit (see the class docstring)."""
        obus = split_obus(data)
        headers = [obu for obu in obus if obu.type == OBU_SEQUENCE_HEADER]
        if headers:
            parse_sequence_header(headers[0].payload)  # refuse what the player could not use
            self._sequence_header = headers[0]
        if not key:
            if self._sequence_header is None:
                raise Av1Error("AV1 temporal unit before any sequence header")
            return [MediaMessage.build(0, capture_time_us, data)]
        header = self._sequence_header
        if header is None:
            raise Av1Error("AV1 key frame without a sequence header, and none known")
        if not frame_is_shown_key(obus):
            raise Av1Error("encoder flagged a temporal unit as key that is no shown KEY_FRAME")
        if not headers:
            delimiters = [obu.data for obu in obus if obu.type == OBU_TEMPORAL_DELIMITER]
            rest = [obu.data for obu in obus if obu.type != OBU_TEMPORAL_DELIMITER]
            data = b"".join([*delimiters, header.data, *rest])
        messages: list[MediaMessage] = []
        if header.data != self._sent:
            self._sent = header.data
            messages.append(MediaMessage.build(FLAG_CONFIG, capture_time_us, header.data))
        messages.append(MediaMessage.build(FLAG_KEY, capture_time_us, data))
        return messages
