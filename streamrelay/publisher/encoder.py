"""H.264 encoding with PyAV's bundled libx264, tuned for live low-latency streaming."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import av
import av.video.frame

from streamrelay.wire import MediaMessage, meta_message

from .h264 import H264Packager, SpsInfo

PROFILES = ("baseline", "main", "high")
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    """What to encode: picture size, rate, bitrate, GOP and libx264 speed/profile."""

    width: int = 1280
    height: int = 720
    fps: Fraction = Fraction(30)
    bitrate: int = 2_000_000
    keyframe_interval_frames: int = 60
    preset: str = "veryfast"
    profile: str = "baseline"
    threads: int = 0

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise ValueError(f"size must be positive and even, got {self.width}x{self.height}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.bitrate < 1000:
            raise ValueError(f"bitrate must be at least 1000 bit/s, got {self.bitrate}")
        if self.keyframe_interval_frames < 1:
            raise ValueError("keyframe interval must be at least one frame")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}")


class _Packager(Protocol):
    @property
    def codec_string(self) -> str | None: ...

    @property
    def config_payload(self) -> bytes | None: ...


class PacketEncoder:
    """A PyAV video encoder whose packets a packager turns into v1 messages; the codecs
    (:class:`H264Encoder` here, VP9 and AV1 in :mod:`.codecs`) differ only in the codec,
    its options and the packager.

    Not thread-safe, except :meth:`request_keyframe`, which any thread may call; use one
    encoder from one thread.
    """

    codec_name: str = ""

    def __init__(self, settings: EncoderSettings) -> None:
        self.settings = settings
        self._keyframe_requested = threading.Event()
        self._next_pts = 0
        self._packager = self._make_packager(settings)
        self._context: Any = self._open_context(settings)

    def _make_packager(self, settings: EncoderSettings) -> _Packager:
        raise NotImplementedError

    def _options(self, settings: EncoderSettings) -> dict[str, str]:
        raise NotImplementedError

    def _package(self, packet: Any, capture_time_us: int) -> list[MediaMessage]:
        """The v1 messages of one encoded packet."""
        raise NotImplementedError

    def _open_context(self, settings: EncoderSettings) -> Any:
        context: Any = av.CodecContext.create(self.codec_name, "w")
        context.width = settings.width
        context.height = settings.height
        context.pix_fmt = "yuv420p"
        context.time_base = Fraction(settings.fps.denominator, settings.fps.numerator)
        context.framerate = settings.fps
        context.bit_rate = settings.bitrate
        context.gop_size = settings.keyframe_interval_frames
        context.max_b_frames = 0
        context.thread_count = settings.threads
        context.options = self._options(settings)
        context.open()
        return context

    @property
    def codec_string(self) -> str | None:
        """The WebCodecs codec string (``avc1.PPCCLL`` for H.264), known after the first
        keyframe."""
        return self._packager.codec_string

    @property
    def config_payload(self) -> bytes | None:
        """The current CONFIG payload (for H.264 the Annex-B SPS+PPS), known after the
        first keyframe."""
        return self._packager.config_payload

    def meta(self, **extra: Any) -> dict[str, Any] | None:
        """The ``meta`` message for this stream, once the codec string is known."""
        codec = self.codec_string
        if codec is None:
            return None
        settings = self.settings
        return meta_message(codec, settings.width, settings.height, float(settings.fps), **extra)

    def request_keyframe(self) -> None:
        """Make the next encoded frame a keyframe (a v1 KEY). Safe to call from any thread."""
        self._keyframe_requested.set()

    def encode(
        self, frame: av.VideoFrame, capture_time_us: int, *, force_keyframe: bool = False
    ) -> list[MediaMessage]:
        """Encode one picture; return its messages (CONFIG first when it changed).

        ``frame`` is converted to the configured size and yuv420p when it differs.
        ``capture_time_us`` is the capture time that goes into the message headers.
        """
        settings = self.settings
        if (frame.width, frame.height, frame.format.name) != (
            settings.width,
            settings.height,
            "yuv420p",
        ):
            frame = frame.reformat(settings.width, settings.height, "yuv420p")
        if self._keyframe_requested.is_set():
            self._keyframe_requested.clear()
            force_keyframe = True
        # Always set the picture type: a decoded frame (file source) still carries its
        # source's I/P type, and the encoder would obey it.
        frame.pict_type = (
            av.video.frame.PictureType.I if force_keyframe else av.video.frame.PictureType.NONE
        )
        frame.pts = self._next_pts
        frame.time_base = self._context.time_base
        self._next_pts += 1
        messages: list[MediaMessage] = []
        # Live settings mean one packet per frame, at once; keep the frame's own capture
        # time with it even so.
        for packet in self._context.encode(frame):
            messages.extend(self._package(packet, capture_time_us))
        return messages

    def close(self) -> None:
        """Release the codec context."""
        self._context = None


class H264Encoder(PacketEncoder):
    """libx264 through PyAV, producing v1 media messages (see :mod:`.h264`).

    Settings: zerolatency tune (no lookahead, no frame delay: one packet per frame, out at
    once), no B-frames, a fixed GOP with scene-cut keyframes off (predictable cache sizes on
    the relay), a one-second VBV so that bursts stay bounded, and in-band SPS/PPS on every
    IDR (libx264 repeats headers when the global-header flag is not set).

    Not thread-safe, except :meth:`request_keyframe`, which any thread may call; use one
    encoder from one thread.
    """

    codec_name = "libx264"
    _packager: H264Packager

    def _make_packager(self, settings: EncoderSettings) -> H264Packager:
        return H264Packager()

    def _options(self, settings: EncoderSettings) -> dict[str, str]:
        keyint = settings.keyframe_interval_frames
        return {
            "preset": settings.preset,
            "tune": "zerolatency",
            # Set through options: PyAV's context.profile does not reach libx264.
            "profile": settings.profile,
            # A forced keyframe must be an IDR, else it is no v1 KEY.
            "forced-idr": "1",
            "maxrate": str(settings.bitrate),
            "bufsize": str(settings.bitrate),
            "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=0",
        }

    def _package(self, packet: Any, capture_time_us: int) -> list[MediaMessage]:
        return self._packager.package(bytes(packet), capture_time_us)

    @property
    def sps_info(self) -> SpsInfo | None:
        """The parsed SPS of the stream, known after the first keyframe."""
        return self._packager.sps_info
