"""The publisher's audio: capture or generate it, encode Opus, hand it to the network side.

``--audio`` picks the source (docs/protocol.md, "Audio", is the wire side):

- ``tone``: a quiet 440 Hz tone with a loud 1 kHz beep of 100 ms that starts exactly at
  the capture time of every test-pattern frame whose counter is a multiple of
  :data:`~.testpattern.BEAT_FRAMES` (the frame that also shows the white flash square), so
  a test can check A/V sync;
- ``file``: the audio of the ``--source file:PATH`` file, looped with it;
- ``source``: the audio of a remuxed file or URL source, demuxed with its video
  (:mod:`.remux_audio`: Opus passed through, anything else transcoded to Opus);
  ``file`` means the same for a remuxed file;
- ``device[:NAME]``: a capture device through FFmpeg: ALSA here (``default`` when no
  NAME; PulseAudio's ``pulse`` input where this FFmpeg has it, as ``device:pulse:NAME``);
  on Windows DirectShow (``device:Microphone (Realtek Audio)``), on macOS AVFoundation
  (``device::0``, the first audio device);
- ``none``.

Opus (PyAV's libopus) at 48 kHz in 20 ms packets, ``application=lowdelay``; each
packet's capture time is that of its first decoded sample on the same wall clock as the
video's capture times (libopus's priming samples included: a decoder that does not skip
them, such as WebCodecs without a description, stays in sync).  Everything runs in a
thread of its own; the reactor only receives finished packets through a bounded handoff.
While an on-demand publisher is idle the thread pauses its source (a device is closed, a
file's clock stops with its picture's) and sleeps until woken (:meth:`AudioPipeline.wake`,
called with the video's keyframe request when the publisher turns active).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import av
from twisted.internet import defer
from twisted.python.failure import Failure

from .audio_sources import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    AudioBlock,
    AudioSource,
    DeviceAudioSource,
    FileAudioSource,
    ToneSource,
    audio_device_input,
)
from .client import Readiness
from .idleclock import IdleClock
from .mediathread import close_and_report, join, start_daemon, wait_while_idle
from .sources import SourceError

# How often an idle audio thread checks its sink when nothing wakes it.

AUDIO_KINDS = ("tone", "file", "source", "device", "none")


@dataclass(frozen=True, slots=True)
class AudioSpec:
    """A parsed ``--audio`` value."""

    kind: str
    target: str | None = None

    def describe(self) -> str:
        """Human-readable form, e.g. ``device:default``."""
        return self.kind if self.target is None else f"{self.kind}:{self.target}"


def parse_audio_spec(text: str) -> AudioSpec:
    """Parse ``tone``, ``file``, ``device[:NAME]`` or ``none`` (ValueError otherwise)."""
    kind, separator, target = text.partition(":")
    if kind not in AUDIO_KINDS or (separator and kind != "device"):
        raise ValueError(f"unknown audio {text!r}: use tone, file, source, device[:NAME] or none")
    return AudioSpec(kind, target or None)


def default_audio(source_kind: str) -> AudioSpec:
    """What ``--audio`` defaults to: the tone for the test pattern, the file's own audio
    for a file (none when it has no audio track), the source's own for a URL (none when
    it turns out to have none), none for screen and camera."""
    return AudioSpec({"testsrc": "tone", "file": "file", "url": "source"}.get(source_kind, "none"))


def audio_meta(channels: int) -> dict[str, Any]:
    """The ``audio`` member of ``meta``."""
    return {"codec": "opus", "sample_rate": SAMPLE_RATE, "channels": channels}


def open_audio_source(
    spec: AudioSpec, channels: int, file_path: str | None, idle_clock: IdleClock | None = None
) -> AudioSource:
    """Open the source ``spec`` names (``file`` needs the video's file path, and shares
    ``idle_clock`` with the video's pipeline to stay in step with it across idle periods)."""
    if spec.kind == "tone":
        return ToneSource(channels)
    if spec.kind == "file":
        if file_path is None:
            raise SourceError("--audio file needs --source file:PATH")
        return FileAudioSource(file_path, channels, idle_clock)
    if spec.kind == "device":
        return DeviceAudioSource(audio_device_input(spec.target), channels, spec.describe())
    if spec.kind == "source":
        raise SourceError("--audio source needs a file or URL source without --renditions")
    raise SourceError(f"no audio source for {spec.describe()}")


class OpusEncoder:
    """libopus through PyAV: 20 ms blocks in, ``(packet, capture time)`` out.

    A packet's capture time is that of its first decoded sample: libopus reports its
    priming delay in the packet's pts, which maps back through the blocks' capture times.
    """

    def __init__(self, channels: int = 1, bitrate: int = 64_000) -> None:
        if channels not in (1, 2):
            raise ValueError("channels must be 1 or 2")
        self.channels = channels
        self.bitrate = bitrate
        self._layout = "stereo" if channels == 2 else "mono"
        context: Any = av.CodecContext.create("libopus", "w")
        context.sample_rate = SAMPLE_RATE
        context.layout = self._layout
        context.format = "s16"
        context.bit_rate = bitrate
        context.time_base = Fraction(1, SAMPLE_RATE)
        context.options = {"application": "lowdelay", "frame_duration": "20"}
        context.open()
        self._context = context
        self._pts = 0
        # (pts, capture time) of recent blocks: packets map back through them.
        self._blocks: deque[tuple[int, int]] = deque(maxlen=16)

    def encode(self, block: AudioBlock) -> list[tuple[bytes, int]]:
        """Encode one block; the packets it completes, with their capture times."""
        frame = av.AudioFrame(format="s16", layout=self._layout, samples=FRAME_SAMPLES)
        frame.planes[0].update(block.samples)
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        frame.time_base = Fraction(1, SAMPLE_RATE)
        self._blocks.append((self._pts, block.capture_time_us))
        self._pts += FRAME_SAMPLES
        return [
            (bytes(packet), self._capture_of(packet.pts)) for packet in self._context.encode(frame)
        ]

    def _capture_of(self, pts: int | None) -> int:
        blocks = self._blocks
        anchor = blocks[0]
        for entry in blocks:
            if pts is not None and entry[0] <= pts:
                anchor = entry
        offset = 0 if pts is None else pts - anchor[0]
        return max(0, anchor[1] + offset * 1_000_000 // SAMPLE_RATE)

    def close(self) -> None:
        """Nothing to flush: a live stream's last 20 ms do not matter."""


def _sending(readiness: Readiness) -> bool:
    # Audio goes out while the video does, and while the video is congested too (audio
    # is small, and the outbox drops it alone when full).
    return readiness is Readiness.READY or readiness is Readiness.CONGESTED


class FanOutAudioSink:
    """One audio track for several connections (renditions of one picture each carry the
    same audio, so a viewer's audio follows whichever rendition it is on)."""

    def __init__(self, sinks: Sequence[AudioSink]) -> None:
        if not sinks:
            raise ValueError("need at least one sink")
        self._sinks = tuple(sinks)

    @property
    def readiness(self) -> Readiness:
        """READY when any connection takes audio now, else the first one's state."""
        for sink in self._sinks:
            readiness = sink.readiness
            if _sending(readiness):
                return Readiness.READY
        return self._sinks[0].readiness

    def send_audio_threadsafe(self, payload: bytes, capture_time_us: int) -> bool:
        """Send to every connection that takes audio now; True when one accepted it."""
        accepted = False
        for sink in self._sinks:
            if _sending(sink.readiness):
                accepted = sink.send_audio_threadsafe(payload, capture_time_us) or accepted
        return accepted


class AudioSink(Protocol):
    """What the audio thread needs from the network side (a Publisher has it)."""

    @property
    def readiness(self) -> Readiness:
        """READY, CONGESTED or OFFLINE; read from the audio thread."""
        ...

    def send_audio_threadsafe(self, payload: bytes, capture_time_us: int) -> bool:
        """Queue one Opus packet for the reactor thread; False when dropped."""
        ...


@dataclass
class AudioStats:
    """Counters written by the audio thread."""

    blocks: int = 0
    packets: int = 0
    bytes_encoded: int = 0
    offline: int = 0
    dropped: int = 0
    idle_periods: int = 0


class AudioPipeline:
    """Runs source -> Opus -> sink in a thread of its own.  While the publisher is
    offline blocks are read (the source keeps its pace) but not encoded; while it is idle
    the source is paused and nothing is read."""

    def __init__(
        self, source: AudioSource, encoder: OpusEncoder, sink: AudioSink, *, reactor: Any
    ) -> None:
        self._source = source
        self._encoder = encoder
        self._sink = sink
        self._reactor = reactor
        self._stop = threading.Event()
        # Set to wake an idle audio thread (the publisher turned active, or stop).
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished: defer.Deferred[None] = defer.Deferred()
        self.stats = AudioStats()

    def start(self) -> None:
        """Start the audio thread."""
        self._thread = start_daemon(self._thread, self._run, "streamrelay-audio", "audio pipeline")

    def stop(self) -> None:
        """Ask the audio thread to finish. Any thread."""
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """Look at the sink again now: an idle thread resumes if it is no longer IDLE.
        Any thread (the publisher's keyframe request, as for the video)."""
        self._wake.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the audio thread; True if it has ended."""
        return join(self._thread, timeout)

    def when_finished(self) -> defer.Deferred[None]:
        """Fires in the reactor thread when the audio thread ends (errback on failure)."""
        return self._finished

    def run_once(self) -> bool:
        """Read, encode and hand off one block; False once stopped.  Public so that
        tests can drive it without a thread."""
        if self._sink.readiness is Readiness.IDLE:
            self._wait_while_idle()
            return not self._stop.is_set()
        block = self._source.read(self._stop)
        if block is None:
            return False
        stats = self.stats
        stats.blocks += 1
        if not _sending(self._sink.readiness):
            # Offline, or any state in which no media goes out (idle on demand).
            stats.offline += 1
            return True
        for payload, capture_time_us in self._encoder.encode(block):
            stats.packets += 1
            stats.bytes_encoded += len(payload)
            if not self._sink.send_audio_threadsafe(payload, capture_time_us):
                stats.dropped += 1
        return True

    def _wait_while_idle(self) -> None:
        """Sleep while the sink is IDLE, the source paused (a device closed, a file's
        clock stopped)."""
        self.stats.idle_periods += 1
        self._source.pause()
        wait_while_idle(self._sink, self._stop, self._wake)
        if not self._stop.is_set():
            self._source.resume()

    def _run(self) -> None:
        outcome: Failure | None = None
        try:
            while not self._stop.is_set() and self.run_once():
                pass
        except BaseException:
            outcome = Failure()
        finally:
            close_and_report(self._reactor, self._finished, outcome, self._source, self._encoder)


@dataclass(frozen=True, slots=True)
class PublisherAudio:
    """A publisher's audio, ready to start: its pipeline and its ``meta`` member."""

    pipeline: AudioPipeline
    meta: dict[str, Any]
    description: str


def start_audio(
    options: Any,
    video_source: Any,
    sink: AudioSink,
    reactor: Any,
    idle_clock: IdleClock | None = None,
) -> PublisherAudio | None:
    """The audio ``options.audio`` asks for, wired to ``sink`` (the tone to the test
    pattern's beats, a file's audio to ``idle_clock``, the video pipeline's); None
    without audio.  Raises SourceError or ValueError."""
    spec: AudioSpec | None = options.audio
    if spec is None:
        return None
    channels = 1 if spec.kind == "tone" else 2
    file_path = options.source.target if options.source.kind == "file" else None
    source = open_audio_source(spec, channels, file_path, idle_clock)
    if isinstance(source, ToneSource):
        if not hasattr(video_source, "on_beat"):
            source.close()
            raise ValueError("--audio tone goes with the test pattern (--source testsrc)")
        video_source.on_beat = source.mark
    encoder = OpusEncoder(channels, 64_000 if channels == 1 else 96_000)
    return PublisherAudio(
        AudioPipeline(source, encoder, sink, reactor=reactor),
        audio_meta(channels),
        f"{source.description}, Opus 48 kHz {'mono' if channels == 1 else 'stereo'}",
    )
