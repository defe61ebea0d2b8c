"""A remuxed source's own audio track, on the wire as Opus, in the source thread.

:class:`SourceAudio` takes the audio packets that :class:`~.remux.SourcePipeline`
demuxes along with the video, each with its capture time on the video's timeline (the
pipeline maps the packet's PTS through the same :class:`~.timeline.MediaTimeline` and
clock as the video, so audio and video sampled together carry the same capture time):

- **Opus** (mono or stereo) is passed through packet for packet, bytes untouched, no
  decoding. The capture time is the packet's PTS mapped onto the wire clock; containers
  give the first packet the PTS minus the pre-skip, which is what the wire's Opus profile
  asks for (docs/protocol.md, "Audio": a decoder that does not skip the priming samples
  stays in sync).
- **Anything else** (AAC, MP3, AC-3, PCM, Opus with more than two channels) is decoded,
  resampled to 48 kHz s16 and encoded with the publisher's :class:`~.audio.OpusEncoder`
  (about 3 % of a core for 44.1 kHz stereo AAC, 0.5 % for passing Opus through).
  Blocks keep the capture time of their first sample: the decoded frames' PTS anchor
  the FIFO, which starts afresh (a new resampler and encoder, what they held dropped)
  when the source's timestamps jump by more than :data:`RESYNC_US`, or after the
  publisher was offline.

A live source whose video must be transcoded carries its audio through
:class:`AudioCarryingSource`: the decoding source demuxes the audio packets from the same
container as the video and hands them to a :class:`SourceAudio`, stamped through a
:class:`~.timeline.CaptureTimeMap` (the video frames are stamped when decoded; the audio
PTS follow the latest frame's PTS-to-capture offset). A file whose video must be
transcoded keeps its audio through :func:`file_audio` (the file's own reader, as for a
captured source, paced as the transcoder paces the video but not on a shared timeline).

Audio goes out while the video is READY or CONGESTED (it is small, and the outbox drops
it alone when full), never while the publisher is offline or idle on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import av
from twisted.logger import Logger

from .audio import AudioPipeline, OpusEncoder, audio_meta
from .audio_sources import (
    FRAME_SAMPLES,
    FRAME_US,
    SAMPLE_RATE,
    AudioBlock,
    FileAudioSource,
    _Resampled,
    file_has_audio,
)
from .client import Readiness
from .sources import DeviceInput, DeviceSource
from .timeline import MICROSECONDS, CaptureTimeMap

_log = Logger()

#: A transcoded track whose timestamps stray further than this from the samples
#: counted since the last anchor is re-anchored (a jump, a loop, a gap in the source).
RESYNC_US = 60_000
PASSED_THROUGH = "audio: Opus passed through"


@dataclass
class SourceAudioStats:
    """Counters written by the source thread."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    untimed: int = 0
    offline: int = 0
    dropped: int = 0
    undecodable: int = 0
    resyncs: int = 0


class SourceAudio:
    """One source audio stream into Opus packets for ``sink`` (see the module docstring).

    ``sink`` has ``readiness`` and ``send_audio_threadsafe`` (a Publisher).
    """

    def __init__(self, stream: Any, sink: Any) -> None:
        context = stream.codec_context
        self.codec_name: str = context.name
        source_channels = int(getattr(context, "channels", 0) or 2)
        self.passthrough = self.codec_name == "opus" and source_channels in (1, 2)
        self.channels = source_channels if self.passthrough else min(2, source_channels)
        self._sink = sink
        self.stats = SourceAudioStats()
        self._stream = stream
        self._encoder: OpusEncoder | None = None
        self._resampled: _Resampled | None = None
        self._anchor_us: int | None = None
        self._used = False
        if self.passthrough:
            self.mode = PASSED_THROUGH
        else:
            self._encoder = OpusEncoder(self.channels, 64_000 if self.channels == 1 else 96_000)
            self._resampled = _Resampled(self.channels)
            self.mode = f"audio: {_codec_label(self.codec_name)} transcoded to Opus"

    @property
    def meta(self) -> dict[str, Any]:
        """The ``audio`` member of ``meta``."""
        return audio_meta(self.channels)

    def handle(self, packet: Any, capture_time_us: int | None) -> None:
        """One demuxed packet of the stream, stamped on the video's clock (None: it
        cannot be placed yet, e.g. before the first video frame)."""
        stats = self.stats
        stats.packets_in += 1
        if capture_time_us is None:
            stats.untimed += 1
            self._anchor_us = None
            return
        if not _sending(self._sink.readiness):
            stats.offline += 1
            # Samples held back would be sent with stale times: start afresh.
            self._anchor_us = None
            return
        if self.passthrough:
            self._send(bytes(packet), capture_time_us)
            return
        try:
            frames = packet.decode()
        except (av.FFmpegError, ValueError):
            stats.undecodable += 1
            return
        for frame in frames:
            self._transcode(frame, capture_time_us, packet)

    def _transcode(self, frame: Any, packet_capture_us: int, packet: Any) -> None:
        resampled, encoder = self._resampled, self._encoder
        assert resampled is not None and encoder is not None
        # The frame's own time, relative to its packet's (decoders may hold samples).
        offset_us = 0
        if frame.pts is not None and packet.pts is not None and frame.time_base is not None:
            offset_us = int((frame.pts * frame.time_base - packet.pts * packet.time_base) * 1e6)
        frame_capture_us = packet_capture_us + offset_us
        expected_us = (
            None
            if self._anchor_us is None
            else self._anchor_us + resampled.samples * 1_000_000 // SAMPLE_RATE
        )
        if expected_us is None or abs(frame_capture_us - expected_us) > RESYNC_US:
            if expected_us is not None:
                self.stats.resyncs += 1
            if self._used:
                # Afresh: samples the resampler and encoder hold would be stamped on
                # the wrong side of the jump (or gap).
                resampled = self._resampled = _Resampled(self.channels)
                encoder = self._encoder = OpusEncoder(self.channels, encoder.bitrate)
            self._anchor_us = frame_capture_us
        self._used = True
        resampled.add(frame)
        while resampled.samples >= FRAME_SAMPLES:
            samples = resampled.take()
            assert samples is not None and self._anchor_us is not None
            block = AudioBlock(samples, self._anchor_us)
            self._anchor_us += FRAME_US
            for payload, capture_us in encoder.encode(block):
                self._send(payload, capture_us)

    def _send(self, payload: bytes, capture_time_us: int) -> None:
        stats = self.stats
        stats.packets_out += 1
        stats.bytes_out += len(payload)
        if not self._sink.send_audio_threadsafe(payload, capture_time_us):
            stats.dropped += 1


class AudioCarryingSource(DeviceSource):
    """A live source decoded for transcoding (see :meth:`carrying`) that carries its
    first audio track along: audio packets demuxed with the video go to a
    :class:`SourceAudio` (a new one each time the source is opened), stamped through
    :attr:`times`. Used from the capture thread only, as every source."""

    times: CaptureTimeMap
    #: The track being carried (None: the source, as opened last, has no usable audio).
    audio: SourceAudio | None
    _audio_sink: Any
    _announced: int
    _first_container: Any
    _frame_pts_us: int | None

    @classmethod
    def carrying(
        cls,
        container: Any,
        width: int,
        height: int,
        description: str,
        sink: Any,
        reopen: DeviceInput | None = None,
    ) -> AudioCarryingSource:
        """Decode the open ``container`` (as :meth:`DeviceSource.from_container`) and
        carry its first audio track to ``sink``, which must have one (the caller checked
        ``container.streams.audio``)."""
        source = cls.from_container(container, width, height, description, reopen=reopen)
        assert isinstance(source, AudioCarryingSource)
        # The frame iterator is a generator: nothing has run before these are set.
        source.times = CaptureTimeMap()
        source._audio_sink = sink
        source._frame_pts_us = None
        source.audio = SourceAudio(container.streams.audio[0], sink)
        source._first_container = container
        #: The channel count the stream's ``meta`` announced (it goes out once).
        source._announced = source.audio.channels
        return source

    @property
    def meta(self) -> dict[str, Any]:
        """The ``audio`` member of ``meta``."""
        return audio_meta(self._announced)

    def read(self, frame_index: int, elapsed: float) -> Any:
        """The next picture, stamped at capture; its PTS and stamp placed on
        :attr:`times` for the audio that follows."""
        captured = super().read(frame_index, elapsed)
        if self._frame_pts_us is not None:
            self.times.note_frame(self._frame_pts_us, captured.capture_time_us)
            self._frame_pts_us = None
        return captured

    def _decode_frames(self, container: Any) -> Any:
        return self._demux(container)

    def _demux(self, container: Any) -> Any:
        video = container.streams.video[0]
        audio = self._audio_of(container)
        streams = [video] if audio is None else [video, container.streams.audio[0]]
        self.times.forget_frames()
        for packet in container.demux(*streams):
            if packet.stream_index != video.index:
                if audio is not None and packet.size and packet.pts is not None:
                    pts_us = int(packet.pts * packet.time_base * MICROSECONDS)
                    audio.handle(packet, self.times.capture_time(pts_us))
                continue
            for frame in packet.decode():
                self._frame_pts_us = (
                    None
                    if frame.pts is None or frame.time_base is None
                    else int(frame.pts * frame.time_base * MICROSECONDS)
                )
                yield frame

    def _audio_of(self, container: Any) -> SourceAudio | None:
        """The first container's track (made for ``meta``), or a new one for a reopened
        source: none when it has no audio or a channel count other than announced."""
        audio = self.audio
        if audio is not None and container is self._first_container:
            return audio
        self._first_container = None
        self.audio = None
        if not container.streams.audio:
            _log.warn("{source}: no audio since it was reopened", source=self.description)
            return None
        audio = SourceAudio(container.streams.audio[0], self._audio_sink)
        if audio.channels != self._announced:
            _log.warn(
                "{source}: the audio changed to {channels} channels when reopened; "
                "it is not carried (restart the publisher)",
                source=self.description,
                channels=audio.channels,
            )
            return None
        self.audio = audio
        return audio


def file_audio(path: str, sink: Any, reactor: Any) -> tuple[AudioPipeline, dict[str, Any]] | None:
    """For a file whose video is transcoded: its audio through the file's own reader
    (:class:`~.audio_sources.FileAudioSource`, paced as the transcoder paces the video),
    with the ``meta`` member; None when the file has no audio. Errors are logged."""
    if not file_has_audio(path):
        return None
    pipeline = AudioPipeline(
        FileAudioSource(path, 2), OpusEncoder(2, 96_000), sink, reactor=reactor
    )
    # The video goes on without its audio: say so (in the reactor thread).
    pipeline.when_finished().addErrback(
        lambda failure: _log.error("audio stopped: {why}", why=failure.getErrorMessage())
    )
    return pipeline, audio_meta(2)


def _sending(readiness: Readiness) -> bool:
    return readiness is Readiness.READY or readiness is Readiness.CONGESTED


def _codec_label(name: str) -> str:
    """``aac`` -> ``AAC``, ``mp3float`` -> ``MP3``: the codec as people name it."""
    return {"mp3float": "MP3", "mp3": "MP3", "ac3": "AC-3", "eac3": "E-AC-3"}.get(
        name, name.upper() if len(name) <= 4 else name
    )


__all__ = [
    "PASSED_THROUGH",
    "AudioCarryingSource",
    "SourceAudio",
    "SourceAudioStats",
    "file_audio",
]
