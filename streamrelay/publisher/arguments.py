"""The command line of ``streamrelay-publish``: its options, their parsers, and the
validated record :func:`parse_arguments` makes of them.

Over 400 lines: the options, their parsers and the checks between them (an option that the
rest of the command line would make do nothing is a usage error) belong together.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from streamrelay.wsclient.target import parse_relay_url

from .renditions import Rendition, RenditionError, base_stream_name, parse_renditions
from .settings import DEFAULT_URL

TOKEN_ENVIRONMENT_VARIABLE = "STREAMRELAY_TOKEN"
SOURCE_ENVIRONMENT_VARIABLE = "STREAMRELAY_SOURCE"


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


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _renditions(text: str) -> tuple[Rendition, ...]:
    try:
        return parse_renditions(text)
    except RenditionError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``streamrelay-publish``."""
    from .encoder import PRESETS, PROFILES  # imports PyAV

    parser = argparse.ArgumentParser(
        prog="streamrelay-publish",
        description="Capture or generate video, encode it to H.264 with libx264 and publish it "
        "live to a streamrelay server over WebSocket (wire protocol v1); a file or URL "
        "source that carries H.264 already is remuxed without re-encoding.",
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
        default=None,
        help="testsrc (a moving pattern with clock and frame counter), screen[:INPUT], "
        "camera[:DEVICE], file:PATH (played at its own rate, looped) or a URL: rtsp://, "
        "rtmp:// (rtmp://HOST:PORT/APP/KEY?listen=1 lets OBS or ffmpeg push to it), srt://, "
        "udp:// (MPEG-TS)... Files and URLs carrying H.264 without B-frames are remuxed "
        "without re-encoding (--size, --fps, --bitrate, --keyframe-interval, --preset and "
        "--profile then do not apply, and keyframe requests cannot be honoured: viewers start "
        "at the source's keyframes); anything else is transcoded. Default: the "
        f"{SOURCE_ENVIRONMENT_VARIABLE} environment variable (keeps a URL's credentials out "
        "of the process list), else testsrc",
    )
    parser.add_argument(
        "--transcode",
        action="store_true",
        help="re-encode a file or URL source even when it could be remuxed (e.g. an HEVC "
        "source for browsers without an HEVC decoder)",
    )
    parser.add_argument(
        "--hevc-passthrough",
        action="store_true",
        help="the default: HEVC (H.265) sources are remuxed as they are; only browsers with "
        "an HEVC decoder (Safari, Chrome with hardware decoding) play them, the player tells "
        "the others plainly; --transcode re-encodes them to H.264 for every browser (file "
        "and URL sources, --codec h264, without --renditions)",
    )
    parser.add_argument(
        "--source-option",
        action="append",
        default=[],
        type=parse_source_option,
        metavar="KEY=VALUE",
        help="extra FFmpeg input option for screen/camera/file/URL sources, e.g. "
        "video_size=640x480, rtsp_transport=udp, listen=1 (repeatable)",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=None,
        metavar="WxH",
        help="output picture size (default 1280x720)",
    )
    parser.add_argument(
        "--fps", type=parse_fps, default=Fraction(30), help="frames per second (default 30)"
    )
    parser.add_argument(
        "--bitrate", type=parse_bitrate, default=None, help="target bitrate (default 2000k)"
    )
    parser.add_argument(
        "--keyframe-interval",
        type=parse_keyframe_interval,
        default=KeyframeInterval(seconds=2.0),
        metavar="SECONDS|Nf",
        help="time between keyframes: seconds (2, 2s) or frames (60f); default 2s",
    )
    parser.add_argument(
        "--preset", choices=PRESETS, default=None, help="libx264 preset (default veryfast)"
    )
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default=None,
        help="H.264 profile (default baseline, i.e. constrained baseline: decodes everywhere)",
    )
    parser.add_argument(
        "--renditions",
        type=_renditions,
        metavar="[LABEL=]WxH@RATE,...",
        help="publish several GOP-aligned renditions of the source, e.g. "
        "1280x720@2500k,640x360@800k,320x180@250k: the highest-bitrate one at the URL's "
        "stream, each other at STREAM~LABEL (LABEL defaults to the height, e.g. 360p); "
        "replaces --size and --bitrate. Any source: a file or URL (an RTSP camera...) is "
        "decoded and scaled then, not remuxed",
    )
    parser.add_argument(
        "--codec",
        choices=("h264", "vp9", "av1"),
        default="h264",
        help="video codec: h264 (libx264, default: plays everywhere), vp9 (libvpx-vp9) or "
        "av1 (SVT-AV1); --preset and --profile apply to h264 only",
    )
    parser.add_argument(
        "--audio",
        metavar="tone|file|source|device[:NAME]|none",
        help="audio, Opus 48 kHz: tone (a beep on every 30th test-pattern frame), file or "
        "source (the file or URL source's own audio: Opus passed through, AAC and others "
        "transcoded to Opus), device[:NAME] (ALSA default, or pulse:NAME; dshow NAME on "
        "Windows, avfoundation :N on macOS) or none; default tone for testsrc, the source's "
        "own audio for a file or URL that has some, none otherwise",
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
    parser.add_argument(
        "--on-demand",
        action="store_true",
        help="stop capturing and encoding while nobody watches (after --on-demand-grace): "
        "a camera, screen or microphone is closed, a file pauses (picture and sound in "
        "step), a remuxed network source is closed (a listening one is read on and "
        "skipped); resume with a keyframe on the first viewer (a remuxed source: at its "
        "next keyframe)",
    )
    parser.add_argument(
        "--on-demand-grace",
        type=_grace_seconds,
        default=None,
        metavar="SECONDS",
        help="with --on-demand: how long without viewers before going idle (default 10)",
    )
    parser.add_argument(
        "--thumbnail-interval",
        type=_thumbnail_interval,
        default=5.0,
        metavar="SECONDS",
        help="send the relay a small JPEG of the picture this often, for its stream list "
        "(default 5; 0: never)",
    )
    return parser


def _grace_seconds(text: str) -> float:
    value = _seconds(text)
    if not 0 <= value <= 86_400:
        raise argparse.ArgumentTypeError("must be between 0 and 86400 seconds")
    return value


def _thumbnail_interval(text: str) -> float:
    value = _seconds(text)
    if not 0 <= value <= 3600 or (0 < value < 1):
        raise argparse.ArgumentTypeError("must be 0 (off) or from 1 to 3600 seconds")
    return value


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
    renditions: tuple[Rendition, ...] = ()
    on_demand: bool = False
    on_demand_grace: float = 10.0
    codec: str = "h264"
    thumbnail_interval: float = 5.0
    audio: Any = None  # an AudioSpec; None: no audio
    transcode: bool = False
    hevc_passthrough: bool = True


def parse_arguments(argv: Sequence[str] | None = None) -> PublishOptions:
    """Parse and validate the command line (exits with status 2 on a usage error)."""
    from .sources import parse_source_spec  # imports PyAV

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
        source = parse_source_spec(
            args.source or os.environ.get(SOURCE_ENVIRONMENT_VARIABLE) or "testsrc"
        )
    except ValueError as error:
        parser.error(f"argument --source: {error}")
    if args.source_option:
        if source.kind == "testsrc":
            parser.error("argument --source-option: testsrc takes no options")
        source = dataclasses.replace(source, options=dict(args.source_option))
    try:
        audio = _audio_option(args.audio, source)
    except ValueError as error:
        parser.error(f"argument --audio: {error}")
    token = args.token or os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None
    if token is not None and any(c in token for c in "\r\n\0"):
        parser.error("argument --token: must be a single line")
    _refuse_options_that_would_do_nothing(parser, args, source)
    width, height = args.size or (1280, 720)
    renditions: tuple[Rendition, ...] = args.renditions or ()
    if renditions:
        if args.size is not None or args.bitrate is not None:
            parser.error(
                "argument --renditions: gives each rendition's size and bitrate; "
                "drop --size and --bitrate"
            )
        if args.codec != "h264":
            # The renditions' codec strings are learned from a probe frame of libx264.
            parser.error("argument --renditions: H.264 only for now; drop --codec")
        try:
            base_stream_name(url)
        except RenditionError as error:
            parser.error(f"argument --renditions: {error}")
        # The source is captured at the top rendition's size, the others scale it down.
        width, height, bitrate = renditions[0].width, renditions[0].height, renditions[0].bitrate
    else:
        bitrate = args.bitrate or 2_000_000
    return PublishOptions(
        url=url,
        source=source,
        width=width,
        height=height,
        fps=args.fps,
        bitrate=bitrate,
        keyframe_interval_frames=args.keyframe_interval.in_frames(args.fps),
        preset=args.preset or "veryfast",
        profile=args.profile or "baseline",
        token=token,
        insecure=args.insecure,
        quiet=args.quiet,
        verbose=args.verbose,
        duration=args.duration,
        renditions=renditions,
        on_demand=args.on_demand,
        on_demand_grace=10.0 if args.on_demand_grace is None else args.on_demand_grace,
        codec=args.codec,
        thumbnail_interval=args.thumbnail_interval,
        audio=audio,
        transcode=args.transcode,
        # Pass-through is the default; --transcode re-encodes HEVC like everything else.
        hevc_passthrough=not args.transcode,
    )


def _refuse_options_that_would_do_nothing(
    parser: argparse.ArgumentParser, args: argparse.Namespace, source: Any
) -> None:
    """Exit with a usage error for an option that the rest of the command line makes
    meaningless: silently ignoring it would leave the user believing it applies."""
    remuxable_kind = source.kind in ("file", "url")
    for given, option in (
        (args.transcode, "--transcode"),
        (args.hevc_passthrough, "--hevc-passthrough"),
    ):
        if not given:
            continue
        if not remuxable_kind:
            parser.error(
                f"argument {option}: applies to file and URL sources only; "
                f"{source.kind} is always encoded"
            )
        if args.renditions:
            parser.error(f"argument {option}: --renditions always re-encodes its source")
    if args.hevc_passthrough:
        if args.transcode:
            parser.error("argument --hevc-passthrough: --transcode re-encodes HEVC too")
        if args.codec != "h264":
            parser.error(
                f"argument --hevc-passthrough: --codec {args.codec} re-encodes every source"
            )
    if args.codec != "h264":
        for value, option in ((args.preset, "--preset"), (args.profile, "--profile")):
            if value is not None:
                parser.error(f"argument {option}: applies to --codec h264 only")
    if args.on_demand_grace is not None and not args.on_demand:
        parser.error("argument --on-demand-grace: needs --on-demand")


def _audio_option(text: str | None, source: Any) -> Any:
    """The ``--audio`` spec for ``source``, or None for no audio (see :mod:`.audio`)."""
    from .audio import default_audio, parse_audio_spec
    from .audio_sources import file_has_audio

    spec = default_audio(source.kind) if text is None else parse_audio_spec(text)
    if spec.kind == "tone" and source.kind != "testsrc":
        # Its beeps are marked by the test pattern's frames: there is no beat without it.
        raise ValueError("tone goes with the test pattern (--source testsrc)")
    if spec.kind == "file":
        if source.kind != "file":
            raise ValueError("file audio needs --source file:PATH")
        if not file_has_audio(source.target):
            if text is None:
                return None  # a file without audio: none by default
            raise ValueError(f"{source.target} has no audio track")
    if spec.kind == "source" and source.kind not in ("file", "url"):
        raise ValueError("source audio needs a file or URL --source")
    return None if spec.kind == "none" else spec
