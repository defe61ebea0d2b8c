"""The test pattern (moving picture, readable clock and counter) and the other sources."""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import av
import pytest

from streamrelay.publisher.sources import (
    DeviceSource,
    FileSource,
    SourceError,
    SourceSpec,
    TestPatternSource,
    device_input,
    open_source,
    parse_source_spec,
)
from streamrelay.publisher.testpattern import (
    FONT,
    GLYPH_ADVANCE,
    GLYPH_HEIGHT,
    GLYPH_WIDTH,
    TestPattern,
    clock_text,
    counter_text,
)


def luma(frame: av.VideoFrame) -> bytes:
    return bytes(memoryview(frame.planes[0]))


def read_text(pattern: TestPattern, frame: av.VideoFrame, line: int, length: int) -> str:
    """Read characters back off the picture by sampling the middle of every font cell."""
    plane = luma(frame)
    stride, scale = pattern.luma_stride, pattern.scale
    top = pattern.text_y + line * (pattern.line_height + pattern.line_gap)
    glyphs = {cells: character for character, cells in FONT.items()}
    text = []
    for index in range(length):
        rows = []
        for glyph_row in range(GLYPH_HEIGHT):
            y = top + glyph_row * scale + scale // 2
            cells = ""
            for column in range(GLYPH_WIDTH):
                x = pattern.text_x + (index * GLYPH_ADVANCE + column) * scale + scale // 2
                cells += "#" if plane[y * stride + x] > 128 else "."
            rows.append(cells)
        text.append(glyphs.get(tuple(rows), "?"))
    return "".join(text)


@pytest.mark.parametrize("size", [(1280, 720), (320, 240), (96, 64)])
def test_clock_and_counter_are_drawn_readably(size: tuple[int, int]) -> None:
    """The panel shows the capture time as HH:MM:SS.mmm and the frame number, legibly (read
    back with the same font), and both change from frame to frame."""
    pattern = TestPattern(*size)
    first_time, second_time = 1_700_000_123.456, 1_700_000_125.789
    first = pattern.render(41, first_time)
    second = pattern.render(42, second_time)
    assert read_text(pattern, first, 0, 12) == clock_text(first_time)
    assert read_text(pattern, first, 1, 8) == counter_text(41) == "#0000041"
    assert read_text(pattern, second, 0, 12) == clock_text(second_time)
    assert read_text(pattern, second, 1, 8) == "#0000042"
    assert clock_text(first_time) != clock_text(second_time)
    assert clock_text(first_time).endswith(".456")
    assert time.strftime("%H:%M:%S", time.localtime(first_time)) == clock_text(first_time)[:8]


def test_pattern_moves_over_time() -> None:
    """The bars, ramp and square move with time: pictures a fraction of a second apart
    differ outside the clock panel too, and the same instant renders the same picture."""
    pattern = TestPattern(320, 240)
    stride = pattern.luma_stride
    panel_rows = range(pattern.panel_y, pattern.panel_y + pattern.panel_height)

    def outside_panel(frame: av.VideoFrame) -> bytes:
        plane = luma(frame)
        return b"".join(
            plane[y * stride : y * stride + 320] for y in range(240) if y not in panel_rows
        )

    base = pattern.render(0, 1_700_000_000.0)
    assert outside_panel(base) == outside_panel(pattern.render(0, 1_700_000_000.0))
    for later in (0.1, 0.5, 1.3):
        assert outside_panel(base) != outside_panel(pattern.render(0, 1_700_000_000.0 + later))
    chroma = bytes(memoryview(base.planes[1]))
    assert len(set(chroma)) > 4  # in colour, not grey


def test_pattern_rejects_odd_or_tiny_sizes() -> None:
    """yuv420p needs even sizes, and the clock needs room."""
    with pytest.raises(ValueError):
        TestPattern(321, 240)
    with pytest.raises(ValueError):
        TestPattern(64, 48)


def test_test_pattern_source_timestamp_matches_drawn_clock() -> None:
    """The capture timestamp is the instant drawn on the clock (for latency by eye)."""
    source = TestPatternSource(320, 240, wall_clock=lambda: 1_700_000_010.25)
    captured = source.read(7, 0.0)
    assert captured.capture_time_us == 1_700_000_010_250_000
    assert (captured.frame.width, captured.frame.height) == (320, 240)
    assert read_text(TestPattern(320, 240), captured.frame, 0, 12) == clock_text(1_700_000_010.25)


def test_parse_source_spec(tmp_path: Path) -> None:
    """testsrc, screen[:INPUT], file:PATH, camera[:DEVICE] and bare file paths parse; the
    rest is refused with a message."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    assert parse_source_spec("testsrc") == SourceSpec("testsrc")
    assert parse_source_spec("screen") == SourceSpec("screen")
    assert parse_source_spec("screen::1.0+10,20") == SourceSpec("screen", ":1.0+10,20")
    assert parse_source_spec("camera:/dev/video2") == SourceSpec("camera", "/dev/video2")
    assert parse_source_spec(f"file:{clip}") == SourceSpec("file", str(clip))
    assert parse_source_spec(str(clip)) == SourceSpec("file", str(clip))
    assert parse_source_spec("file:C:\\clips\\a.mp4") == SourceSpec("file", "C:\\clips\\a.mp4")
    for bad in ("webcam", "file:", "testsrc:x", str(tmp_path / "missing.mp4")):
        with pytest.raises(ValueError):
            parse_source_spec(bad)


def test_device_inputs_per_platform() -> None:
    """screen and camera map to x11grab/v4l2, gdigrab/dshow and avfoundation, with options."""
    fps = Fraction(30)
    linux = device_input(SourceSpec("screen"), fps, "linux", {"DISPLAY": ":0"})
    assert (linux.format, linux.url, linux.options["framerate"]) == ("x11grab", ":0", "30")
    with pytest.raises(SourceError):
        device_input(SourceSpec("screen"), fps, "linux", {})
    windows = device_input(SourceSpec("screen"), Fraction(30000, 1001), "win32", {})
    assert (windows.format, windows.url, windows.options["framerate"]) == (
        "gdigrab",
        "desktop",
        "30000/1001",
    )
    mac = device_input(SourceSpec("screen"), fps, "darwin", {})
    assert (mac.format, mac.url) == ("avfoundation", "Capture screen 0")
    assert device_input(SourceSpec("camera"), fps, "linux", {}).url == "/dev/video0"
    camera = device_input(SourceSpec("camera", "Cam", {"video_size": "640x480"}), fps, "win32")
    assert (camera.format, camera.url, camera.options) == (
        "dshow",
        "video=Cam",
        {"video_size": "640x480"},
    )
    with pytest.raises(SourceError):
        device_input(SourceSpec("camera"), fps, "win32", {})
    assert device_input(SourceSpec("camera"), fps, "darwin", {}).url == "0:none"


def test_missing_device_fails_with_a_clear_error() -> None:
    """Opening a capture device that is not there raises SourceError naming it."""
    with pytest.raises(SourceError, match="/dev/video-none"):
        DeviceSource(
            device_input(SourceSpec("camera", "/dev/video-none"), Fraction(30), "linux", {}),
            320,
            240,
            "camera:/dev/video-none",
        )


def write_clip(path: Path, frames: int, fps: int, size: tuple[int, int]) -> None:
    pattern = TestPattern(*size)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            frame = pattern.render(index, 1_700_000_000 + index)
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_file_source_loops_and_keeps_the_file_speed(tmp_path: Path) -> None:
    """A 10-frame 10 fps clip read at 30 fps output repeats each picture about three times,
    loops after one second, and comes out at the output size in yuv420p."""
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=10, fps=10, size=(192, 128))
    source = open_source(SourceSpec("file", str(clip)), 320, 240, Fraction(30))
    assert isinstance(source, FileSource) and not source.live
    pictures = [source.read(index, index / 30) for index in range(75)]
    source.close()
    first = pictures[0].frame
    assert (first.width, first.height, first.format.name) == (320, 240, "yuv420p")
    planes = [luma(captured.frame) for captured in pictures]
    changes = sum(1 for a, b in zip(planes, planes[1:], strict=False) if a != b)
    assert 20 <= changes <= 26  # about 10 source pictures a second over 2.5 s
    assert planes[0] == planes[30] == planes[60]  # looped: 1.0 s and 2.0 s show frame 0
    assert planes[0] != planes[15]


def test_file_source_refuses_missing_or_empty_files(tmp_path: Path) -> None:
    """A missing file, or one with no video, is a SourceError."""
    with pytest.raises(SourceError):
        FileSource(str(tmp_path / "missing.mp4"), 320, 240)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    with pytest.raises(SourceError):
        FileSource(str(junk), 320, 240)
