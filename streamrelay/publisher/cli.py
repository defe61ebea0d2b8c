"""``streamrelay-publish``: capture or generate video, encode H.264, publish it to a relay.

Examples::

    streamrelay-publish                                   # test pattern to ws://127.0.0.1:8080/publish/demo
    streamrelay-publish ws://relay:8080/publish/desk --source screen --size 1920x1080
    streamrelay-publish wss://relay/publish/clip --source file:clip.mp4 --token "$TOKEN"
    streamrelay-publish ws://relay:8080/publish/cam --source camera --on-demand   # idle unwatched
    streamrelay-publish ws://relay:8080/publish/cam --source rtsp://user:pass@camera/stream1
    streamrelay-publish ws://relay:8080/publish/obs --source 'rtmp://0.0.0.0:1935/live/obs?listen=1'
    python -m streamrelay.publisher --source camera:/dev/video0 --fps 25 --bitrate 1500k
    streamrelay-publish ws://relay/publish/cam --renditions 1280x720@2500k,640x360@800k,320x180@250k
    streamrelay-publish ws://relay/publish/ipcam --source rtsp://camera/stream1 \
        --renditions 1280x720@2500k,640x360@800k              # an RTSP camera, two renditions

Exit status: 0 after SIGINT, SIGTERM or ``--duration``; 1 when PyAV is missing (it comes
with ``pip install 'streamrelay[publisher]'``), the source fails or a newer publisher takes
the stream over; 2 for a usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger, LogLevel, globalLogBeginner
from twisted.python.failure import Failure

from streamrelay.wire import now_us

from .arguments import parse_arguments
from .client import Publisher
from .rendition_publisher import RenditionPublisher
from .renditions import RenditionSet, base_stream_name, describe_renditions
from .settings import PublisherSettings

_log = Logger()

INSTALL_HINT = "pip install 'streamrelay[publisher]'"


def queue_bounds(bitrate: int) -> tuple[int, int]:
    """(high water, limit) of the publisher's outbox for a bitrate.

    Half a second of video before the encoder starts dropping at the source: enough to
    ride out a keyframe burst, little enough to keep latency low.
    """
    high_water = max(64 * 1024, bitrate // 8 // 2)
    return high_water, max(4 * high_water, 512 * 1024)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the publisher until SIGINT/SIGTERM/--duration; return the exit status."""
    try:
        import av
    except ImportError as error:
        # The relay installs without PyAV; the publisher is an extra.
        sys.stderr.write(
            f"streamrelay-publish: PyAV is not available ({error}); "
            f"install the publisher with: {INSTALL_HINT}\n"
        )
        return 1
    options = parse_arguments(argv)

    from .audio import FanOutAudioSink, start_audio
    from .codecs import VideoEncoder, create_encoder
    from .encoder import EncoderSettings
    from .idleclock import IdleClock
    from .pipeline import CapturePipeline
    from .remux import SourcePipeline
    from .sources import SourceError, media_input, open_source
    from .status import StatusLine, console_observer

    stderr = sys.stderr

    def make_encoder() -> VideoEncoder:
        """The encoder the options describe (also for a source that must be transcoded)."""
        return create_encoder(
            options.codec,
            EncoderSettings(
                width=options.width,
                height=options.height,
                fps=options.fps,
                bitrate=options.bitrate,
                keyframe_interval_frames=options.keyframe_interval_frames,
                preset=options.preset,
                profile=options.profile,
            ),
        )

    # Files and URLs are opened in the source thread, which remuxes H.264 (or transcodes);
    # renditions scale decoded frames, so their sources go through the capture thread.
    remuxable = options.source.kind in ("file", "url") and not options.renditions
    encoders = None
    try:
        if remuxable:
            media = media_input(options.source)
        else:
            source = open_source(options.source, options.width, options.height, options.fps)
        if options.renditions:
            from .rendition_pipeline import RenditionEncoders

            encoders = RenditionEncoders(
                options.renditions,
                fps=options.fps,
                keyframe_interval_frames=options.keyframe_interval_frames,
                preset=options.preset,
                profile=options.profile,
            )
        elif not remuxable:
            encoder = make_encoder()
    except (SourceError, ValueError, av.FFmpegError) as error:
        stderr.write(f"streamrelay-publish: {error}\n")
        return 1

    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    high_water, limit = queue_bounds(options.bitrate)
    settings = PublisherSettings(
        options.url,
        token=options.token,
        insecure=options.insecure,
        queue_high_water_bytes=high_water,
        queue_limit_bytes=limit,
        on_demand=options.on_demand,
        on_demand_grace=options.on_demand_grace,
    )
    thumbnails = None
    if options.thumbnail_interval > 0:
        # A remuxing publisher decodes one keyframe per thumbnail, nothing else.
        from .thumbnail import ThumbnailMaker

        thumbnails = ThumbnailMaker(interval=options.thumbnail_interval)
    publisher: Publisher | RenditionPublisher
    if encoders is not None:
        # One connection per rendition, each with an outbox sized for its own bitrate.
        publisher = RenditionPublisher(
            settings, options.renditions, reactor=reactor, queue_bounds=queue_bounds
        )
    else:
        publisher = Publisher(settings, reactor=reactor)
    # The time spent idle on demand, by which a file's picture and sound are both held back.
    idle_clock = IdleClock()
    try:
        # Every rendition carries the same audio: a viewer's follows its rendition.
        audio_sink = (
            FanOutAudioSink(publisher.publishers)
            if isinstance(publisher, RenditionPublisher)
            else publisher
        )
        # A remuxed file or URL carries its own audio in the source thread (passed
        # through or transcoded to Opus there): one audio path, on the video's timeline.
        wanted = None if options.audio is None else options.audio.kind
        source_audio = remuxable and wanted in ("file", "source")
        # Renditions decode their source through the capture thread: no source audio.
        unsupported = wanted == "source"
        audio = (
            None
            if source_audio or unsupported
            else start_audio(
                options, None if remuxable else source, audio_sink, reactor, idle_clock
            )
        )
    except (SourceError, ValueError, av.FFmpegError) as error:
        stderr.write(f"streamrelay-publish: {error}\n")
        return 1
    meta_extra = None if audio is None else {"audio": audio.meta}
    pipeline: CapturePipeline | SourcePipeline
    if isinstance(publisher, RenditionPublisher):
        from .rendition_pipeline import RenditionPipeline

        assert encoders is not None
        pipeline = RenditionPipeline(
            source,
            encoders,
            publisher.publishers,
            publisher.rendition_set,
            reactor=reactor,
            fps=options.fps,
            # The listing shows the base stream: its connection carries the thumbnail.
            thumbnails=thumbnails,
            send_thumbnail=publisher.publishers[0].send_thumbnail_threadsafe,
            meta_extra=meta_extra,
            idle_clock=idle_clock,
        )
    elif remuxable:
        pipeline = SourcePipeline(
            media,
            publisher,
            reactor=reactor,
            encoder_factory=make_encoder,
            frame_size=(options.width, options.height),
            fps=options.fps,
            meta_extra=meta_extra,
            # Another codec than H.264 asked for: what the source holds is re-encoded.
            force_transcode=options.transcode or options.codec != "h264",
            hevc_passthrough=options.hevc_passthrough,
            idle_clock=idle_clock,
            audio_sink=publisher if source_audio else None,
            thumbnails=thumbnails,
            send_thumbnail=publisher.send_thumbnail_threadsafe,
        )
    else:
        pipeline = CapturePipeline(
            source,
            encoder,
            publisher,
            reactor=reactor,
            fps=options.fps,
            thumbnails=thumbnails,
            send_thumbnail=publisher.send_thumbnail_threadsafe,
            meta_extra=meta_extra,
            idle_clock=idle_clock,
        )

    def keyframe_requested() -> None:
        """A keyframe is owed; on turning active, this also wakes the idle threads."""
        pipeline.request_keyframe()
        if audio is not None:
            audio.pipeline.wake()

    publisher.on_keyframe_request = keyframe_requested

    status = (
        None
        if options.quiet
        else StatusLine(
            reactor, publisher, pipeline, stderr, streams=max(1, len(options.renditions))
        )
    )
    level = LogLevel.debug if options.verbose else LogLevel.warn if options.quiet else LogLevel.info
    globalLogBeginner.beginLoggingTo(
        [console_observer(stderr, level, status)], redirectStandardIO=False
    )

    exit_status = 0
    shutting_down = False

    def fail(why: str) -> None:
        """Log a fatal problem and stop with exit status 1."""
        nonlocal exit_status
        exit_status = 1
        _log.error("{why}", why=why)
        if reactor.running and not shutting_down:
            reactor.stop()

    def capture_ended(outcome: Failure | None) -> None:
        """The capture thread ended: fatal unless we are shutting down."""
        if isinstance(outcome, Failure):
            fail(f"capture stopped: {outcome.getErrorMessage()}")
        elif not shutting_down:
            fail("capture stopped")

    def publisher_stopped(reason: str) -> None:
        """The publisher gave up (replaced by a newer one): fatal."""
        if not shutting_down:
            fail(f"publisher stopped: {reason}")

    def shut_down() -> Any:
        """Before reactor shutdown: stop capture, close the WebSocket cleanly."""
        nonlocal shutting_down
        shutting_down = True
        pipeline.stop()
        if audio is not None:
            audio.pipeline.stop()
        if status is not None:
            status.stop()
        return publisher.stop("publisher shutting down")

    def begin() -> None:
        """Once the reactor runs: connect, start capturing and the status line."""
        if isinstance(pipeline, SourcePipeline):
            _log.info(
                "publishing {source} to {url}: remuxed when it is H.264 without B-frames, "
                "else transcoded to {width}x{height} {bitrate} kbit/s",
                source=pipeline.description,
                url=publisher.target.display_url,
                width=options.width,
                height=options.height,
                bitrate=options.bitrate // 1000,
            )
        else:
            _log.info(
                "publishing {source} as {width}x{height} {fps} fps {bitrate} kbit/s "
                "(GOP {gop} frames, {profile}) to {url}",
                source=source.description,
                width=options.width,
                height=options.height,
                fps=float(options.fps),
                bitrate=options.bitrate // 1000,
                gop=options.keyframe_interval_frames,
                profile=options.profile if options.codec == "h264" else options.codec,
                url=publisher.target.display_url,
            )
        if options.renditions:
            _log.info(
                "renditions {renditions}, one connection each: {streams}",
                renditions=describe_renditions(options.renditions),
                streams=", ".join(
                    RenditionSet(base_stream_name(options.url), options.renditions).streams()
                ),
            )
        pipeline.when_finished().addBoth(capture_ended)
        publisher.when_stopped().addCallback(publisher_stopped)
        publisher.start()
        pipeline.start()
        if audio is not None:
            _log.info("with audio: {audio}", audio=audio.description)
            # Video goes on without its audio (a microphone unplugged): say so.
            audio.pipeline.when_finished().addErrback(
                lambda failure: _log.error(
                    "audio stopped: {why}", why=failure.getErrorMessage()
                )
            )
            audio.pipeline.start()
        if status is not None:
            status.start()
        if options.duration is not None:
            reactor.callLater(options.duration, reactor.stop)

    reactor.addSystemEventTrigger("before", "shutdown", shut_down)
    reactor.callWhenRunning(begin)
    started_us = now_us()
    reactor.run()

    pipeline.stop()
    pipeline.join(timeout=3.0)
    if not options.quiet:
        seconds = max(1e-6, (now_us() - started_us) / 1e6)
        stats = publisher.stats
        dropped = pipeline.stats.frames_dropped + publisher.dropped
        stderr.write(
            f"streamrelay-publish: sent {stats.frames_sent} frames ({stats.keyframes_sent} "
            f"keyframes, {stats.bytes_sent * 8 / 1000 / seconds:.0f} kbit/s average) in "
            f"{seconds:.1f} s; dropped {dropped}; connected {stats.connects} time(s)"
            + (
                f"; idle on demand {publisher.on_demand.total_idle_seconds():.1f} s"
                if publisher.on_demand is not None
                else ""
            )
            + (f"; {stats.audio_sent} audio packets" if audio is not None or source_audio else "")
            + "\n"
        )
    return exit_status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
