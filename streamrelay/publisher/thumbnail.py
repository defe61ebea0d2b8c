"""Thumbnails of the picture for the relay's listing: a small JPEG every few seconds.

The capture thread (never the reactor) calls :meth:`ThumbnailMaker.maybe_make` with each
raw frame it captured; every ``interval`` seconds the frame is scaled down to ``width``
pixels (aspect kept) and encoded with FFmpeg's MJPEG encoder through PyAV, about a
millisecond or two for 320 pixels.  The quality scale adapts so that a JPEG stays under
``target_bytes`` (a few KiB); one that cannot be brought under the relay's limit
(:data:`~streamrelay.wire.MAX_THUMBNAIL_BYTES`) is not sent.  The publisher sends it as a
``thumbnail`` text message (docs/protocol.md), which relays that predate thumbnails
ignore.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any, Final

import av

from streamrelay.wire import MAX_THUMBNAIL_BYTES

DEFAULT_WIDTH: Final = 320
DEFAULT_INTERVAL: Final = 5.0
DEFAULT_TARGET_BYTES: Final = 12 * 1024
# FFmpeg's MJPEG quality scale: 2 (best) to 31 (smallest).
MIN_QSCALE: Final = 2
MAX_QSCALE: Final = 31
START_QSCALE: Final = 5


def thumbnail_size(width: int, height: int, target_width: int) -> tuple[int, int]:
    """The thumbnail's even size: ``target_width`` wide (never wider than the picture),
    the picture's aspect ratio kept."""
    out_width = max(2, min(target_width, width) & ~1)
    out_height = max(2, round(height * out_width / width / 2) * 2)
    return out_width, out_height


class ThumbnailMaker:
    """Makes a JPEG of a frame every ``interval`` seconds (see the module docstring)."""

    def __init__(
        self,
        *,
        interval: float = DEFAULT_INTERVAL,
        width: int = DEFAULT_WIDTH,
        target_bytes: int = DEFAULT_TARGET_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError("the thumbnail interval must be positive")
        self.interval = interval
        self.width = width
        self.target_bytes = min(target_bytes, MAX_THUMBNAIL_BYTES)
        self._monotonic = monotonic
        self._next_due: float | None = None
        self._qscale = START_QSCALE
        self.made = 0
        self.last_size = 0
        self.encode_seconds = 0.0

    def maybe_make(self, frame: av.VideoFrame) -> bytes | None:
        """The JPEG of ``frame`` when one is due (and fits), else None."""
        if not self.take_turn():
            return None
        return self.make(frame)

    def take_turn(self) -> bool:
        """True when a thumbnail is due, and then not again for ``interval`` seconds: a
        caller that must decode a picture first asks this before decoding it."""
        now = self._monotonic()
        if self._next_due is not None and now < self._next_due:
            return False
        self._next_due = now + self.interval
        return True

    def make(self, frame: av.VideoFrame) -> bytes | None:
        """The JPEG of ``frame`` now (counted), or None when it does not fit."""
        started = time.perf_counter()
        jpeg = self.encode(frame)
        self.encode_seconds += time.perf_counter() - started
        if jpeg is not None:
            self.made += 1
            self.last_size = len(jpeg)
        return jpeg

    def encode(self, frame: av.VideoFrame) -> bytes | None:
        """``frame`` as a JPEG under the relay's limit, adapting the quality scale for
        the next one; None if even the coarsest scale is too large."""
        width, height = thumbnail_size(frame.width, frame.height, self.width)
        small = frame.reformat(width=width, height=height, format="yuvj420p")
        while True:
            jpeg = _mjpeg(small, self._qscale)
            if len(jpeg) > self.target_bytes and self._qscale < MAX_QSCALE:
                # Coarser now and for the next ones; retried at once only when over the
                # relay's limit (a little over the target is fine for one thumbnail).
                self._qscale = min(MAX_QSCALE, self._qscale + 3)
                if len(jpeg) > MAX_THUMBNAIL_BYTES:
                    continue
            elif len(jpeg) < self.target_bytes // 3 and self._qscale > MIN_QSCALE:
                self._qscale -= 1
            return jpeg if len(jpeg) <= MAX_THUMBNAIL_BYTES else None


class KeyframeThumbnails:
    """Thumbnails for a publisher that decodes nothing (a remuxed source): when one is
    due, ONE keyframe access unit, which carries its parameter sets in-band (the v1
    profiles require it), is decoded by a decoder of its own that sees nothing else, and
    the picture goes to a :class:`ThumbnailMaker`. Called on the source thread after
    the access unit was handed off, so it never delays a frame: about 10 ms every
    ``interval`` seconds for a 720p or 1080p H.264 IDR, decoding and JPEG together
    (0.2 % of a core at one every 5 s)."""

    def __init__(self, maker: ThumbnailMaker, send: Callable[[bytes], None]) -> None:
        self.maker = maker
        self._send = send
        #: Keyframes that were due for a thumbnail but did not decode.
        self.undecodable = 0

    def offer(self, codec_name: str, access_unit: bytes) -> bytes | None:
        """Decode ``access_unit`` (a KEY of ``codec_name``: ``h264`` or ``hevc``) and
        send its thumbnail when one is due; the JPEG sent, or None."""
        if not self.maker.take_turn():
            return None
        try:
            decoder: Any = av.CodecContext.create(codec_name, "r")
            frames = list(decoder.decode(av.Packet(access_unit)))
            frames += list(decoder.decode(None))
        except (av.FFmpegError, ValueError):
            frames = []
        if not frames:
            self.undecodable += 1
            return None
        jpeg = self.maker.make(frames[0])
        if jpeg is not None:
            self._send(jpeg)
        return jpeg


def _mjpeg(frame: av.VideoFrame, qscale: int) -> bytes:
    """One JPEG of ``frame`` (yuvj420p) at a fixed quality scale."""
    context: Any = av.CodecContext.create("mjpeg", "w")
    context.width = frame.width
    context.height = frame.height
    context.pix_fmt = "yuvj420p"
    context.time_base = Fraction(1, 25)
    context.options = {"qmin": str(qscale), "qmax": str(qscale)}
    packets = list(context.encode(frame)) + list(context.encode(None))
    return b"".join(bytes(packet) for packet in packets)
