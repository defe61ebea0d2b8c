"""The publisher's thumbnails (a JPEG every few seconds, made on the capture thread with
PyAV's MJPEG encoder) and its side of viewer reports (the status line shows them)."""

from __future__ import annotations

import base64
import os
from fractions import Fraction
from typing import Any

import av
import pytest

from streamrelay.publisher.pipeline import CapturePipeline
from streamrelay.publisher.sources import TestPatternSource
from streamrelay.publisher.status import viewer_report_text
from streamrelay.publisher.testpattern import TestPattern
from streamrelay.publisher.thumbnail import ThumbnailMaker, thumbnail_size
from streamrelay.wire import JPEG_SOI, MAX_THUMBNAIL_BYTES
from tests.test_publisher_client import FakeSink, connected_publisher, make_pipeline


def decode_jpeg(jpeg: bytes) -> av.VideoFrame:
    """Decode a JPEG with FFmpeg's MJPEG decoder (fails the test on a broken one)."""
    decoder: Any = av.CodecContext.create("mjpeg", "r")
    frames = decoder.decode(av.Packet(jpeg))
    assert len(frames) == 1
    return frames[0]


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("size", "expected"),
    [((1280, 720), (320, 180)), ((640, 480), (320, 240)), ((160, 96), (160, 96)),
     ((1920, 1080), (320, 180)), ((321, 200), (320, 200))],
)
def test_thumbnails_are_320_wide_at_most_with_the_aspect_kept(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    """Even sizes, never wider than the picture."""
    assert thumbnail_size(*size, 320) == expected


def test_a_thumbnail_of_the_test_pattern_is_a_small_decodable_jpeg() -> None:
    """320x180, a few KiB, starts with SOI, and FFmpeg decodes it to the same size."""
    maker = ThumbnailMaker(monotonic=Ticks())
    jpeg = maker.maybe_make(TestPattern(1280, 720).render(7, 1_700_000_000.0))
    assert jpeg is not None and jpeg.startswith(JPEG_SOI)
    assert 1000 < len(jpeg) <= maker.target_bytes
    frame = decode_jpeg(jpeg)
    assert (frame.width, frame.height) == (320, 180)


def test_one_thumbnail_per_interval() -> None:
    """The first frame makes one; frames within the interval make none; the next after."""
    ticks = Ticks()
    maker = ThumbnailMaker(interval=5.0, monotonic=ticks)
    pattern = TestPattern(320, 180)
    assert maker.maybe_make(pattern.render(0, 0.0)) is not None
    ticks.now += 4.9
    assert maker.maybe_make(pattern.render(1, 4.9)) is None
    ticks.now += 0.1
    assert maker.maybe_make(pattern.render(2, 5.0)) is not None
    assert maker.made == 2


def test_noise_drives_the_quality_down_to_stay_under_the_limits() -> None:
    """Random pixels at 320 wide are the worst case: the quality scale rises until the
    JPEG is under the relay's 46 KiB, and later ones approach the target."""
    width, height = 640, 360
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane in frame.planes:
        plane.update(os.urandom(plane.buffer_size))
    ticks = Ticks()
    maker = ThumbnailMaker(monotonic=ticks, target_bytes=8 * 1024)
    sizes = []
    for _ in range(8):
        jpeg = maker.maybe_make(frame)
        assert jpeg is not None and len(jpeg) <= MAX_THUMBNAIL_BYTES
        decode_jpeg(jpeg)
        sizes.append(len(jpeg))
        ticks.now += maker.interval
    assert sizes[-1] < sizes[0]


def test_the_pipeline_hands_thumbnails_over_only_while_ready() -> None:
    """A ready sink gets a JPEG with the first frame, none while offline."""
    sink = FakeSink()
    pipeline, _ = make_pipeline(sink, None)
    sent: list[bytes] = []
    ticks = Ticks()
    hooked = CapturePipeline(
        TestPatternSource(160, 96),
        pipeline._encoder,
        sink,
        reactor=None,
        fps=Fraction(30),
        thumbnails=ThumbnailMaker(monotonic=ticks),
        send_thumbnail=sent.append,
    )
    from streamrelay.publisher.client import Readiness

    sink.readiness = Readiness.OFFLINE
    hooked.run_once(0, 0.0, True)
    assert sent == []
    sink.readiness = Readiness.READY
    hooked.run_once(1, 1 / 30, True)
    hooked.run_once(2, 2 / 30, False)
    assert len(sent) == 1 and sent[0].startswith(JPEG_SOI)


def test_the_publisher_sends_thumbnails_as_text_and_keeps_viewer_reports() -> None:
    """send_thumbnail writes a ``thumbnail`` text message (base64 of the JPEG); a
    ``viewer-report`` from the relay is kept for the status line and forgotten when the
    connection goes."""
    publisher, relay, _, _ = connected_publisher()
    jpeg = b"\xff\xd8\xff\xe0" + bytes(100)
    assert publisher.send_thumbnail(jpeg)
    sent = relay.last.messages()
    assert sent == [{"type": "thumbnail", "jpeg": base64.b64encode(jpeg).decode()}]
    report = {"type": "viewer-report", "reports": 3, "latency_ms": {"p50": 120, "p95": 180},
              "stalls": 0}
    relay.last.send_text(report)
    assert publisher.viewer_report == report
    relay.last.drop()
    assert publisher.viewer_report is None
    assert not publisher.send_thumbnail(jpeg)


def test_the_status_line_text_of_viewer_reports() -> None:
    """Latency percentiles, stalls and the report count; nothing without reports; odd
    values from the relay never break the line."""
    assert viewer_report_text(None) == ""
    assert viewer_report_text({"reports": 0}) == ""
    text = viewer_report_text(
        {"reports": 12, "latency_ms": {"p50": 120.4, "p95": 181.0}, "stalls": 2}
    )
    assert text == "  latency p50 120 ms p95 181 ms, 2 stalls (12 reports/min)"
    assert "stalls" in viewer_report_text({"reports": 1, "latency_ms": {"p50": "x"}})
