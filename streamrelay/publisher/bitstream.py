"""Demuxed H.264 packets to v1 access units, without decoding (pure: no PyAV, no I/O).

Containers carry H.264 in one of two forms:

- Annex-B (start codes): MPEG-TS (``udp://``, ``srt://``, ``.ts`` files), RTSP/RTP, raw
  ``.h264``. Parameter sets travel in-band, or (RTSP's ``sprop-parameter-sets``) only in
  the stream's extradata, itself Annex-B.
- AVCC (each NAL unit prefixed by its length): MP4/MOV, FLV and so RTMP, Matroska. The
  parameter sets live in the ``avcC`` record (the extradata), not in the samples.

:class:`AccessUnitConverter` gives Annex-B access units in either case, with the access
unit delimiters dropped (MPEG-TS muxers add one to every access unit; they carry no
picture and the v1 profile does not use them). Every other NAL unit goes through byte for
byte. The parameter sets of the extradata are offered as an access unit of their own
(:meth:`~AccessUnitConverter.take_parameter_sets`), which :class:`~.h264.H264Packager`
turns into a CONFIG and then inserts before every KEY that lacks them in-band, as the v1
profile requires.
"""

from __future__ import annotations

from typing import Final

from .h264 import (
    NAL_AUD,
    H264Error,
    avcc_config_to_parameter_sets,
    join_annexb,
    nal_type,
    split_annexb,
    split_avcc,
)

_START_CODES: Final = (b"\x00\x00\x01", b"\x00\x00\x00\x01")


def is_annexb(data: bytes) -> bool:
    """True when ``data`` starts with an Annex-B start code."""
    return data.startswith(_START_CODES)


class AccessUnitConverter:
    """Turns demuxed H.264 packets (AVCC or Annex-B) into Annex-B access units.

    ``extradata`` is the stream's codec extradata: an ``avcC`` record (then packets are
    AVCC with its NAL length size), Annex-B parameter sets, or nothing. A packet's
    ``new_extradata`` side data (FLV/RTMP sends a new sequence header when the encoder
    restarts, e.g. OBS changing resolution) goes to :meth:`update_extradata`.
    """

    def __init__(self, extradata: bytes | None = None) -> None:
        self.length_size: int | None = None
        self._pending_parameter_sets: list[bytes] = []
        self.update_extradata(extradata)

    def update_extradata(self, extradata: bytes | None) -> None:
        """Take new extradata: its format and its parameter sets."""
        if not extradata:
            return
        if extradata[0] == 1:
            sps, pps, self.length_size = avcc_config_to_parameter_sets(extradata)
            self._pending_parameter_sets = [*sps, *pps]
        elif is_annexb(extradata):
            self.length_size = None
            self._pending_parameter_sets = split_annexb(extradata)
        else:
            raise H264Error("extradata is neither an avcC record nor Annex-B")

    def take_parameter_sets(self) -> bytes | None:
        """The extradata's parameter sets as one Annex-B unit, once after each update."""
        units, self._pending_parameter_sets = self._pending_parameter_sets, []
        return join_annexb(units) if units else None

    def convert(self, data: bytes) -> bytes:
        """One packet as an Annex-B access unit, without access unit delimiters."""
        if self.length_size is not None and not is_annexb(data):
            units = split_avcc(data, self.length_size)
        elif is_annexb(data):
            units = split_annexb(data)
        else:
            # No avcC record seen, yet no start code: length-prefixed with 4-byte
            # lengths is what every muxer writes.
            units = split_avcc(data, 4)
        return join_annexb(unit for unit in units if nal_type(unit) != NAL_AUD)


def transcode_reason(codec_name: str, has_b_frames: bool, pixel_format: str | None) -> str | None:
    """Why a video stream must be re-encoded for the v1 H.264 profile, or None to remux.

    The v1 profile wants H.264 with decoding order equal to presentation order (no
    B-frames, no reordering) in 8-bit 4:2:0, which every browser's decoder takes.
    """
    if codec_name != "h264":
        return f"{codec_name} video"
    if has_b_frames:
        return "B-frames"
    if pixel_format not in (None, "yuv420p", "yuvj420p"):
        return f"pixel format {pixel_format}"
    return None


__all__ = [
    "AccessUnitConverter",
    "is_annexb",
    "transcode_reason",
]
