"""Frame sources: the test pattern, screen capture, a looped video file, a camera.

Source specifications (the CLI's ``--source``):

``testsrc``
    the built-in moving test pattern with clock and frame counter (the default);
``screen`` or ``screen:INPUT``
    screen capture: x11grab on Linux (INPUT defaults to ``$DISPLAY``, e.g. ``:0.0+100,200``),
    gdigrab on Windows (``desktop`` or ``title=Window title``), avfoundation on macOS
    (``Capture screen 0``);
``file:PATH`` (or an existing file's path)
    a video file, decoded, looped forever and re-timed to the output frame rate;
``camera`` or ``camera:DEVICE``
    v4l2 on Linux (``/dev/video0``), dshow on Windows (the device name, required),
    avfoundation on macOS (device index or name, default ``0``);
``SCHEME://...`` (kind ``url``)
    anything FFmpeg opens: ``rtsp://``, ``rtmp://`` (``?listen=1`` to let OBS or ffmpeg
    push to it), ``srt://``, ``udp://`` MPEG-TS, ``http(s)://``...; see :func:`media_input`.

``file`` and ``url`` sources are remuxed without decoding when the browser can play them
(see :mod:`.remux`); otherwise, and for the other kinds, every source returns yuv420p
frames of the configured size, paired with their capture time (a ``url`` source decoded,
as ``--renditions`` needs, is live and reopened with backoff when it ends or fails). Sources
are used from the capture thread only.

Over 400 lines: the one place that maps every ``--source`` kind to how FFmpeg opens,
reads, pauses and reopens it; splitting it would scatter one table across modules.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import av
from twisted.logger import Logger

from streamrelay.wire import now_us

from .testpattern import BEAT_FRAMES, TestPattern

_log = Logger()

SOURCE_KINDS: Final = ("testsrc", "screen", "file", "camera", "url")
_URL: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class SourceError(Exception):
    """A source could not be opened or stopped delivering frames."""


@dataclass(frozen=True, slots=True)
class CapturedFrame:
    """A picture and the wall-clock time (microseconds) it was captured."""

    frame: av.VideoFrame
    capture_time_us: int


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A parsed ``--source`` value: the kind and an optional kind-specific target."""

    kind: str
    target: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """Human-readable form, e.g. ``file:/videos/clip.mp4``."""
        return self.kind if self.target is None else f"{self.kind}:{self.target}"


def parse_source_spec(text: str) -> SourceSpec:
    """Parse ``testsrc``, ``screen[:INPUT]``, ``file:PATH``, ``camera[:DEVICE]``, a URL
    (``rtsp://...``, kind ``url``) or a path."""
    if _URL.match(text):
        if text.lower().startswith("file://"):
            return SourceSpec("file", urlsplit(text).path)
        return SourceSpec("url", text)
    kind, separator, target = text.partition(":")
    if kind in SOURCE_KINDS and kind != "url":
        if kind == "testsrc" and separator:
            raise ValueError("testsrc takes no argument")
        if kind == "file" and not target:
            raise ValueError("file: needs a path, e.g. file:clip.mp4")
        return SourceSpec(kind, target if separator and target else None)
    if os.path.isfile(text):
        return SourceSpec("file", text)
    raise ValueError(
        f"unknown source {text!r}: use testsrc, screen[:INPUT], file:PATH, camera[:DEVICE] "
        "or a URL (rtsp://, rtmp://, srt://, udp://...)"
    )


@dataclass(frozen=True, slots=True)
class DeviceInput:
    """How to open a capture device (or a network stream) with ``av.open``: URL, format,
    options, and ``av.open``'s (open, read) timeout in seconds (None: wait forever)."""

    url: str
    format: str | None
    options: dict[str, str]
    timeout: tuple[float | None, float | None] | None = None


def device_input(
    spec: SourceSpec,
    fps: Fraction,
    platform: str = sys.platform,
    environ: Mapping[str, str] = os.environ,
) -> DeviceInput:
    """Map a ``screen`` or ``camera`` spec to the platform's FFmpeg input device."""
    rate = str(fps.numerator) if fps.denominator == 1 else f"{fps.numerator}/{fps.denominator}"
    if spec.kind == "screen":
        if platform.startswith("win"):
            url, fmt, options = spec.target or "desktop", "gdigrab", {"framerate": rate}
        elif platform == "darwin":
            url = spec.target or "Capture screen 0"
            fmt, options = "avfoundation", {"framerate": rate, "capture_cursor": "1"}
        else:
            display = spec.target or environ.get("DISPLAY")
            if not display:
                raise SourceError(
                    "screen capture needs an X display: set DISPLAY or use screen::0 "
                    "(Wayland-only sessions are not supported by x11grab)"
                )
            url, fmt, options = display, "x11grab", {"framerate": rate, "draw_mouse": "1"}
    elif spec.kind == "camera":
        if platform.startswith("win"):
            if not spec.target:
                raise SourceError(
                    "camera on Windows needs a device name: camera:NAME "
                    "(list them with: ffmpeg -list_devices true -f dshow -i dummy)"
                )
            url, fmt, options = f"video={spec.target}", "dshow", {}
        elif platform == "darwin":
            device = spec.target or "0"
            url, fmt, options = f"{device}:none", "avfoundation", {"framerate": rate}
        else:
            url, fmt, options = spec.target or "/dev/video0", "v4l2", {}
    else:
        raise SourceError(f"{spec.kind} is not a capture device")
    options.update(spec.options)
    return DeviceInput(url, fmt, options)


@dataclass(frozen=True, slots=True)
class MediaInput:
    """How to open a ``file`` or ``url`` source with ``av.open``.

    ``live``: the source sets the pace (a network stream); otherwise the publisher plays
    it at its own rate and loops it (a file, or a URL with a known duration once open).
    ``listen``: the publisher waits for a peer to push to it (RTMP ``listen``, SRT
    ``mode=listener``, ``tcp://...?listen``), so opening has no timeout.
    ``pace_if_finite``: a live URL that turns out to have a duration once open (a file on
    a web server) is played at its own rate and looped like a file.
    """

    url: str
    options: dict[str, str]
    live: bool
    listen: bool
    description: str
    pace_if_finite: bool = False


def media_input(spec: SourceSpec) -> MediaInput:
    """Map a ``file`` or ``url`` spec to ``av.open`` arguments.

    RTSP defaults to TCP transport (``rtsp_transport=tcp``: no smeared pictures from lost
    UDP packets); ``rtmp://...?listen=1`` becomes the ``listen`` option (FFmpeg's RTMP
    protocol reads no options from the URL); ``--source-option`` values override.
    """
    if spec.target is None:
        raise SourceError(f"{spec.kind} source needs a path or URL")
    if spec.kind == "file":
        return MediaInput(spec.target, dict(spec.options), False, False, spec.describe())
    if spec.kind != "url":
        raise SourceError(f"{spec.kind} is not a file or URL source")
    url = spec.target
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    options: dict[str, str] = {}
    if scheme == "rtsp":
        options["rtsp_transport"] = "tcp"
    if scheme in ("rtmp", "rtmps", "rtmpt") and "listen" in query:
        options["listen"] = query.pop("listen") or "1"
        url = urlunsplit(parts._replace(query=urlencode(query)))
    options.update(spec.options)
    listen = (
        options.get("listen", "0") not in ("", "0")
        or "listen" in query
        or query.get("mode") == "listener"
    )
    # Credentials in the URL stay out of descriptions, logs and the status line.
    shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=""))
    finite = scheme in ("http", "https", "ftp", "sftp", "smb")
    return MediaInput(url, options, True, listen, shown, pace_if_finite=finite)


class FrameSource(ABC):
    """Where pictures come from. Used from the capture thread only."""

    #: True when :meth:`read` blocks until the device has a new frame (the device sets the
    #: pace); False when the caller must pace reads to the frame rate.
    live: bool = False
    #: True when the source must be read on (and what it delivers skipped) while paused:
    #: a listening network source, whose pusher might not come back were it closed or
    #: left to back up.
    drain_while_paused: bool = False

    def __init__(self, width: int, height: int, description: str) -> None:
        self.width = width
        self.height = height
        self.description = description

    @abstractmethod
    def read(self, frame_index: int, elapsed: float) -> CapturedFrame:
        """Return the picture for output frame ``frame_index``, ``elapsed`` s after start."""

    def close(self) -> None:  # noqa: B027 (optional hook: not every source holds resources)
        """Release the source's resources."""

    def pause(self) -> None:  # noqa: B027 (optional hook: most sources just stop being read)
        """No frames are wanted for a while (on demand, nobody watches)."""

    def resume(self) -> None:  # noqa: B027 (optional hook, as pause)
        """Frames are wanted again after :meth:`pause`."""

    def interrupt(self) -> None:  # noqa: B027 (optional hook, as pause)
        """Stop waiting to reopen (the capture thread is asked to stop). Any thread."""

    def _fit(self, frame: av.VideoFrame) -> av.VideoFrame:
        """Scale and convert a picture to the output size and yuv420p."""
        if (frame.width, frame.height, frame.format.name) == (self.width, self.height, "yuv420p"):
            return frame
        return frame.reformat(self.width, self.height, "yuv420p")


class TestPatternSource(FrameSource):
    """The built-in test pattern (see :mod:`.testpattern`)."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self, width: int, height: int, wall_clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(width, height, "testsrc")
        self._pattern = TestPattern(width, height)
        self._wall_clock = wall_clock
        # Told the capture time of every beat frame (the flash; --audio tone beeps then).
        self.on_beat: Callable[[int], None] | None = None

    def read(self, frame_index: int, elapsed: float) -> CapturedFrame:
        """Draw the pattern now; its clock shows the same instant as the timestamp."""
        wall_time = self._wall_clock()
        capture_time_us = int(wall_time * 1_000_000)
        if self.on_beat is not None and frame_index % BEAT_FRAMES == 0:
            self.on_beat(capture_time_us)
        frame = self._pattern.render(frame_index, wall_time)
        return CapturedFrame(frame, capture_time_us)


class FileSource(FrameSource):
    """A video file, looped forever and re-timed to the output frame rate.

    For output time ``elapsed`` it returns the latest source picture due by then, so a
    25 fps file plays at its own speed in a 30 fps stream (frames repeat or are skipped).
    """

    def __init__(self, path: str, width: int, height: int) -> None:
        super().__init__(width, height, f"file:{path}")
        # A URL (a file on a web server, see remux.py) cannot be checked beforehand.
        if not _URL.match(path) and not os.path.isfile(path):
            raise SourceError(f"no such file: {path}")
        self._path = path
        self._container: Any = None
        self._frames: Iterator[av.VideoFrame] = iter(())
        self._frame_rate: float = 25.0
        self._first_time: float | None = None
        self._loop_offset = 0.0
        self._last_time = 0.0
        self._decoded_this_pass = 0
        self._current: av.VideoFrame | None = None
        self._pending: tuple[av.VideoFrame, float] | None = None
        self._open()

    def _open(self) -> None:
        try:
            self._container = av.open(self._path)
            stream = self._container.streams.video[0]
        except (av.FFmpegError, IndexError) as error:
            raise SourceError(f"cannot read video from {self._path}: {error}") from None
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        if rate:
            self._frame_rate = float(rate)
        self._frames = self._container.decode(stream)
        self._first_time = None
        self._decoded_this_pass = 0

    def _next_decoded(self) -> tuple[av.VideoFrame, float]:
        """The next source picture and its loop-adjusted time in seconds."""
        for _attempt in range(2):
            try:
                frame = next(self._frames)
            except StopIteration:
                if self._decoded_this_pass == 0:
                    break
                # Reopening is the loop that works for every container, seekable or not.
                self._container.close()
                self._loop_offset += self._last_time + 1.0 / self._frame_rate
                self._open()
                continue
            except av.FFmpegError as error:
                raise SourceError(f"decoding {self._path} failed: {error}") from None
            frame_time = frame.time
            if frame_time is None:
                frame_time = self._decoded_this_pass / self._frame_rate
            if self._first_time is None:
                self._first_time = frame_time
            self._decoded_this_pass += 1
            self._last_time = max(0.0, frame_time - self._first_time)
            return frame, self._loop_offset + self._last_time
        raise SourceError(f"{self._path} holds no decodable video frames")

    def read(self, frame_index: int, elapsed: float) -> CapturedFrame:
        """Return the latest source picture due at ``elapsed`` seconds of playback."""
        while True:
            if self._pending is None:
                self._pending = self._next_decoded()
            frame, due = self._pending
            if self._current is not None and due > elapsed:
                break
            self._current = frame
            self._pending = None
        return CapturedFrame(self._fit(self._current), now_us())

    def close(self) -> None:
        """Close the file."""
        if self._container is not None:
            self._container.close()
            self._container = None


class DeviceSource(FrameSource):
    """A live capture device (screen or camera) or network stream (a URL: ``format``
    None); the device or the network paces the reads.

    :meth:`from_container` decodes a stream that is open already (a network source that
    cannot be played without re-encoding, see :mod:`.remux`).
    """

    live = True

    def __init__(
        self,
        device: DeviceInput,
        width: int,
        height: int,
        description: str,
        reconnect: bool = False,
    ) -> None:
        super().__init__(width, height, description)
        self._device: DeviceInput | None = device
        self._container: Any = None
        self._frames: Iterator[av.VideoFrame] = iter(())
        #: Open a network source again (with backoff) when it ends or fails.
        self.reconnect = reconnect
        self._interrupted = threading.Event()
        self._open()

    def _open(self) -> None:
        device = self._device
        assert device is not None
        try:
            self._container = av.open(
                device.url, format=device.format, options=device.options, timeout=device.timeout
            )
            stream = self._container.streams.video[0]
        except (av.FFmpegError, IndexError, ValueError, OSError) as error:
            if self._container is not None:
                self._container.close()
                self._container = None
            # A URL may hold credentials: the description never does.
            where = f" ({device.format} {device.url!r})" if device.format else ""
            raise SourceError(
                f"cannot open {self.description}{where}: {self._scrub(error)}"
            ) from None
        stream.thread_type = "AUTO"
        self._frames = self._decode_frames(self._container)

    def _decode_frames(self, container: Any) -> Iterator[av.VideoFrame]:
        """The decoded pictures of the container's first video stream (a subclass may
        demux more, see :class:`~.remux_audio.AudioCarryingSource`)."""
        return container.decode(container.streams.video[0])  # type: ignore[no-any-return]

    def _scrub(self, error: Exception) -> str:
        """An error's text without a URL source's URL (FFmpeg errors may quote it)."""
        text = str(error)
        if self._device is not None and self._device.format is None:
            text = text.replace(self._device.url, self.description)
        return text

    @property
    def opened(self) -> bool:
        """True while the device is open (it is closed while paused)."""
        return self._container is not None

    def pause(self) -> None:
        """Close the device while nobody watches: a camera's light goes off, and a
        device left unread would only fill its buffers with stale pictures. (A source
        made :meth:`from_container` without ``reopen`` stays open: it could not be
        opened again; so does a source drained while paused.)"""
        if self._device is not None and not self.drain_while_paused:
            self.close()

    def resume(self) -> None:
        """Open the device again (a network source that cannot be opened now is retried
        with backoff, as when it drops)."""
        if self._container is None:
            try:
                self._open()
            except SourceError as error:
                if not self.reconnect:
                    raise
                self._reopen(f"cannot be opened again ({error})")

    @classmethod
    def from_container(
        cls,
        container: Any,
        width: int,
        height: int,
        description: str,
        reopen: DeviceInput | None = None,
    ) -> DeviceSource:
        """Decode the first video stream of an open container (which this source owns);
        ``reopen`` says how to open it again after a pause."""
        source = cls.__new__(cls)
        FrameSource.__init__(source, width, height, description)
        source._device = reopen
        source.reconnect = reopen is not None and reopen.format is None
        source._interrupted = threading.Event()
        source._container = container
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        source._frames = source._decode_frames(container)
        return source

    def read(self, frame_index: int, elapsed: float) -> CapturedFrame:
        """Block until the device delivers its next picture (a network source that ends
        or fails is opened again, with backoff, when :attr:`reconnect`)."""
        while True:
            try:
                frame = next(self._frames)
                return CapturedFrame(self._fit(frame), now_us())
            except StopIteration:
                why = "stopped delivering frames"
            except av.FFmpegError as error:
                why = f"failed: {self._scrub(error)}"
            if not self.reconnect or self._device is None:
                raise SourceError(f"{self.description} {why}")
            self._reopen(why)

    def _reopen(self, why: str) -> None:
        """Open a network source again after it ended or failed, with the remuxer's
        backoff; SourceError once :meth:`interrupt` is called."""
        from .remux import RETRY_DELAYS  # remux imports this module

        _log.warn("source {source} {why}; reopening it", source=self.description, why=why)
        self.close()
        failures = 0
        while not self._interrupted.wait(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]):
            try:
                self._open()
                return
            except SourceError as error:
                if failures == 0:
                    _log.warn("{error}; retrying", error=str(error))
                failures += 1
        raise SourceError(f"{self.description}: stopped while reopening it")

    def interrupt(self) -> None:
        """Stop waiting to reopen. Any thread."""
        self._interrupted.set()

    def close(self) -> None:
        """Close the device."""
        if self._container is not None:
            self._container.close()
            self._container = None


def open_source(spec: SourceSpec, width: int, height: int, fps: Fraction) -> FrameSource:
    """Open the source that ``spec`` names, producing ``width`` x ``height`` frames."""
    if spec.kind == "testsrc":
        return TestPatternSource(width, height)
    if spec.kind == "file":
        assert spec.target is not None
        return FileSource(spec.target, width, height)
    if spec.kind == "url":
        return open_url_source(spec, width, height)
    return DeviceSource(device_input(spec, fps), width, height, spec.describe())


def open_url_source(spec: SourceSpec, width: int, height: int) -> FrameSource:
    """A URL source, decoded (for what must scale it, such as renditions; see
    :mod:`.remux` for the remuxing path): a live stream paced by the network, or a file
    on a web server (it has a duration) played at its own rate and looped."""
    from .remux import OPEN_TIMEOUT, READ_TIMEOUT  # remux imports this module

    media = media_input(spec)
    timeout = (None if media.listen else OPEN_TIMEOUT, READ_TIMEOUT)
    source = DeviceSource(
        DeviceInput(media.url, None, dict(media.options), timeout),
        width,
        height,
        media.description,
        reconnect=True,
    )
    source.drain_while_paused = media.listen
    if media.pace_if_finite and source._container.duration is not None:
        source.close()
        played = FileSource(media.url, width, height)
        played.description = media.description  # no credentials
        return played
    return source
