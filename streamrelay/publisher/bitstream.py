"""Demuxed H.264 (or HEVC) packets to v1 access units, without decoding (pure: no I/O).

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
profile requires. HEVC works the same way (``hvcC`` records, VPS/SPS/PPS; see
:mod:`.hevc`).
"""

from __future__ import annotations

from typing import Final

from .h264 import (
    NAL_AUD,
    AnnexBPackager,
    H264Error,
    H264Packager,
    avcc_config_to_parameter_sets,
    join_annexb,
    nal_type,
    split_annexb,
    split_avcc,
)
from .hevc import HEVC_AUD, HevcPackager, hevc_nal_type, hvcc_config_to_parameter_sets

#: The codecs that can be remuxed, by FFmpeg codec name.
PASS_THROUGH_CODECS: Final = ("h264", "hevc")

_START_CODES: Final = (b"\x00\x00\x01", b"\x00\x00\x00\x01")


def is_annexb(data: bytes) -> bool:
    """True when ``data`` starts with an Annex-B start code."""
    return data.startswith(_START_CODES)


class AccessUnitConverter:
    """Turns demuxed H.264 packets (AVCC or Annex-B) into Annex-B access units.

    ``extradata`` is the stream's codec extradata: an ``avcC`` record (then packets are
    AVCC with its NAL length size), Annex-B parameter sets, or nothing. A packet's
    ``new_extradata`` side data (FLV/RTMP sends a new sequence header when the encoder
    restarts, e.g. OBS changing resolution) goes to :meth:`update_extradata`. ``codec``
    is ``h264`` or ``hevc`` (an ``hvcC`` record then).
    """

    def __init__(self, extradata: bytes | None = None, codec: str = "h264") -> None:
        if codec not in PASS_THROUGH_CODECS:
            raise H264Error(f"cannot pass {codec} through")
        self.codec = codec
        self.length_size: int | None = None
        self._pending_parameter_sets: list[bytes] = []
        self._delimiter = HEVC_AUD if codec == "hevc" else NAL_AUD
        self._unit_type = hevc_nal_type if codec == "hevc" else nal_type
        self.update_extradata(extradata)

    def update_extradata(self, extradata: bytes | None) -> None:
        """Take new extradata: its format and its parameter sets."""
        if not extradata:
            return
        if extradata[0] == 1 and self.codec == "hevc":
            self._pending_parameter_sets, self.length_size = hvcc_config_to_parameter_sets(
                extradata
            )
        elif extradata[0] == 1:
            sps, pps, self.length_size = avcc_config_to_parameter_sets(extradata)
            self._pending_parameter_sets = [*sps, *pps]
        elif is_annexb(extradata):
            self.length_size = None
            self._pending_parameter_sets = split_annexb(extradata)
        else:
            raise H264Error("extradata is neither a configuration record nor Annex-B")

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
        return join_annexb(unit for unit in units if self._unit_type(unit) != self._delimiter)

    def packager(self) -> AnnexBPackager:
        """A packager for this codec's v1 profile."""
        return HevcPackager() if self.codec == "hevc" else H264Packager()


def transcode_reason(
    codec_name: str,
    has_b_frames: bool,
    pixel_format: str | None,
    hevc_passthrough: bool = False,
) -> str | None:
    """Why a video stream must be re-encoded for v1, or None to remux it.

    The v1 H.264 profile (and the HEVC one, when ``hevc_passthrough``) wants decoding
    order equal to presentation order (no B-frames, no reordering) in 8-bit 4:2:0.
    """
    if codec_name != "h264" and not (codec_name == "hevc" and hevc_passthrough):
        return f"{codec_name} video"
    if has_b_frames:
        return "B-frames"
    if pixel_format not in (None, "yuv420p", "yuvj420p"):
        return f"pixel format {pixel_format}"
    return None


__all__ = [
    "PASS_THROUGH_CODECS",
    "AccessUnitConverter",
    "is_annexb",
    "transcode_reason",
]
