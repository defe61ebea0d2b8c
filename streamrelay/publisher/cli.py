"""``streamrelay-publish``: capture or generate video, encode H.264, publish it to a relay.

Examples::

    streamrelay-publish                                   # test pattern to ws://127.0.0.1:8080/publish/demo
    streamrelay-publish ws://relay:8080/publish/desk --source screen --size 1920x1080
    streamrelay-publish wss://relay/publish/clip --source file:clip.mp4 --token "$TOKEN"
    python -m streamrelay.publisher --source camera:/dev/video0 --fps 25 --bitrate 1500k

Exit status: 0 after SIGINT, SIGTERM or ``--duration``; 1 when the source fails or a newer
publisher takes the stream over; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from twisted.logger import Logger, LogLevel, globalLogBeginner
from twisted.python.failure import Failure

from .client import DEFAULT_URL, Publisher
from .wire import now_us

_log = Logger()

TOKEN_ENVIRONMENT_VARIABLE = "STREAMRELAY_TOKEN"


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT`` (both even, 96x64 or larger)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1280x720, got {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width % 2 or height % 2:
        raise argparse.ArgumentTypeError(f"width and height must be even (yuv420p), got {text}")
    if width < 96 or height < 64 or width > 7680 or height > 4320:
        raise argparse.ArgumentTypeError(f"size must be between 96x64 and 7680x4320, got {text}")
    return width, height


def parse_fps(text: str) -> Fraction:
    """Parse a frame rate: ``30``, ``29.97`` or ``30000/1001``."""
    try:
        fps = Fraction(text.strip()).limit_denominator(1001)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a frame rate such as 30, got {text!r}"
        ) from None
    if not 1 <= fps <= 240:
        raise argparse.ArgumentTypeError(f"frame rate must be between 1 and 240, got {text}")
    return fps


def parse_bitrate(text: str) -> int:
    """Parse a bitrate in bit/s: ``2000k``, ``2.5M``, ``800000``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)(?:bps|bit/s|b)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a bitrate such as 2000k or 2M, got {text!r}")
    multiplier = {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]
    bitrate = int(float(match.group(1)) * multiplier)
    if not 50_000 <= bitrate <= 200_000_000:
        raise argparse.ArgumentTypeError(f"bitrate must be between 50k and 200M, got {text}")
    return bitrate


@dataclass(frozen=True, slots=True)
class KeyframeInterval:
    """A GOP length given in seconds or in frames."""

    seconds: float | None = None
    frames: int | None = None

    def in_frames(self, fps: Fraction) -> int:
        """The interval as a frame count at ``fps`` (at least 1)."""
        if self.frames is not None:
            return self.frames
        assert self.seconds is not None
        return max(1, round(self.seconds * float(fps)))


def parse_keyframe_interval(text: str) -> KeyframeInterval:
    """Parse ``2``/``2s``/``0.5s`` (seconds) or ``60f`` (frames)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|f|frames?)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected seconds (2s) or frames (60f), got {text!r}")
    value = float(match.group(1))
    if (match.group(2) or "s").startswith("f"):
        if not value.is_integer() or not 1 <= value <= 100_000:
            raise argparse.ArgumentTypeError(f"frame count must be a whole number >= 1: {text}")
        return KeyframeInterval(frames=int(value))
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"keyframe interval must be in (0, 3600] s: {text}")
    return KeyframeInterval(seconds=value)


def parse_source_option(text: str) -> tuple[str, str]:
    """Parse ``KEY=VALUE`` for ``--source-option``."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``streamrelay-publish``."""
    from .encoder import PRESETS, PROFILES

    parser = argparse.ArgumentParser(
        prog="streamrelay-publish",
        description="Capture or generate video, encode it to H.264 with libx264 and publish it "
        "live to a streamrelay server over WebSocket (wire protocol v1).",
        epilog=f"The token may also come from the {TOKEN_ENVIRONMENT_VARIABLE} environment "
        "variable, which keeps it out of the process list.",
    )
    parser.add_argument(
        "url",
        nargs="?",
        help=f"relay publish URL, ws(s)://HOST:PORT/publish/STREAM (default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--url", dest="url_option", metavar="URL", help="same as the positional URL"
    )
    parser.add_argument(
        "--source",
        default="testsrc",
        help="testsrc (default: moving pattern with clock and frame counter), screen[:INPUT], "
        "file:PATH (looped) or camera[:DEVICE]",
    )
    parser.add_argument(
        "--source-option",
        action="append",
        default=[],
        type=parse_source_option,
        metavar="KEY=VALUE",
        help="extra FFmpeg input option for screen/camera, e.g. video_size=640x480 (repeatable)",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=(1280, 720),
        metavar="WxH",
        help="output picture size (default 1280x720)",
    )
    parser.add_argument(
        "--fps", type=parse_fps, default=Fraction(30), help="frames per second (default 30)"
    )
    parser.add_argument(
        "--bitrate", type=parse_bitrate, default=2_000_000, help="target bitrate (default 2000k)"
    )
    parser.add_argument(
        "--keyframe-interval",
        type=parse_keyframe_interval,
        default=KeyframeInterval(seconds=2.0),
        metavar="SECONDS|Nf",
        help="time between keyframes: seconds (2, 2s) or frames (60f); default 2s",
    )
    parser.add_argument(
        "--preset", choices=PRESETS, default="veryfast", help="libx264 preset (default veryfast)"
    )
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default="baseline",
        help="H.264 profile (default baseline, i.e. constrained baseline: decodes everywhere)",
    )
    parser.add_argument(
        "--token",
        help="publish token, sent as 'Authorization: Bearer ...' "
        f"(default: env {TOKEN_ENVIRONMENT_VARIABLE})",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="wss:// without certificate verification (self-signed test certificates only)",
    )
    parser.add_argument("--quiet", action="store_true", help="no status line, warnings only")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--duration", type=_positive_seconds, metavar="SECONDS", help="stop after this long"
    )
    return parser


@dataclass(frozen=True, slots=True)
class PublishOptions:
    """Validated command-line options."""

    url: str
    source: Any
    width: int
    height: int
    fps: Fraction
    bitrate: int
    keyframe_interval_frames: int
    preset: str
    profile: str
    token: str | None
    insecure: bool
    quiet: bool
    verbose: bool
    duration: float | None


def parse_arguments(argv: Sequence[str] | None = None) -> PublishOptions:
    """Parse and validate the command line (exits with status 2 on a usage error)."""
    from .client import parse_relay_url
    from .sources import parse_source_spec

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.url and args.url_option and args.url != args.url_option:
        parser.error("give the URL once: positional or --url")
    url = args.url or args.url_option or DEFAULT_URL
    try:
        parse_relay_url(url)
    except ValueError as error:
        parser.error(f"argument url: {error}")
    try:
        source = parse_source_spec(args.source)
    except ValueError as error:
        parser.error(f"argument --source: {error}")
    if args.source_option:
        if source.kind not in ("screen", "camera"):
            parser.error("argument --source-option: only screen and camera sources take options")
        source = dataclasses.replace(source, options=dict(args.source_option))
    token = args.token or os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None
    if token is not None and any(c in token for c in "\r\n\0"):
        parser.error("argument --token: must be a single line")
    width, height = args.size
    return PublishOptions(
        url=url,
        source=source,
        width=width,
        height=height,
        fps=args.fps,
        bitrate=args.bitrate,
        keyframe_interval_frames=args.keyframe_interval.in_frames(args.fps),
        preset=args.preset,
        profile=args.profile,
        token=token,
        insecure=args.insecure,
        quiet=args.quiet,
        verbose=args.verbose,
        duration=args.duration,
    )


def queue_bounds(bitrate: int) -> tuple[int, int]:
    """(high water, limit) of the publisher's outbox for a bitrate.

    Half a second of video before the encoder starts dropping at the source: enough to
    ride out a keyframe burst, little enough to keep latency low.
    """
    high_water = max(64 * 1024, bitrate // 8 // 2)
    return high_water, max(4 * high_water, 512 * 1024)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the publisher until SIGINT/SIGTERM/--duration; return the exit status."""
    options = parse_arguments(argv)

    import av

    from .encoder import EncoderSettings, H264Encoder
    from .pipeline import CapturePipeline
    from .sources import SourceError, open_source
    from .status import StatusLine, console_observer

    stderr = sys.stderr
    try:
        source = open_source(options.source, options.width, options.height, options.fps)
        encoder = H264Encoder(
            EncoderSettings(
                width=options.width,
                height=options.height,
                fps=options.fps,
                bitrate=options.bitrate,
                keyframe_interval_frames=options.keyframe_interval_frames,
                preset=options.preset,
                profile=options.profile,
            )
        )
    except (SourceError, ValueError, av.FFmpegError) as error:
        stderr.write(f"streamrelay-publish: {error}\n")
        return 1

    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    high_water, limit = queue_bounds(options.bitrate)
    publisher = Publisher(
        options.url,
        token=options.token,
        reactor=reactor,
        insecure=options.insecure,
        queue_high_water_bytes=high_water,
        queue_limit_bytes=limit,
    )
    pipeline = CapturePipeline(source, encoder, publisher, reactor=reactor, fps=options.fps)
    publisher.on_keyframe_request = pipeline.request_keyframe

    status = None if options.quiet else StatusLine(reactor, publisher, pipeline, stderr)
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
        if status is not None:
            status.stop()
        return publisher.stop("publisher shutting down")

    def begin() -> None:
        """Once the reactor runs: connect, start capturing and the status line."""
        _log.info(
            "publishing {source} as {width}x{height} {fps} fps {bitrate} kbit/s "
            "(GOP {gop} frames, {profile}) to {url}",
            source=source.description,
            width=options.width,
            height=options.height,
            fps=float(options.fps),
            bitrate=options.bitrate // 1000,
            gop=options.keyframe_interval_frames,
            profile=options.profile,
            url=publisher.target.display_url,
        )
        pipeline.when_finished().addBoth(capture_ended)
        publisher.when_stopped().addCallback(publisher_stopped)
        publisher.start()
        pipeline.start()
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
            f"{seconds:.1f} s; dropped {dropped}; connected {stats.connects} time(s)\n"
        )
    return exit_status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
