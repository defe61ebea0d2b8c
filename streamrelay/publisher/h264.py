"""H.264 helpers for the v1 H.264 profile: Annex-B NAL units, SPS parsing, packaging.

The H.264 profile of wire protocol v1:

- every payload is Annex-B (start-code delimited NAL units);
- CONFIG carries the SPS and PPS, and is sent before the first KEY and again whenever
  they change;
- every KEY is an IDR access unit that carries its own SPS and PPS in-band, so that a
  decoder can start from any KEY (WebCodecs decodes such chunks with no ``description``);
- the ``meta`` codec string is ``avc1.PPCCLL`` from the SPS profile, constraint and level
  bytes.

:class:`H264Packager` turns access units from any encoder into wire messages following
those rules; :func:`avcc_to_annexb` and :func:`avcc_config_to_parameter_sets` help when an
encoder produces MP4-style (length-prefixed) output instead (hand the parameter sets to
the packager as an access unit of their own, joined with :func:`join_annexb`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, MediaMessage

NAL_SLICE: Final = 1
NAL_IDR: Final = 5
NAL_SEI: Final = 6
NAL_SPS: Final = 7
NAL_PPS: Final = 8
NAL_AUD: Final = 9

START_CODE: Final = b"\x00\x00\x00\x01"
_SHORT_START_CODE: Final = b"\x00\x00\x01"

# Profiles whose SPS carries chroma format, bit depth and scaling matrices (H.264 7.3.2.1.1).
_HIGH_PROFILES: Final = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


class H264Error(ValueError):
    """Malformed or unusable H.264 data."""


def split_annexb(data: bytes) -> list[bytes]:
    """Split an Annex-B byte stream into NAL units (start codes removed).

    Both 3- and 4-byte start codes are accepted; trailing zero bytes of a NAL unit (the
    leading zero of the next 4-byte start code, or trailing_zero_8bits) are dropped.
    """
    start = data.find(_SHORT_START_CODE)
    if start < 0:
        if data.strip(b"\x00"):
            raise H264Error("no Annex-B start code found")
        return []
    if data[:start].strip(b"\x00"):
        raise H264Error("data before the first Annex-B start code")
    units: list[bytes] = []
    position = start + 3
    while True:
        following = data.find(_SHORT_START_CODE, position)
        end = len(data) if following < 0 else following
        unit = data[position:end].rstrip(b"\x00")
        if unit:
            units.append(unit)
        if following < 0:
            return units
        position = following + 3


def join_annexb(units: Iterable[bytes]) -> bytes:
    """Join NAL units into an Annex-B byte stream with 4-byte start codes."""
    return b"".join(START_CODE + unit for unit in units)


def nal_type(unit: bytes) -> int:
    """Return the nal_unit_type (low 5 bits of the first byte) of a NAL unit."""
    if not unit:
        raise H264Error("empty NAL unit")
    return unit[0] & 0x1F


def split_avcc(data: bytes, length_size: int = 4) -> list[bytes]:
    """The NAL units of a length-prefixed (AVCC / MP4-style) access unit."""
    if length_size not in (1, 2, 4):
        raise H264Error(f"bad NAL length size {length_size}")
    units = []
    position = 0
    while position < len(data):
        if position + length_size > len(data):
            raise H264Error("truncated AVCC length prefix")
        length = int.from_bytes(data[position : position + length_size], "big")
        position += length_size
        if position + length > len(data):
            raise H264Error("AVCC NAL unit runs past the end of the data")
        if length:
            units.append(data[position : position + length])
        position += length
    return units


def avcc_to_annexb(data: bytes, length_size: int = 4) -> bytes:
    """Convert a length-prefixed (AVCC / MP4-style) access unit to Annex-B."""
    return join_annexb(split_avcc(data, length_size))


def read_config_units(
    record: bytes, position: int, count: int, kind: str
) -> tuple[list[bytes], int]:
    """Read ``count`` NAL units, each after a 16-bit length, from a decoder configuration
    record (``avcC``, ``hvcC``: ``kind``) at ``position``: (the units, the position after
    them). An IndexError is left to the caller's record parser."""
    units: list[bytes] = []
    for _ in range(count):
        length = int.from_bytes(record[position : position + 2], "big")
        position += 2
        unit = record[position : position + length]
        if len(unit) != length:
            raise H264Error(f"truncated {kind} record")
        units.append(unit)
        position += length
    return units, position


def avcc_config_to_parameter_sets(record: bytes) -> tuple[list[bytes], list[bytes], int]:
    """Parse an AVCDecoderConfigurationRecord (``avcC``): (SPS list, PPS list, length size)."""
    try:
        if record[0] != 1:
            raise H264Error("avcC configurationVersion is not 1")
        length_size = (record[4] & 0x03) + 1
        position = 5
        parameter_sets: list[list[bytes]] = []
        for count_mask in (0x1F, 0xFF):
            count = record[position] & count_mask
            units, position = read_config_units(record, position + 1, count, "avcC")
            parameter_sets.append(units)
    except IndexError:
        raise H264Error("truncated avcC record") from None
    return parameter_sets[0], parameter_sets[1], length_size


def unescape_rbsp(unit: bytes) -> bytes:
    """Remove emulation-prevention bytes (00 00 03 -> 00 00) from a NAL unit payload."""
    if b"\x00\x00\x03" not in unit:
        return unit
    output = bytearray()
    zeros = 0
    for byte in unit:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        output.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(output)


class _BitReader:
    """Reads bits and Exp-Golomb codes from an RBSP, most significant bit first."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._bit_position = 0

    def bit(self) -> int:
        """One bit."""
        byte_index, bit_index = divmod(self._bit_position, 8)
        if byte_index >= len(self._data):
            raise H264Error("SPS ends early")
        self._bit_position += 1
        return (self._data[byte_index] >> (7 - bit_index)) & 1

    def bits(self, count: int) -> int:
        """``count`` bits as an unsigned integer."""
        value = 0
        for _ in range(count):
            value = (value << 1) | self.bit()
        return value

    def unsigned_exp_golomb(self) -> int:
        """An unsigned Exp-Golomb code, ue(v)."""
        leading_zeros = 0
        while self.bit() == 0:
            leading_zeros += 1
            if leading_zeros > 31:
                raise H264Error("Exp-Golomb code too long")
        return (1 << leading_zeros) - 1 + self.bits(leading_zeros)

    def signed_exp_golomb(self) -> int:
        """A signed Exp-Golomb code, se(v)."""
        code = self.unsigned_exp_golomb()
        return (code + 1) // 2 if code % 2 else -(code // 2)


@dataclass(frozen=True, slots=True)
class SpsInfo:
    """The fields of a sequence parameter set that a publisher and a player care about."""

    profile_idc: int
    constraint_flags: int
    level_idc: int
    width: int
    height: int

    @property
    def codec_string(self) -> str:
        """The WebCodecs / RFC 6381 codec string, ``avc1.PPCCLL``."""
        return f"avc1.{self.profile_idc:02X}{self.constraint_flags:02X}{self.level_idc:02X}"


def codec_string_from_sps(sps: bytes) -> str:
    """Return ``avc1.PPCCLL`` from an SPS NAL unit (header byte included)."""
    if len(sps) < 4 or nal_type(sps) != NAL_SPS:
        raise H264Error("not an SPS NAL unit")
    profile_idc, constraint_flags, level_idc = unescape_rbsp(sps[1:5])[:3]
    return f"avc1.{profile_idc:02X}{constraint_flags:02X}{level_idc:02X}"


def _skip_scaling_list(reader: _BitReader, size: int) -> None:
    last_scale = next_scale = 8
    for _ in range(size):
        if next_scale != 0:
            next_scale = (last_scale + reader.signed_exp_golomb() + 256) % 256
        last_scale = next_scale if next_scale != 0 else last_scale


def parse_sps(sps: bytes) -> SpsInfo:
    """Parse an SPS NAL unit (header byte included) for profile, level and display size."""
    if not sps or nal_type(sps) != NAL_SPS:
        raise H264Error("not an SPS NAL unit")
    reader = _BitReader(unescape_rbsp(sps[1:]))
    profile_idc = reader.bits(8)
    constraint_flags = reader.bits(8)
    level_idc = reader.bits(8)
    reader.unsigned_exp_golomb()  # seq_parameter_set_id
    chroma_format_idc = 1
    separate_colour_plane = 0
    if profile_idc in _HIGH_PROFILES:
        chroma_format_idc = reader.unsigned_exp_golomb()
        if chroma_format_idc == 3:
            separate_colour_plane = reader.bit()
        reader.unsigned_exp_golomb()  # bit_depth_luma_minus8
        reader.unsigned_exp_golomb()  # bit_depth_chroma_minus8
        reader.bit()  # qpprime_y_zero_transform_bypass_flag
        if reader.bit():  # seq_scaling_matrix_present_flag
            for index in range(8 if chroma_format_idc != 3 else 12):
                if reader.bit():
                    _skip_scaling_list(reader, 16 if index < 6 else 64)
    reader.unsigned_exp_golomb()  # log2_max_frame_num_minus4
    pic_order_cnt_type = reader.unsigned_exp_golomb()
    if pic_order_cnt_type == 0:
        reader.unsigned_exp_golomb()  # log2_max_pic_order_cnt_lsb_minus4
    elif pic_order_cnt_type == 1:
        reader.bit()  # delta_pic_order_always_zero_flag
        reader.signed_exp_golomb()  # offset_for_non_ref_pic
        reader.signed_exp_golomb()  # offset_for_top_to_bottom_field
        for _ in range(reader.unsigned_exp_golomb()):
            reader.signed_exp_golomb()  # offset_for_ref_frame[i]
    reader.unsigned_exp_golomb()  # max_num_ref_frames
    reader.bit()  # gaps_in_frame_num_value_allowed_flag
    width_in_macroblocks = reader.unsigned_exp_golomb() + 1
    height_in_map_units = reader.unsigned_exp_golomb() + 1
    frame_mbs_only = reader.bit()
    if not frame_mbs_only:
        reader.bit()  # mb_adaptive_frame_field_flag
    reader.bit()  # direct_8x8_inference_flag
    width = width_in_macroblocks * 16
    height = (2 - frame_mbs_only) * height_in_map_units * 16
    if reader.bit():  # frame_cropping_flag
        left, right, top, bottom = (reader.unsigned_exp_golomb() for _ in range(4))
        chroma_array_type = 0 if separate_colour_plane else chroma_format_idc
        sub_width, sub_height = {1: (2, 2), 2: (2, 1), 3: (1, 1)}.get(chroma_array_type, (1, 1))
        crop_unit_x = sub_width if chroma_array_type else 1
        crop_unit_y = (2 - frame_mbs_only) * (sub_height if chroma_array_type else 1)
        width -= crop_unit_x * (left + right)
        height -= crop_unit_y * (top + bottom)
    if width <= 0 or height <= 0:
        raise H264Error("SPS cropping leaves no picture")
    return SpsInfo(profile_idc, constraint_flags, level_idc, width, height)


def extract_parameter_sets(units: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Return the (SPS list, PPS list) found among ``units``, in order."""
    sps = [unit for unit in units if nal_type(unit) == NAL_SPS]
    pps = [unit for unit in units if nal_type(unit) == NAL_PPS]
    return sps, pps


def is_idr(units: Sequence[bytes]) -> bool:
    """True when the access unit contains an IDR slice (a v1 KEY point)."""
    return any(nal_type(unit) == NAL_IDR for unit in units)


def _has_picture(units: Sequence[bytes]) -> bool:
    return any(1 <= nal_type(unit) <= 5 for unit in units)


class AnnexBPackager:
    """Turns Annex-B access units into v1 media messages: the rules every codec whose
    parameter sets travel as NAL units shares (H.264 here, HEVC in :mod:`.hevc`).

    Feed access units in decoding order to :meth:`package`. It returns the messages to send:
    a CONFIG (the parameter sets) before a KEY whose parameter sets differ from the last
    ones sent, then the access unit itself, flagged KEY when it holds a picture decoding can
    start from. A KEY that lacks in-band parameter sets (an encoder with global headers, a
    remuxed MP4) gets the last known ones inserted after any access unit delimiter, so that
    every KEY stands alone. An access unit holding only parameter sets updates the
    configuration and yields just a CONFIG. Subclasses name the NAL unit types.
    """

    #: The parameter set NAL unit types, in the order a CONFIG and a KEY carry them.
    parameter_set_types: tuple[int, ...] = (NAL_SPS, NAL_PPS)
    delimiter_type: int = NAL_AUD

    def __init__(self) -> None:
        self._sets: dict[int, tuple[bytes, ...]] = {kind: () for kind in self.parameter_set_types}
        self._config_sent: tuple[tuple[bytes, ...], ...] | None = None

    @staticmethod
    def unit_type(unit: bytes) -> int:
        """The NAL unit type of ``unit``."""
        return nal_type(unit)

    @staticmethod
    def is_picture(kind: int) -> bool:
        """True for the NAL unit types of coded pictures (slices)."""
        return 1 <= kind <= 5

    @staticmethod
    def is_key_picture(kind: int) -> bool:
        """True for the NAL unit types decoding can start from (a v1 KEY)."""
        return kind == NAL_IDR

    @property
    def codec_string(self) -> str | None:
        """The WebCodecs codec string of the current parameter sets, once known."""
        return None

    @property
    def picture_size(self) -> tuple[int, int] | None:
        """The display (width, height) of the current parameter sets, once known."""
        return None

    def is_key_access_unit(self, access_unit: bytes) -> bool:
        """True when the Annex-B access unit holds a picture decoding can start from."""
        return any(self.is_key_picture(self.unit_type(unit)) for unit in split_annexb(access_unit))

    def _current(self) -> tuple[tuple[bytes, ...], ...]:
        return tuple(self._sets[kind] for kind in self.parameter_set_types)

    def _complete(self) -> bool:
        return all(self._current())

    @property
    def config_payload(self) -> bytes | None:
        """The current CONFIG payload (Annex-B parameter sets), once all have been seen."""
        if not self._complete():
            return None
        return join_annexb(unit for units in self._current() for unit in units)

    def package(self, access_unit: bytes, capture_time_us: int) -> list[MediaMessage]:
        """Return the v1 messages for one Annex-B access unit (see the class docstring)."""
        units = split_annexb(access_unit)
        if not units:
            return []
        kinds = [self.unit_type(unit) for unit in units]
        found = False
        for kind in self.parameter_set_types:
            in_band = tuple(unit for unit, k in zip(units, kinds, strict=True) if k == kind)
            if in_band:
                self._sets[kind] = in_band
                found = True
        missing = any(kind not in kinds for kind in self.parameter_set_types)
        messages: list[MediaMessage] = []
        if not any(self.is_picture(kind) for kind in kinds):
            if self._complete() and found:
                messages.extend(self._config_if_changed(capture_time_us))
            return messages
        if not any(self.is_key_picture(kind) for kind in kinds):
            messages.append(MediaMessage.build(0, capture_time_us, access_unit))
            return messages
        if not self._complete():
            raise H264Error("key access unit without parameter sets, and none known")
        messages.extend(self._config_if_changed(capture_time_us))
        if missing:
            access_unit = self._with_parameter_sets(units, kinds)
        messages.append(MediaMessage.build(FLAG_KEY, capture_time_us, access_unit))
        return messages

    def _config_if_changed(self, capture_time_us: int) -> list[MediaMessage]:
        current = self._current()
        if current == self._config_sent:
            return []
        self._config_sent = current
        config = join_annexb(unit for units in current for unit in units)
        return [MediaMessage.build(FLAG_CONFIG, capture_time_us, config)]

    def _with_parameter_sets(self, units: Sequence[bytes], kinds: Sequence[int]) -> bytes:
        # Parameter sets go after any access unit delimiter, which must stay first.
        delimiters = [
            unit for unit, kind in zip(units, kinds, strict=True) if kind == self.delimiter_type
        ]
        skip = {self.delimiter_type, *self.parameter_set_types}
        rest = [unit for unit, kind in zip(units, kinds, strict=True) if kind not in skip]
        sets = [unit for current in self._current() for unit in current]
        return join_annexb([*delimiters, *sets, *rest])


class H264Packager(AnnexBPackager):
    """Turns Annex-B access units from any H.264 encoder into v1 media messages.

    The rules are :class:`AnnexBPackager`'s: CONFIG (SPS+PPS) before a KEY whose
    parameter sets changed, KEY on IDR access units, SPS/PPS inserted into a KEY that
    lacks them.
    """

    @property
    def sps_info(self) -> SpsInfo | None:
        """The parsed current SPS, once one has been seen."""
        sps = self._sets[NAL_SPS]
        return parse_sps(sps[0]) if sps else None

    @property
    def codec_string(self) -> str | None:
        """The codec string of the current SPS, once one has been seen."""
        sps = self._sets[NAL_SPS]
        return codec_string_from_sps(sps[0]) if sps else None

    @property
    def picture_size(self) -> tuple[int, int] | None:
        """The display size the current SPS gives, once one has been seen."""
        info = self.sps_info
        return (info.width, info.height) if info is not None else None
