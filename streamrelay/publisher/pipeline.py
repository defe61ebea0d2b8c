"""The capture thread: read frames, drop them at the source when the network is behind,
encode the rest and hand the messages to the reactor thread.

The reactor never waits for the encoder, and the encoder never queues without bound: before
encoding each raw frame the thread asks the sink (a :class:`~.client.Publisher`) whether it
is READY. When it is CONGESTED (its outbox is over the high-water mark, or too many handed-
off frames still wait for the reactor) the raw frame is dropped and counted, and the next
frame encoded is forced to be a keyframe so the stream stays decodable. While OFFLINE frames
are skipped without encoding (not counted as drops) and the first frame after is a keyframe.
While IDLE (on demand, nobody watches) nothing is captured or encoded: the thread pauses the
source and sleeps until woken (:meth:`CapturePipeline.request_keyframe`, which the publisher
calls when it turns active), then starts again from a keyframe. The stream's clock stops
meanwhile (a file resumes where it paused): it is an :class:`~.idleclock.IdleClock`, which
the audio thread of a file shares so that picture and sound stay in step. A listening
network source (``drain_while_paused``) is read on meanwhile, and what it sends skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from streamrelay.wire import HEADER_SIZE, MediaMessage

from .client import Readiness
from .codecs import VideoEncoder
from .idleclock import IdleClock
from .mediathread import close_and_report, join, start_daemon, wait_while_idle
from .sources import FrameSource
from .thumbnail import ThumbnailMaker

# How often an idle capture thread checks its sink when nothing wakes it.


class MediaSink(Protocol):
    """What the capture thread needs from the network side (a Publisher has all of it)."""

    @property
    def readiness(self) -> Readiness:
        """READY, CONGESTED or OFFLINE; read from the capture thread."""
        ...

    def send_meta_threadsafe(self, meta: Mapping[str, Any]) -> None:
        """Queue a meta message for the reactor thread."""
        ...

    def send_config_threadsafe(self, payload: bytes, capture_time_us: int | None = None) -> None:
        """Queue a CONFIG for the reactor thread."""
        ...

    def send_frame_threadsafe(
        self, payload: bytes, *, key: bool, capture_time_us: int | None = None
    ) -> bool:
        """Queue a frame for the reactor thread; False if it was dropped at the handoff."""
        ...


@dataclass
class PipelineStats:
    """Counters written by the capture thread (plain int updates; read anywhere)."""

    frames_captured: int = 0
    frames_encoded: int = 0
    frames_dropped: int = 0
    frames_offline: int = 0
    keyframes_encoded: int = 0
    bytes_encoded: int = 0
    encode_seconds: float = 0.0
    idle_periods: int = 0


class CapturePipeline:
    """Runs source -> encoder -> sink in a thread of its own (see the module docstring)."""

    def __init__(
        self,
        source: FrameSource,
        encoder: VideoEncoder,
        sink: MediaSink,
        *,
        reactor: Any,
        fps: Fraction,
        meta_extra: Mapping[str, Any] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        thumbnails: ThumbnailMaker | None = None,
        send_thumbnail: Callable[[bytes], None] | None = None,
        idle_clock: IdleClock | None = None,
    ) -> None:
        self._source = source
        self._encoder = encoder
        self._sink = sink
        self._reactor = reactor
        self._frame_interval = 1.0 / float(fps)
        self._meta_extra = dict(meta_extra or {})
        self._monotonic = monotonic
        self._stop_requested = threading.Event()
        # Set to wake an idle capture thread (a keyframe request, or stop).
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished: defer.Deferred[None] = defer.Deferred()
        self.stats = PipelineStats()
        # A JPEG of the picture every few seconds, made here on the capture thread.
        self.thumbnails = thumbnails if send_thumbnail is not None else None
        self._send_thumbnail = send_thumbnail
        #: Time spent idle, by which the stream's clock is held back.
        self.idle_clock = idle_clock if idle_clock is not None else IdleClock(monotonic)

    def start(self) -> None:
        """Start the capture thread."""
        self._thread = start_daemon(self._thread, self._run, "streamrelay-capture", "pipeline")

    def stop(self) -> None:
        """Ask the capture thread to finish after the current frame. Any thread."""
        self._stop_requested.set()
        self._wake.set()
        self._source.interrupt()  # a network source waiting to reopen gives up

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the capture thread; True if it has ended."""
        return join(self._thread, timeout)

    def request_keyframe(self) -> None:
        """Make the next encoded frame a keyframe. Any thread.

        The encoder keeps the request (see :meth:`.H264Encoder.request_keyframe`): a frame
        skipped at the source leaves it pending for the next one encoded.
        """
        self._encoder.request_keyframe()
        self._wake.set()

    def when_finished(self) -> defer.Deferred[None]:
        """Fires in the reactor thread when the capture thread ends (errback on failure)."""
        return self._finished

    def run_once(self, frame_index: int, elapsed: float, force_keyframe: bool) -> bool:
        """Capture one frame and encode or drop it; return whether the next must be a KEY.

        The body of the capture loop, public so that tests can drive it without a thread.
        """
        captured = self._source.read(frame_index, elapsed)
        stats = self.stats
        stats.frames_captured += 1
        readiness = self._sink.readiness
        if readiness is Readiness.OFFLINE or readiness is Readiness.IDLE:
            stats.frames_offline += 1
            return True
        if readiness is Readiness.CONGESTED:
            stats.frames_dropped += 1
            return True
        started = time.perf_counter()
        messages = self._encoder.encode(
            captured.frame, captured.capture_time_us, force_keyframe=force_keyframe
        )
        stats.encode_seconds += time.perf_counter() - started
        stats.frames_encoded += 1
        needs_keyframe = self._hand_off(messages)
        self._offer_thumbnail(captured.frame)
        return needs_keyframe

    def _offer_thumbnail(self, frame: Any) -> None:
        """Make and send a thumbnail of ``frame`` when one is due; called after the frame
        is on its way, so the thumbnail never delays a frame."""
        if self.thumbnails is not None and self._send_thumbnail is not None:
            jpeg = self.thumbnails.maybe_make(frame)
            if jpeg is not None:
                self._send_thumbnail(jpeg)

    def _hand_off(self, messages: list[MediaMessage]) -> bool:
        """Pass encoded messages to the sink; True if a frame was refused (KEY needed)."""
        needs_keyframe = False
        for message in messages:
            self.stats.bytes_encoded += message.size - HEADER_SIZE
            if message.is_config:
                # meta goes first: its codec string comes from this very SPS.
                meta = self._encoder.meta(**self._meta_extra)
                if meta is not None:
                    self._sink.send_meta_threadsafe(meta)
                self._sink.send_config_threadsafe(message.payload, message.capture_time_us)
                continue
            if message.is_key:
                self.stats.keyframes_encoded += 1
            accepted = self._sink.send_frame_threadsafe(
                message.payload, key=message.is_key, capture_time_us=message.capture_time_us
            )
            needs_keyframe = needs_keyframe or not accepted
        return needs_keyframe

    def _wait_while_idle(self) -> None:
        """Sleep while the sink is IDLE, the source paused and the clock stopped."""
        self.stats.idle_periods += 1
        self.idle_clock.pause()
        self._source.pause()
        # A listening source's pusher keeps sending: read on, send nothing.
        drain = self._drain_while_idle if self._source.drain_while_paused else None
        wait_while_idle(self._sink, self._stop_requested, self._wake, drain)
        if not self._stop_requested.is_set():
            self._source.resume()
            self.idle_clock.resume()

    def _drain_while_idle(self) -> None:
        self._source.read(0, 0.0)
        self.stats.frames_offline += 1

    def _run(self) -> None:
        interval = self._frame_interval
        origin = self._monotonic()
        next_due = origin
        frame_index = 0
        force_keyframe = True
        outcome: Failure | None = None
        try:
            while not self._stop_requested.is_set():
                if self._sink.readiness is Readiness.IDLE:
                    self._wait_while_idle()
                    next_due = self._monotonic()
                    force_keyframe = True
                    continue
                # The stream's clock is held back by the time spent idle (by this thread
                # or, first, by the audio thread): a file resumes where it paused.
                started = origin + self.idle_clock.paused_seconds()
                if not self._source.live:
                    delay = next_due - self._monotonic()
                    if delay > 0:
                        if self._stop_requested.wait(delay):
                            break
                    elif delay < -2 * interval:
                        # Encoding is slower than real time: carry on from now rather
                        # than burst to catch up on frames that are already late.
                        next_due = self._monotonic()
                    elapsed = next_due - started
                else:
                    elapsed = self._monotonic() - started
                force_keyframe = self.run_once(frame_index, elapsed, force_keyframe)
                frame_index += 1
                next_due += interval
        except BaseException:
            outcome = Failure()
        finally:
            close_and_report(self._reactor, self._finished, outcome, self._source, self._encoder)
