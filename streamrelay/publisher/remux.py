"""Publishing what a source already encoded: H.264 remuxed into the wire format, no decoding.

:class:`SourcePipeline` runs in a thread of its own (the reactor never waits for it) and
has the interface of :class:`~.pipeline.CapturePipeline`. It opens the source with PyAV
(anything FFmpeg opens: see :func:`~.sources.media_input`), looks at its first video
stream, and then either

- **remuxes** (H.264 without B-frames, 8-bit 4:2:0; HEVC likewise unless
  ``hevc_passthrough`` is False; ``force_transcode`` is ``--transcode``): demuxed
  packets become Annex-B access units (:class:`~.bitstream.AccessUnitConverter`: AVCC
  to Annex-B, access unit delimiters dropped, nothing else touched), which
  :class:`~.h264.H264Packager` (or :class:`~.hevc.HevcPackager`) turns into v1
  messages (CONFIG when the parameter sets change, parameter sets inserted before each
  KEY that lacks them); or
- **transcodes** what a browser cannot play as v1 H.264 (B-frames, other codecs, other
  pixel formats): it hands the open source to a :class:`~.pipeline.CapturePipeline` with
  the configured encoder, and says why in :attr:`SourcePipeline.mode`. A source that
  starts sending B-frames later (a picture out of presentation order) is handed over
  then, mid-stream.

Remuxing cannot honour keyframe requests: the source decides where its keyframes are.
A viewer that joins, or resumes after drops, starts at the source's next IDR, so the
source's GOP length is the worst-case join time (the relay's cache gives joiners the
current GOP at once). The first request is logged, with the GOP measured so far.

Drops: when the network is behind (the publisher is not READY, or the handoff refuses a
frame) the access unit is dropped and so is every one after it until the next IDR, so the
stream stays decodable. Demuxing continues meanwhile, so a live source never backs up;
nothing queues here.

Audio (:mod:`.remux_audio`, with ``audio_sink``): the source's first audio track is
demuxed with the video. Opus passes through packet for packet; any other codec (AAC...)
is decoded and re-encoded to Opus; :attr:`SourcePipeline.mode` says which. Audio PTS
are mapped through the video's timeline and clock, so audio and video keep their sync
(a paced file sends audio up to :data:`AUDIO_LEAD` seconds before it is due, so that a
file's interleaving never holds back the video). A transcoded live source carries its
audio through the decoding source (:class:`~.remux_audio.AudioCarryingSource`: demuxed
from the same container, mapped onto the decoded frames' capture times); a transcoded
file takes its audio from the file's own reader (:class:`~.audio_sources.FileAudioSource`).

Thumbnails (``thumbnails``): at most every interval, one KEY that was just handed off is
decoded by a decoder of its own (:class:`~.thumbnail.KeyframeThumbnails`); a transcoder
gets the maker and makes them from its decoded frames.

Timing (:mod:`.timeline`): a live source sets the pace and each access unit is stamped
from its PTS mapped onto the wall clock at arrival; a file (or a URL with a known
duration) is played at its own rate, each access unit sent when due and stamped with
that time, and looped forever. A live source that ends or fails is opened again with
backoff (an RTMP or SRT listener listens again), the stream continuing at the next IDR.

On demand, while the sink is IDLE (nobody watches): a paced file pauses, its clock held
back by the time idle (an :class:`~.idleclock.IdleClock`, shared with the file's audio so
that both stay in step) and resumes where it paused; a live source is closed (a camera's
stream, the network and the CPU are spared) and opened again when a viewer comes. Either
way the stream resumes at the source's next keyframe, which the status line says until
it has come. A listening source (a pusher connected to us) is not closed, since its
pusher might not come back: it is read on, and what it sends is skipped, not counted as
drops. The idle state is noticed at the next access unit that could go out (the next
keyframe, while the stream waits for one).

Over 400 lines: one thread's life (open, decide, remux or hand over, reopen) and the
state it carries across reopenings (timeline, packager, drop state, the audio's place on
the timeline) stay together; the audio's own work is in :mod:`.remux_audio`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from streamrelay.wire import HEADER_SIZE, MediaMessage, meta_message, now_us

from .bitstream import AccessUnitConverter, transcode_reason
from .client import Readiness
from .codecs import VideoEncoder
from .h264 import AnnexBPackager, H264Error
from .idleclock import IdleClock
from .mediathread import join, report_finished, start_daemon, wait_while_idle
from .pipeline import CapturePipeline, MediaSink, PipelineStats
from .remux_audio import AudioCarryingSource, SourceAudio, file_audio
from .sources import DeviceInput, DeviceSource, FileSource, MediaInput, SourceError
from .thumbnail import KeyframeThumbnails, ThumbnailMaker
from .timeline import MICROSECONDS, LiveClock, MediaTimeline, PacedClock

_log = Logger()

#: Seconds to wait for a network source to open, and for its next packet.
OPEN_TIMEOUT = 10.0
READ_TIMEOUT = 10.0
#: Reconnect delays for a live source that ended or failed, in seconds.
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)
#: A source GOP longer than this (seconds) is worth a warning: it is the join time.
LONG_GOP = 5.0
#: Seconds an access unit may wait for a congested sink before it is dropped.
CONGESTION_PATIENCE = 0.2
#: Seconds before it is due that a paced file's audio packet may go out.
AUDIO_LEAD = 0.2

REMUXING = "remuxing H.264 without re-encoding"
REMUXING_HEVC = "remuxing HEVC without re-encoding (browsers without HEVC decoding cannot play it)"
#: What an idle pipeline shows, and what it adds to its mode until the first keyframe.
IDLE_PAUSED = "idle: paused while nobody watches"
IDLE_CLOSED = "idle: source closed while nobody watches"
RESUMED = "; resumed, viewers start at the source's next keyframe"
#: How often an idle source thread checks its sink when nothing wakes it.


class _Reordering(Exception):
    """The source started sending B-frames (pictures out of presentation order)."""


@dataclass
class RemuxStats(PipelineStats):
    """:class:`~.pipeline.PipelineStats` plus what remuxing adds (capture thread writes)."""

    frames_waiting_for_key: int = 0
    frames_idle: int = 0
    frames_unreadable: int = 0
    source_opens: int = 0
    keyframe_requests_ignored: int = 0
    last_keyframe_interval: float | None = None


class SourcePipeline:
    """Source -> (remux | transcode) -> sink in a thread of its own; see the module docstring.

    ``encoder_factory`` makes the encoder when the source must be transcoded;
    ``frame_size`` and ``fps`` are the encoder's output then. ``meta_extra`` members go
    into every ``meta`` message.
    """

    def __init__(
        self,
        media: MediaInput,
        sink: MediaSink,
        *,
        reactor: Any,
        encoder_factory: Callable[[], VideoEncoder],
        frame_size: tuple[int, int],
        fps: Fraction,
        meta_extra: Mapping[str, Any] | None = None,
        force_transcode: bool = False,
        hevc_passthrough: bool = True,
        audio_sink: Any = None,
        thumbnails: ThumbnailMaker | None = None,
        send_thumbnail: Callable[[bytes], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock_us: Callable[[], int] = now_us,
        idle_clock: IdleClock | None = None,
    ) -> None:
        self._media = media
        self._sink = sink
        self._reactor = reactor
        self._encoder_factory = encoder_factory
        self._frame_size = frame_size
        self._fps = fps
        self._meta_extra = dict(meta_extra or {})
        self._force_transcode = force_transcode
        self._hevc_passthrough = hevc_passthrough
        self._audio_sink = audio_sink
        self._audio: SourceAudio | None = None
        self._audio_mode = ""
        self._last_audio_media_us: int | None = None
        self._last_audio_capture_us: int | None = None
        self._file_audio: Any = None
        self._thumbnails = thumbnails if send_thumbnail is not None else None
        self._send_thumbnail = send_thumbnail
        self._keyframe_thumbnails = (
            KeyframeThumbnails(thumbnails, send_thumbnail)
            if thumbnails is not None and send_thumbnail is not None
            else None
        )
        self._monotonic = monotonic
        self._wall_clock_us = wall_clock_us
        self._stop_requested = threading.Event()
        # Set to wake an idle source thread (the publisher turned active, or stop).
        self._wake = threading.Event()
        #: Time spent idle, by which a paced file's clock is held back.
        self.idle_clock = idle_clock if idle_clock is not None else IdleClock(monotonic)
        self._resumed = False
        self._idle_noticed = False
        self._remux_mode = REMUXING
        self._thread: threading.Thread | None = None
        self._inner: CapturePipeline | None = None
        self._finished: defer.Deferred[None] = defer.Deferred()
        self._own_stats = RemuxStats()
        self._packager: AnnexBPackager | None = None
        self._codec = ""
        self._paced = not media.live
        self._timeline: MediaTimeline | None = None
        self._live_clock = LiveClock()
        self._paced_clock = PacedClock()
        self._waiting_for_key = True
        self._patient = True
        self._last_key_media_us: int | None = None
        self._fps_value = float(fps)
        self._warned_unreadable = False
        self._told_keyframes = False
        self._access_units = 0
        self._warned_gop = False
        self.mode = "opening source"

    @property
    def mode(self) -> str:
        """What the pipeline is doing, with its audio, for the status line (any thread)."""
        return f"{self._mode}; {self._audio_mode}" if self._audio_mode else self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value

    @property
    def audio(self) -> SourceAudio | None:
        """The remuxed source's audio track, once one was found."""
        return self._audio

    # -- the CapturePipeline interface ---------------------------------------------------

    @property
    def stats(self) -> PipelineStats:
        """The counters of whichever pipeline runs (the transcoder's once it took over)."""
        return self._inner.stats if self._inner is not None else self._own_stats

    @property
    def remux_stats(self) -> RemuxStats:
        """The remuxer's own counters."""
        return self._own_stats

    @property
    def description(self) -> str:
        """The source, as it may be shown (no credentials)."""
        return self._media.description

    def start(self) -> None:
        """Start the source thread."""
        self._thread = start_daemon(self._thread, self._run, "streamrelay-source", "pipeline")

    def stop(self) -> None:
        """Ask the source thread (and a transcoder) to finish. Any thread."""
        self._stop_requested.set()
        self._wake.set()
        if self._inner is not None:
            self._inner.stop()
        if self._file_audio is not None:
            self._file_audio.stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the source thread (and a transcoder); True if they have ended."""
        if not join(self._thread, timeout):
            return False
        if self._file_audio is not None and not self._file_audio.join(timeout):
            return False
        return self._inner.join(timeout) if self._inner is not None else True

    def request_keyframe(self) -> None:
        """Forwarded to a transcoder; a remuxed stream cannot make one (logged once).
        Also wakes an idle source thread: the publisher asks for a keyframe when it turns
        active."""
        self._wake.set()
        if self._inner is not None:
            self._inner.request_keyframe()
            return
        stats = self._own_stats
        stats.keyframe_requests_ignored += 1
        interval = stats.last_keyframe_interval
        if self._told_keyframes or not self.mode.startswith("remuxing") or interval is None:
            return
        self._told_keyframes = True
        _log.info(
            "a keyframe was requested, which a remuxed stream cannot make: viewers start at "
            "the source's next keyframe (every {gop:.1f} s)",
            gop=interval,
        )

    def when_finished(self) -> defer.Deferred[None]:
        """Fires in the reactor thread when the pipeline ends (errback on failure)."""
        return self._finished

    # -- the source thread ---------------------------------------------------------------

    def _run(self) -> None:
        outcome: Failure | None = None
        handed_over = False
        try:
            handed_over = self._serve()
        except BaseException:
            outcome = Failure()
        finally:
            if not handed_over:
                self._reactor.callFromThread(report_finished, self._finished, outcome)

    def _serve(self) -> bool:
        """Open, remux, reopen; True once a transcoder has taken the source over."""
        media = self._media
        failures = 0
        while not self._stop_requested.is_set():
            container = self._open(failures)
            if container is None:
                failures += 1
                continue
            idled = False
            try:
                stream = container.streams.video[0]
                context = stream.codec_context
                reason = "--transcode" if self._force_transcode else None
                reason = reason or transcode_reason(
                    context.name,
                    bool(context.has_b_frames),
                    context.pix_fmt,
                    hevc_passthrough=self._hevc_passthrough,
                )
                if reason is not None:
                    self._transcode(container, reason)
                    container = None
                    return True
                mode = REMUXING_HEVC if context.name == "hevc" else REMUXING
                if self.mode != mode and not self._resumed:
                    _log.info(
                        "{source}: {mode}; keyframe requests cannot be honoured, viewers "
                        "start at the source's keyframes",
                        source=media.description,
                        mode=mode,
                    )
                self._remux_mode = mode
                self.mode = mode + RESUMED if self._resumed else mode
                self._open_audio(container)
                idled = self._remux(container, stream)
            except _Reordering:
                self._transcode(container, "B-frames")
                container = None
                return True
            except (av.FFmpegError, OSError, IndexError) as error:
                if not media.live:
                    raise SourceError(
                        f"reading {media.description} failed: {self._scrub(error)}"
                    ) from None
                # PyAV's read timeout interrupts FFmpeg, which reports an "exit".
                why = (
                    f"no data for {READ_TIMEOUT:g} s"
                    if isinstance(error, av.ExitError)
                    else self._scrub(error)
                )
                _log.warn("source {source}: {why}", source=media.description, why=why)
            finally:
                if container is not None:
                    container.close()
            if self._stop_requested.is_set():
                break
            if idled:
                # A live source, closed above: opened again once a viewer comes.
                self._wait_while_idle(paced=False)
                failures = 0
                continue
            if self._paced:
                if self._access_units == 0:
                    raise SourceError(f"{media.description} holds no H.264 access units")
                continue  # loop the file
            failures = 0 if self._access_units else failures + 1
            self.mode = "source ended; reopening"
            _log.warn("source {source} ended; reopening it", source=media.description)
            self._stop_requested.wait(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
        return False

    def _open(self, failures: int) -> Any:
        """Open the source; None (after a pause) when a live source cannot be opened yet."""
        media = self._media
        self.mode = "waiting for a publisher to push" if media.listen else "opening source"
        timeout = (None if media.listen else OPEN_TIMEOUT, READ_TIMEOUT) if media.live else None
        try:
            container = av.open(media.url, options=dict(media.options), timeout=timeout)
            if not container.streams.video:
                container.close()
                raise SourceError(f"{media.description} has no video stream")
        except (av.FFmpegError, OSError, SourceError) as error:
            if not media.live or self._stop_requested.is_set():
                raise SourceError(
                    f"cannot open {media.description}: {self._scrub(error)}"
                ) from None
            delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
            self.mode = f"source unavailable, retrying in {delay:g} s"
            if failures == 0:
                _log.warn(
                    "cannot open {source} ({error}); retrying",
                    source=media.description,
                    error=self._scrub(error),
                )
            self._stop_requested.wait(delay)
            return None
        self._own_stats.source_opens += 1
        # A file on a web server has a duration, a live stream has none.
        self._paced = not media.live or (media.pace_if_finite and container.duration is not None)
        return container

    def _scrub(self, error: Exception) -> str:
        """An error's text without the source URL, which may hold credentials (FFmpeg
        errors quote it)."""
        return str(error).replace(self._media.url, self._media.description)

    def _open_audio(self, container: Any) -> None:
        """Take the source's first audio track along (when audio is wanted)."""
        if self._audio_sink is None:
            return
        if not container.streams.audio:
            self._audio, self._audio_mode = None, "no audio in the source"
            self._meta_extra.pop("audio", None)
            return
        audio = SourceAudio(container.streams.audio[0], self._audio_sink)
        if self._audio is None or audio.mode != self._audio.mode:
            _log.info("{source}: {mode}", source=self._media.description, mode=audio.mode)
        self._audio, self._audio_mode = audio, audio.mode
        # _last_audio_media_us is kept, as the timeline is: a looped file's or reopened
        # source's audio waits for its video to cross the discontinuity first.
        self._meta_extra["audio"] = audio.meta

    def _audio_capture_time(self, packet: Any) -> int | None:
        """An audio packet's capture time on the video's timeline and clock (a paced
        file's waits until AUDIO_LEAD before it is due); None when it cannot be placed."""
        timeline = self._timeline
        if timeline is None:
            return None
        media_us = timeline.media_time_of(packet.pts, packet.time_base)
        last = self._last_audio_media_us
        if media_us is None or (last is not None and media_us <= last):
            # Before the first video frame, or across a loop the video has not reached.
            return None
        self._last_audio_media_us = media_us
        if not self._paced:
            stamp = self._live_clock.time_of(media_us)
        else:
            stamp = self._paced_clock.time_of(media_us)
            if stamp is not None:
                delay = (stamp - self._wall_clock_us()) / MICROSECONDS - AUDIO_LEAD
                if delay > 0 and self._stop_requested.wait(delay):
                    return None
        last = self._last_audio_capture_us
        if stamp is None or (last is not None and stamp <= last):
            # The clock's offset dropped (a live source's first burst, or a late file
            # restarting its pace): audio stays in capture order, as the wire wants.
            return None
        self._last_audio_capture_us = stamp
        return stamp

    def _start_file_audio(self) -> None:
        """A transcoded file's audio: its own reader (a live source's is carried by its
        decoder, see _live_audio_source)."""
        if self._audio_sink is None:
            return
        self._audio = None
        found = None
        if self._paced:
            found = file_audio(self._media.url, self._audio_sink, self._reactor)
        if found is None:
            # A live source's is carried by its decoder (_live_audio_source).
            self._audio_mode = "no audio in the source"
            self._meta_extra.pop("audio", None)
            return
        self._file_audio, self._meta_extra["audio"] = found
        self._audio_mode = "audio: transcoded to Opus"
        if not self._stop_requested.is_set():
            self._file_audio.start()

    def _live_audio_source(
        self, container: Any, description: str, reopen: DeviceInput | None
    ) -> AudioCarryingSource | None:
        """A transcoded live source's decoder carrying its audio (when audio is wanted
        and the source has some); the status line and ``meta`` say so."""
        if self._audio_sink is None or not container.streams.audio:
            return None
        width, height = self._frame_size
        source = AudioCarryingSource.carrying(
            container, width, height, description, self._audio_sink, reopen=reopen
        )
        assert source.audio is not None
        self._audio_mode = source.audio.mode
        self._meta_extra["audio"] = source.meta
        _log.info("{source}: {mode}", source=description, mode=source.audio.mode)
        return source

    def _transcode(self, container: Any, reason: str) -> None:
        """Hand the source to an encoding pipeline, which reports when it finishes."""
        width, height = self._frame_size
        media = self._media
        self._start_file_audio()
        if not self._paced:
            # Closed while idle on demand and opened again on resume; not a listener,
            # whose pusher might not come back.
            reopen = DeviceInput(media.url, None, dict(media.options), (OPEN_TIMEOUT, READ_TIMEOUT))
            source: Any = self._live_audio_source(
                container, media.description, None if media.listen else reopen
            ) or DeviceSource.from_container(
                container,
                width,
                height,
                media.description,
                reopen=None if media.listen else reopen,
            )
            source.drain_while_paused = media.listen
        else:
            container.close()
            source = FileSource(media.url, width, height)
        encoder = self._encoder_factory()
        inner = CapturePipeline(
            source,
            encoder,
            self._sink,
            reactor=self._reactor,
            fps=self._fps,
            meta_extra=self._meta_extra,
            idle_clock=self.idle_clock,
            thumbnails=self._thumbnails,
            send_thumbnail=self._send_thumbnail,
        )
        inner.when_finished().chainDeferred(self._finished)
        self._inner = inner
        self.mode = f"transcoding: {reason}"
        _log.info(
            "{source}: {mode} (re-encoded at {width}x{height})",
            source=media.description,
            mode=self.mode,
            width=width,
            height=height,
        )
        if not self._stop_requested.is_set():
            inner.start()
        else:
            inner.stop()
            self._reactor.callFromThread(report_finished, self._finished, None)

    def _remux(self, container: Any, stream: Any) -> bool:
        """Remux until the source ends or a stop, counting the access units read; True
        when it stopped because the sink turned IDLE and the (live) source is to be
        closed meanwhile."""
        rate = stream.average_rate or stream.guessed_rate
        if rate:
            self._fps_value = float(rate)
        frame_us = int(MICROSECONDS / self._fps_value) if self._fps_value > 0 else 33_333
        if self._timeline is None:
            self._timeline = MediaTimeline(frame_duration_us=max(1, frame_us))
        converter = AccessUnitConverter(stream.codec_context.extradata, stream.codec_context.name)
        if self._packager is None or converter.codec != self._codec:
            self._packager, self._codec = converter.packager(), converter.codec
        packager = self._packager
        # A reopened source starts at its next IDR, like a viewer.
        self._waiting_for_key = True
        self._access_units = 0
        recent_pts: list[int] = []
        audio = self._audio
        streams = [stream] if audio is None else [stream, container.streams.audio[0]]
        for packet in container.demux(*streams):
            if self._stop_requested.is_set():
                break
            if not packet.size:
                continue
            if audio is not None and packet.stream_index != stream.index:
                audio.handle(packet, self._audio_capture_time(packet))
                continue
            if packet.has_sidedata("new_extradata"):
                converter.update_extradata(bytes(packet.get_sidedata("new_extradata")))
            try:
                access_unit = converter.convert(bytes(packet))
            except H264Error as error:
                self._unreadable(error)
                continue
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is not None:
                # Between the two before it: a B-frame (a jump back, a wrap or a restart
                # falls below both). has_b_frames said none when the source was opened.
                if len(recent_pts) == 2 and recent_pts[0] < pts < recent_pts[1]:
                    raise _Reordering()
                recent_pts = [*recent_pts[-1:], pts]
            media_us = self._timeline.advance(pts, packet.time_base)
            capture_us = self._capture_time(media_us)
            if capture_us is None:
                break
            parameter_sets = converter.take_parameter_sets()
            if parameter_sets is not None:
                self._hand_off(packager.package(parameter_sets, capture_us))
            if access_unit:
                # Read, not necessarily sent: a source is alive even while the network
                # is down and everything is dropped.
                self._access_units += 1
                self._deliver(packager, access_unit, capture_us, media_us)
                if self._idle_noticed:
                    self._idle_noticed = False
                    if self._paced:
                        self._wait_while_idle(paced=True)
                    elif not self._media.listen:
                        return True
        return False

    def _wait_while_idle(self, *, paced: bool) -> None:
        """Sleep while the sink is IDLE: a paced file's clock stopped, a live source
        closed by the caller. The stream then resumes at the source's next keyframe."""
        self._own_stats.idle_periods += 1
        if paced:
            self.idle_clock.pause()
        self.mode = IDLE_PAUSED if paced else IDLE_CLOSED
        wait_while_idle(self._sink, self._stop_requested, self._wake)
        if paced:
            self.idle_clock.resume()
        self._waiting_for_key = True
        self._resumed = True
        self.mode = (self._remux_mode if paced else "opening source") + RESUMED

    def _capture_time(self, media_us: int) -> int | None:
        """Stamp (live) or wait for and stamp (paced) one access unit; None on a stop."""
        if not self._paced:
            return self._live_clock.capture_time(media_us, self._wall_clock_us())
        # The paced clock runs on a wall clock that stood still while idle.
        paused_us = round(self.idle_clock.paused_seconds() * MICROSECONDS)
        due = self._paced_clock.due(media_us, self._wall_clock_us() - paused_us) + paused_us
        delay = (due - self._wall_clock_us()) / MICROSECONDS
        if delay > 0 and self._stop_requested.wait(delay):
            return None
        return due

    def _deliver(
        self, packager: AnnexBPackager, access_unit: bytes, capture_us: int, media_us: int
    ) -> bool:
        """Drop, or package and hand off, one access unit; True if it was sent on."""
        stats = self._own_stats
        stats.frames_captured += 1
        key = packager.is_key_access_unit(access_unit)
        if key:
            if self._last_key_media_us is not None:
                interval = (media_us - self._last_key_media_us) / MICROSECONDS
                stats.last_keyframe_interval = interval
                if interval > LONG_GOP and not self._warned_gop:
                    self._warned_gop = True
                    _log.warn(
                        "the source has a keyframe every {gop:.1f} s: viewers may wait that "
                        "long to start; set its keyframe interval to 1-2 s",
                        gop=interval,
                    )
            self._last_key_media_us = media_us
        if self._waiting_for_key and not key:
            stats.frames_waiting_for_key += 1
            return False
        readiness = self._sink.readiness
        if readiness is Readiness.CONGESTED and self._patient:
            readiness = self._wait_for_room()
        if readiness is not Readiness.READY:
            if readiness is Readiness.OFFLINE:
                stats.frames_offline += 1
            elif readiness is Readiness.IDLE:
                # Nobody watches: skipped, not a drop; the read loop pauses or closes
                # the source (a listening one is read on).
                stats.frames_idle += 1
                self._idle_noticed = True
            else:
                stats.frames_dropped += 1
            self._waiting_for_key = True
            return False
        try:
            messages = packager.package(access_unit, capture_us)
        except H264Error as error:
            self._unreadable(error)
            return False
        stats.frames_encoded += 1
        refused = self._hand_off(messages)
        if key and not refused and self._resumed:
            self._resumed = False
            self.mode = self._remux_mode
        self._waiting_for_key = refused
        self._patient = True
        if key and not refused and self._keyframe_thumbnails is not None:
            # After the hand-off: the thumbnail never delays a frame.
            for message in messages:
                if message.is_key:
                    self._keyframe_thumbnails.offer(self._codec, message.payload)
        return not refused

    def _wait_for_room(self) -> Readiness:
        """Wait a little for a CONGESTED sink to drain (once per congestion episode).

        Demuxers hand over bursts: what FFmpeg read while probing a live source, or a
        network hiccup's backlog. Without this, a burst larger than the handoff's bound
        would cost a whole GOP at every start.
        """
        deadline = self._monotonic() + CONGESTION_PATIENCE
        readiness = self._sink.readiness
        while readiness is Readiness.CONGESTED and self._monotonic() < deadline:
            if self._stop_requested.wait(0.005):
                break
            readiness = self._sink.readiness
        self._patient = readiness is Readiness.READY
        return readiness

    def _hand_off(self, messages: list[MediaMessage]) -> bool:
        """Pass messages to the sink (meta before each CONFIG); True if a frame was refused."""
        stats = self._own_stats
        refused = False
        for message in messages:
            stats.bytes_encoded += message.size - HEADER_SIZE
            if message.is_config and self._packager is not None:
                size = self._packager.picture_size
                codec = self._packager.codec_string
                if size is not None and codec is not None:
                    self._sink.send_meta_threadsafe(
                        meta_message(codec, *size, self._fps_value, **self._meta_extra)
                    )
                self._sink.send_config_threadsafe(message.payload, message.capture_time_us)
                continue
            if message.is_key:
                stats.keyframes_encoded += 1
            accepted = self._sink.send_frame_threadsafe(
                message.payload, key=message.is_key, capture_time_us=message.capture_time_us
            )
            refused = refused or not accepted
        return refused

    def _unreadable(self, error: Exception) -> None:
        self._own_stats.frames_unreadable += 1
        self._waiting_for_key = True
        if not self._warned_unreadable:
            self._warned_unreadable = True
            _log.warn(
                "skipping unreadable H.264 from {source} until the next keyframe: {error}",
                source=self._media.description,
                error=error,
            )


__all__ = ["REMUXING", "RemuxStats", "SourcePipeline"]
