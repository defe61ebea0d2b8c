"""The publisher's codecs: H.264 (libx264), VP9 (libvpx-vp9) and AV1 (SVT-AV1), one interface.

:func:`create_encoder` makes the encoder ``--codec`` names. All three are a
:class:`.encoder.PacketEncoder`: PyAV encodes, the codec's packager turns each packet into
v1 messages. VP9 and AV1 share :class:`_PacketEncoder`, whose packagers (:mod:`.vp9`,
:mod:`.av1`) take the KEY flag from PyAV's ``packet.is_keyframe`` (and check it against
the bitstream).

Both are set for live streaming as libx264 is (see :class:`.encoder.H264Encoder`): one
packet out per frame in, at once (no lookahead, no frame reordering, no hidden alt-ref
frames), a fixed GOP without scene-cut keyframes, and a forced keyframe on request.

- VP9: libvpx-vp9 with ``deadline=realtime``, ``cpu-used=8`` (its fastest realtime speed),
  ``lag-in-frames=0``, ``auto-alt-ref=0``, row multithreading, CBR with a one-second buffer.
- AV1: libsvtav1, the only AV1 encoder in PyAV's bundled FFmpeg (no libaom-av1 or
  librav1e there), in its real-time mode (``rtc=1``: low-delay prediction, CBR) at preset
  10, without scene-change detection.  SVT-AV1's own log goes to stderr; it is quietened
  to errors unless ``SVT_LOG`` is set.
"""

from __future__ import annotations

import os
from typing import Any, Final, Protocol

import av
import av.video.frame

from streamrelay.wire import MediaMessage

from .av1 import Av1Packager
from .encoder import EncoderSettings, H264Encoder, PacketEncoder
from .vp9 import Vp9Packager

CODECS: Final = ("h264", "vp9", "av1")

VP9_ENCODER: Final = "libvpx-vp9"
AV1_ENCODER: Final = "libsvtav1"
AV1_PRESET: Final = 10


class VideoEncoder(Protocol):
    """What the capture pipeline needs of an encoder (every class here has it)."""

    settings: EncoderSettings

    def meta(self, **extra: Any) -> dict[str, Any] | None:
        """The ``meta`` message, once the codec string is known."""
        ...

    def request_keyframe(self) -> None:
        """Make the next encoded frame a KEY. Any thread."""
        ...

    def encode(
        self, frame: av.VideoFrame, capture_time_us: int, *, force_keyframe: bool = False
    ) -> list[MediaMessage]:
        """Encode one picture; return its messages (CONFIG first when it changed)."""
        ...

    def close(self) -> None:
        """Release the codec context."""
        ...


class _KeyedPackager(Protocol):
    @property
    def codec_string(self) -> str | None: ...

    @property
    def config_payload(self) -> bytes | None: ...

    def package(self, data: bytes, key: bool, capture_time_us: int) -> list[MediaMessage]: ...


class _PacketEncoder(PacketEncoder):
    """An encoder whose packager takes the KEY flag from PyAV's ``packet.is_keyframe``."""

    _packager: _KeyedPackager

    def _make_packager(self, settings: EncoderSettings) -> _KeyedPackager:
        raise NotImplementedError

    def _package(self, packet: Any, capture_time_us: int) -> list[MediaMessage]:
        return self._packager.package(bytes(packet), packet.is_keyframe, capture_time_us)


class Vp9Encoder(_PacketEncoder):
    """libvpx-vp9 through PyAV, producing v1 VP9 profile messages (see :mod:`.vp9`)."""

    codec_name = VP9_ENCODER

    def _make_packager(self, settings: EncoderSettings) -> _KeyedPackager:
        return Vp9Packager(settings.width, settings.height, settings.fps)

    def _options(self, settings: EncoderSettings) -> dict[str, str]:
        return {
            "deadline": "realtime",
            "cpu-used": "8",
            # One packet per frame, at once, and never an invisible (alt-ref) frame.
            "lag-in-frames": "0",
            "auto-alt-ref": "0",
            "row-mt": "1",
            "keyint_min": str(settings.keyframe_interval_frames),
            "maxrate": str(settings.bitrate),
            "minrate": str(settings.bitrate),
            "bufsize": str(settings.bitrate),
        }


class Av1Encoder(_PacketEncoder):
    """SVT-AV1 through PyAV, producing v1 AV1 profile messages (see :mod:`.av1`)."""

    codec_name = AV1_ENCODER

    def _make_packager(self, settings: EncoderSettings) -> _KeyedPackager:
        return Av1Packager()

    def _open_context(self, settings: EncoderSettings) -> Any:
        # SVT-AV1 logs its banner and warnings to stderr; keep errors only.
        os.environ.setdefault("SVT_LOG", "1")
        return super()._open_context(settings)

    def _options(self, settings: EncoderSettings) -> dict[str, str]:
        return {
            "preset": str(AV1_PRESET),
            # rtc: real-time mode (low-delay prediction, no lookahead); rc=2: CBR;
            # scd=0: keyframes only at GOP boundaries and on request.
            "svtav1-params": "rtc=1:rc=2:pred-struct=1:scd=0",
        }

    def close(self) -> None:
        """Drain and release the codec context (SVT-AV1 wants an end of stream first)."""
        context = self._context
        self._context = None
        if context is not None:
            try:
                context.encode(None)
            except av.FFmpegError:
                pass  # closing anyway


def create_encoder(codec: str, settings: EncoderSettings) -> VideoEncoder:
    """The encoder for ``codec`` (one of :data:`CODECS`)."""
    if codec == "h264":
        return H264Encoder(settings)
    if codec == "vp9":
        return Vp9Encoder(settings)
    if codec == "av1":
        return Av1Encoder(settings)
    raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
