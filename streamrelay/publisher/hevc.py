"""HEVC (H.265) pass-through helpers: NAL unit types, ``hvcC`` records, the codec string.

The publisher never encodes HEVC; it passes through what a source carries (see
:mod:`.remux`: the default for HEVC sources; ``--transcode`` re-encodes them), packaged
by :class:`HevcPackager` following the HEVC profile of v1 (``docs/protocol.md``):
Annex-B access units; CONFIG = VPS+SPS+PPS; every KEY an IRAP picture (IDR, CRA or BLA:
with no picture reordering there are no leading pictures, so decoding can start at any
of them) carrying its own VPS/SPS/PPS; ``meta.codec`` the WebCodecs string
``hvc1.P.C.TL.CC`` (ISO/IEC 14496-15 annex E).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .h264 import AnnexBPackager, H264Error, _BitReader, read_config_units, unescape_rbsp

HEVC_VPS: Final = 32
HEVC_SPS: Final = 33
HEVC_PPS: Final = 34
HEVC_AUD: Final = 35
_IRAP: Final = range(16, 24)


def hevc_nal_type(unit: bytes) -> int:
    """The nal_unit_type of an HEVC NAL unit (bits 1-6 of its first byte)."""
    if len(unit) < 2:
        raise H264Error("HEVC NAL unit shorter than its header")
    return (unit[0] >> 1) & 0x3F


def hvcc_config_to_parameter_sets(record: bytes) -> tuple[list[bytes], int]:
    """Parse an HEVCDecoderConfigurationRecord (``hvcC``): (VPS, SPS, PPS... in record
    order, NAL length size)."""
    try:
        if record[0] != 1:
            raise H264Error("hvcC configurationVersion is not 1")
        length_size = (record[21] & 0x03) + 1
        position = 23
        units: list[bytes] = []
        for _ in range(record[22]):
            position += 1  # array_completeness, reserved, NAL_unit_type
            count = int.from_bytes(record[position : position + 2], "big")
            array, position = read_config_units(record, position + 2, count, "hvcC")
            units.extend(array)
    except IndexError:
        raise H264Error("truncated hvcC record") from None
    return units, length_size


@dataclass(frozen=True, slots=True)
class HevcSpsInfo:
    """What meta needs from an HEVC SPS: the codec string and the display size."""

    codec_string: str
    width: int
    height: int


def _reverse_bits32(value: int) -> int:
    return int(f"{value:032b}"[::-1], 2)


def parse_hevc_sps(sps: bytes) -> HevcSpsInfo:
    """Parse an HEVC SPS NAL unit (header included): codec string, cropped size."""
    if hevc_nal_type(sps) != HEVC_SPS:
        raise H264Error("not an HEVC SPS NAL unit")
    reader = _BitReader(unescape_rbsp(sps[2:]))
    reader.bits(4)  # sps_video_parameter_set_id
    max_sub_layers_minus1 = reader.bits(3)
    reader.bit()  # sps_temporal_id_nesting_flag
    profile_space = reader.bits(2)
    tier = reader.bit()
    profile_idc = reader.bits(5)
    compatibility = reader.bits(32)
    constraints = [reader.bits(8) for _ in range(6)]
    level_idc = reader.bits(8)
    present = [(reader.bit(), reader.bit()) for _ in range(max_sub_layers_minus1)]
    if max_sub_layers_minus1:
        reader.bits(2 * (8 - max_sub_layers_minus1))  # reserved_zero_2bits
    for profile_present, level_present in present:
        reader.bits(88 if profile_present else 0)
        reader.bits(8 if level_present else 0)
    reader.unsigned_exp_golomb()  # sps_seq_parameter_set_id
    chroma_format_idc = reader.unsigned_exp_golomb()
    if chroma_format_idc == 3:
        reader.bit()  # separate_colour_plane_flag
    width = reader.unsigned_exp_golomb()
    height = reader.unsigned_exp_golomb()
    if reader.bit():  # conformance_window_flag
        left, right, top, bottom = (reader.unsigned_exp_golomb() for _ in range(4))
        sub_width, sub_height = {1: (2, 2), 2: (2, 1)}.get(chroma_format_idc, (1, 1))
        width -= sub_width * (left + right)
        height -= sub_height * (top + bottom)
    if width <= 0 or height <= 0:
        raise H264Error("HEVC SPS cropping leaves no picture")
    while constraints and constraints[-1] == 0:
        constraints.pop()
    codec = ".".join(
        [
            "hvc1",
            ("", "A", "B", "C")[profile_space] + str(profile_idc),
            f"{_reverse_bits32(compatibility):X}",
            ("H" if tier else "L") + str(level_idc),
            *(f"{byte:X}" for byte in constraints),
        ]
    )
    return HevcSpsInfo(codec, width, height)


class HevcPackager(AnnexBPackager):
    """v1 messages from HEVC access units: CONFIG = VPS+SPS+PPS, KEY on IRAP pictures."""

    parameter_set_types = (HEVC_VPS, HEVC_SPS, HEVC_PPS)
    delimiter_type = HEVC_AUD

    @staticmethod
    def unit_type(unit: bytes) -> int:
        """The HEVC NAL unit type."""
        return hevc_nal_type(unit)

    @staticmethod
    def is_picture(kind: int) -> bool:
        """VCL NAL unit types (slices)."""
        return kind < 32

    @staticmethod
    def is_key_picture(kind: int) -> bool:
        """IRAP pictures: BLA, IDR, CRA."""
        return kind in _IRAP

    @property
    def sps_info(self) -> HevcSpsInfo | None:
        """The parsed current SPS, once one has been seen."""
        sps = self._sets[HEVC_SPS]
        return parse_hevc_sps(sps[0]) if sps else None

    @property
    def codec_string(self) -> str | None:
        """``hvc1...`` of the current SPS, once one has been seen."""
        info = self.sps_info
        return info.codec_string if info is not None else None

    @property
    def picture_size(self) -> tuple[int, int] | None:
        """The display size the current SPS gives, once one has been seen."""
        info = self.sps_info
        return (info.width, info.height) if info is not None else None


__all__ = [
    "HEVC_AUD",
    "HEVC_PPS",
    "HEVC_SPS",
    "HEVC_VPS",
    "HevcPackager",
    "HevcSpsInfo",
    "hevc_nal_type",
    "hvcc_config_to_parameter_sets",
    "parse_hevc_sps",
]
