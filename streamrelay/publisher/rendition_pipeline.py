"""Encoding a rendition set: one source, scaled and encoded once per rendition, GOP-aligned.

:class:`RenditionEncoders` holds one :class:`~.encoder.H264Encoder` (libx264) per
rendition and decides, per SOURCE frame, whether that frame is a keyframe in all of them:
the first frame, every ``keyframe_interval_frames``-th frame after the last keyframe (a
fixed GOP counted in source frames), and the next frame after any keyframe request. The
same decision and the same capture time go to every rendition, so keyframes fall on the
same source frames and carry identical capture times everywhere. (libx264's own keyint
equals the GOP and scene cuts are off, so it never places a keyframe of its own first.)

:class:`RenditionPipeline` is the capture thread of :class:`~.pipeline.CapturePipeline`
with a per-frame body for the set: each rendition follows its own connection's readiness.
A rendition whose connection is behind (CONGESTED) drops the raw frame, one that is
offline skips it; either way it waits for a keyframe, and its return to READY asks for
one, which (like every request) makes the next source frame a keyframe in all renditions.
Encoding runs in the capture thread, one rendition after the other; what it produces goes
to each connection through its bounded handoff and outbox, so a slow connection costs
dropped frames of its own rendition, never memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av

from streamrelay.wire import HEADER_SIZE, MediaMessage

from .client import Readiness
from .encoder import EncoderSettings, H264Encoder
from .idleclock import IdleClock
from .pipeline import CapturePipeline, MediaSink
from .renditions import Rendition, RenditionSet, rendition_meta
from .sources import FrameSource
from .thumbnail import ThumbnailMaker


def probe_codec_string(settings: EncoderSettings) -> str:
    """The codec string (``avc1.PPCCLL``) libx264 produces for ``settings``, learned by
    encoding one blank picture with a throwaway encoder.

    Every rendition's meta announces the whole set, codecs included, from the very first
    meta on, before the other renditions have produced a keyframe of their own.
    """
    probe = H264Encoder(settings)
    try:
        frame = av.VideoFrame(settings.width, settings.height, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        probe.encode(frame, 0, force_keyframe=True)
        codec = probe.codec_string
    finally:
        probe.close()
    if codec is None:
        raise ValueError(f"libx264 produced no keyframe for {settings.width}x{settings.height}")
    return codec


class RenditionEncoders:
    """One libx264 encoder per rendition and the set's keyframe decision (see the module
    docstring). Used from one thread, except :meth:`request_keyframe` (any thread)."""

    def __init__(
        self,
        renditions: Sequence[Rendition],
        *,
        fps: Fraction,
        keyframe_interval_frames: int,
        preset: str = "veryfast",
        profile: str = "baseline",
        threads: int = 0,
    ) -> None:
        if not renditions:
            raise ValueError("a rendition set needs at least one rendition")
        self.renditions = tuple(renditions)
        self.keyframe_interval_frames = keyframe_interval_frames
        self.fps = fps
        all_settings = [
            EncoderSettings(
                width=rendition.width,
                height=rendition.height,
                fps=fps,
                bitrate=rendition.bitrate,
                keyframe_interval_frames=keyframe_interval_frames,
                preset=preset,
                profile=profile,
                threads=threads,
            )
            for rendition in self.renditions
        ]
        self.codecs: dict[str, str | None] = {
            rendition.label: probe_codec_string(settings)
            for rendition, settings in zip(self.renditions, all_settings, strict=True)
        }
        self.encoders = tuple(H264Encoder(settings) for settings in all_settings)
        self._keyframe_requested = threading.Event()
        # Source frames since the last keyframe; None until the first.
        self._since_keyframe: int | None = None

    def request_keyframe(self) -> None:
        """Make the next source frame a keyframe in every rendition. Any thread."""
        self._keyframe_requested.set()

    def next_is_keyframe(self, force: bool = False) -> bool:
        """Decide for the next source frame (call once per frame that is encoded in at
        least one rendition): True when it must be a keyframe in all of them."""
        requested = self._keyframe_requested.is_set()
        if requested:
            self._keyframe_requested.clear()
        since = self._since_keyframe
        key = force or requested or since is None or since + 1 >= self.keyframe_interval_frames
        self._since_keyframe = 0 if key else (since or 0) + 1
        return key

    def encode(
        self, index: int, frame: av.VideoFrame, capture_time_us: int, *, key: bool
    ) -> list[MediaMessage]:
        """Encode one source frame for rendition ``index`` (scaled to its size)."""
        return self.encoders[index].encode(frame, capture_time_us, force_keyframe=key)

    def close(self) -> None:
        """Release every codec context."""
        for encoder in self.encoders:
            encoder.close()


@dataclass
class RenditionStats:
    """One rendition's counters (capture thread)."""

    frames_encoded: int = 0
    keyframes_encoded: int = 0
    bytes_encoded: int = 0
    frames_dropped: int = 0
    encode_seconds: float = 0.0


class RenditionPipeline(CapturePipeline):
    """The capture thread for a rendition set (see the module docstring).

    ``stats`` counts source frames (captured, encoded in at least one rendition, offline
    for all) and, in ``frames_dropped``, rendition frames dropped at the source because
    their connection was behind; ``rendition_stats`` has each rendition's own counters.

    ``sinks`` are the renditions' connections in the set's order (a
    :class:`~.rendition_publisher.RenditionPublisher`'s ``publishers``); ``renditions`` is
    the set they publish, for the meta.
    """

    def __init__(
        self,
        source: FrameSource,
        encoders: RenditionEncoders,
        sinks: Sequence[MediaSink],
        renditions: RenditionSet,
        *,
        reactor: Any,
        fps: Fraction,
        monotonic: Callable[[], float] = time.monotonic,
        thumbnails: ThumbnailMaker | None = None,
        send_thumbnail: Callable[[bytes], None] | None = None,
        meta_extra: Mapping[str, Any] | None = None,
        idle_clock: IdleClock | None = None,
    ) -> None:
        if len(sinks) != len(encoders.encoders):
            raise ValueError("need one sink per rendition")
        # The base class closes "its" encoder when the thread ends: give it the set.
        super().__init__(
            source,
            encoders.encoders[0],
            sinks[0],
            reactor=reactor,
            fps=fps,
            monotonic=monotonic,
            thumbnails=thumbnails,
            send_thumbnail=send_thumbnail,
            meta_extra=meta_extra,
            idle_clock=idle_clock,
        )
        self._encoder_set = encoders
        self._sinks = tuple(sinks)
        self._rendition_set = renditions
        # Renditions that wait for a keyframe: skipped or dropped frames, or not started.
        self._waiting = [True] * len(self._sinks)
        self.rendition_stats = tuple(RenditionStats() for _ in self._sinks)

    def request_keyframe(self) -> None:
        """Make the next source frame a keyframe in every rendition. Any thread."""
        self._encoder_set.request_keyframe()

    def run_once(self, frame_index: int, elapsed: float, force_keyframe: bool) -> bool:
        """Capture one source frame and encode it into every rendition that can take it."""
        captured = self._source.read(frame_index, elapsed)
        stats = self.stats
        stats.frames_captured += 1
        readiness = [sink.readiness for sink in self._sinks]
        ready = [value is Readiness.READY for value in readiness]
        for index, value in enumerate(readiness):
            if value is not Readiness.READY:
                # Offline (or idle) skips the frame, congested drops it: either way the
                # rendition's stream now has a gap and must resume at a keyframe.
                self._waiting[index] = True
                if value is Readiness.CONGESTED:
                    self.rendition_stats[index].frames_dropped += 1
                    stats.frames_dropped += 1
        if not any(ready):
            if not any(value is Readiness.CONGESTED for value in readiness):
                stats.frames_offline += 1
            return True
        # A rendition back from a gap asks for a keyframe: for everyone, to stay aligned.
        recovering = any(r and w for r, w in zip(ready, self._waiting, strict=True))
        key = self._encoder_set.next_is_keyframe(force_keyframe or recovering)
        started = time.perf_counter()
        for index, sink in enumerate(self._sinks):
            if not ready[index] or (self._waiting[index] and not key):
                continue
            rendition_started = time.perf_counter()
            messages = self._encoder_set.encode(
                index, captured.frame, captured.capture_time_us, key=key
            )
            rendition_stats = self.rendition_stats[index]
            rendition_stats.encode_seconds += time.perf_counter() - rendition_started
            rendition_stats.frames_encoded += 1
            self._waiting[index] = self._hand_off_rendition(index, sink, messages)
        stats.encode_seconds += time.perf_counter() - started
        stats.frames_encoded += 1
        if key:
            stats.keyframes_encoded += 1
        self._offer_thumbnail(captured.frame)
        return False

    def _hand_off_rendition(
        self, index: int, sink: MediaSink, messages: list[MediaMessage]
    ) -> bool:
        """Pass one rendition's messages to its connection; True if a frame was refused
        (the rendition then waits for the next keyframe)."""
        refused = False
        rendition = self._rendition_set.renditions[index]
        rendition_stats = self.rendition_stats[index]
        encoder = self._encoder_set.encoders[index]
        for message in messages:
            size = message.size - HEADER_SIZE
            rendition_stats.bytes_encoded += size
            self.stats.bytes_encoded += size
            if message.is_config:
                base_meta = encoder.meta(**self._meta_extra)
                if base_meta is not None:
                    meta = rendition_meta(
                        base_meta, rendition, self._rendition_set, self._encoder_set.codecs
                    )
                    sink.send_meta_threadsafe(meta)
                sink.send_config_threadsafe(message.payload, message.capture_time_us)
                continue
            if message.is_key:
                rendition_stats.keyframes_encoded += 1
            accepted = sink.send_frame_threadsafe(
                message.payload, key=message.is_key, capture_time_us=message.capture_time_us
            )
            refused = refused or not accepted
        return refused

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            # The base class closed the top encoder; the others are released here.
            self._encoder_set.close()


__all__ = ["RenditionEncoders", "RenditionPipeline", "RenditionStats", "probe_codec_string"]
