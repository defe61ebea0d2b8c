"""A moving test pattern with a running clock and frame counter, drawn without numpy.

PyAV's FFmpeg has no ``drawtext`` filter, so the clock and counter are drawn with a tiny
built-in 5x7 bitmap font straight into the yuv420p planes. Everything is built from
precomputed rows with bytes slicing, so a 1280x720 frame costs well under a millisecond
of Python: the encoder, not the pattern, sets the frame rate.

The picture: scrolling colour bars over the top two thirds, a luma ramp scrolling the other
way below, a bouncing orange square, and a black panel in the middle showing the capture
time (local ``HH:MM:SS.mmm``, the same instant as the message header's timestamp) and
``#frame-number``; a flash square in the top-left corner, white on every
:data:`BEAT_FRAMES`-th frame (where ``--audio tone`` beeps), black otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Final

import av

# 5x7 glyphs, one string of five "#"/"." cells per row.
FONT: Final[Mapping[str, tuple[str, ...]]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    ":": (".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."),
    ".": (".....", ".....", ".....", ".....", ".....", ".##..", ".##.."),
    "#": (".#.#.", ".#.#.", "#####", ".#.#.", "#####", ".#.#.", ".#.#."),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    " ": (".....",) * 7,
}
GLYPH_WIDTH: Final = 5
GLYPH_HEIGHT: Final = 7
GLYPH_ADVANCE: Final = GLYPH_WIDTH + 1  # one blank column between characters
CLOCK_CHARACTERS: Final = 12  # "HH:MM:SS.mmm"
COUNTER_DIGITS: Final = 7
# Every BEAT_FRAMES-th frame (counter a multiple of it) shows a white flash square in the
# top-left corner (black otherwise); ``--audio tone`` beeps from that frame's capture time.
BEAT_FRAMES: Final = 30

# BT.601 limited-range YUV for 100% colour bars: white, yellow, cyan, green, magenta, red,
# blue, black.
_BARS: Final = (
    (235, 128, 128),
    (210, 16, 146),
    (170, 166, 16),
    (145, 54, 34),
    (106, 202, 222),
    (81, 90, 240),
    (41, 240, 110),
    (16, 128, 128),
)
_BOX_YUV: Final = (152, 50, 188)  # orange
_TEXT_Y: Final = 235
_PANEL_Y: Final = 16
_NEUTRAL_CHROMA: Final = 128
MIN_WIDTH: Final = 96
MIN_HEIGHT: Final = 64


def clock_text(wall_time: float) -> str:
    """Format a Unix time as local ``HH:MM:SS.mmm`` (the clock drawn on the pattern)."""
    whole = int(wall_time)
    milliseconds = int((wall_time - whole) * 1000)
    return time.strftime("%H:%M:%S", time.localtime(whole)) + f".{milliseconds:03d}"


def counter_text(frame_index: int) -> str:
    """Format a frame number the way the pattern draws it (``#0000042``)."""
    return f"#{frame_index % 10**COUNTER_DIGITS:0{COUNTER_DIGITS}d}"


def _triangle(position: float, span: int) -> int:
    """Bounce ``position`` back and forth over [0, span]."""
    if span <= 0:
        return 0
    phase = position % (2 * span)
    return int(phase if phase <= span else 2 * span - phase)


class TestPattern:
    """Renders test-pattern frames of a fixed size (see the module docstring)."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, width: int, height: int) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"size must be even, got {width}x{height}")
        if width < MIN_WIDTH or height < MIN_HEIGHT:
            raise ValueError(f"test pattern needs at least {MIN_WIDTH}x{MIN_HEIGHT}")
        self.width = width
        self.height = height
        probe = av.VideoFrame(width, height, "yuv420p")
        self._luma_stride = probe.planes[0].line_size
        self._chroma_stride = probe.planes[1].line_size
        self._chroma_width = width // 2
        self._chroma_height = height // 2
        self._bars_bottom = (height * 2 // 3) & ~1

        # Rows two periods long, so that any scroll offset is one slice.
        self._bar_rows = tuple(
            bytes(_BARS[(x % width) * 8 // width][plane] for x in range(2 * width))
            if plane == 0
            else bytes(
                _BARS[((2 * x) % width) * 8 // width][plane] for x in range(2 * self._chroma_width)
            )
            for plane in range(3)
        )
        self._ramp_row = bytes(16 + (x % width) * 219 // width for x in range(2 * width))

        self.box_size = max(2, (height // 6) & ~1)

        self.scale = max(1, min(width // 110, height // 60))
        scale = self.scale
        self.text_width = CLOCK_CHARACTERS * GLYPH_ADVANCE * scale
        self.line_height = GLYPH_HEIGHT * scale
        self.line_gap = 3 * scale
        padding = 2 * scale
        panel_width = (self.text_width + 2 * padding + 1) & ~1
        panel_height = (2 * self.line_height + self.line_gap + 2 * padding + 1) & ~1
        self.panel_x = ((width - panel_width) // 2) & ~1
        self.panel_y = ((height - panel_height) // 2) & ~1
        self.panel_width = panel_width
        self.panel_height = panel_height
        self.text_x = self.panel_x + padding
        self.text_y = self.panel_y + padding
        self._glyph_rows: dict[tuple[str, int], bytes] = {}

    @property
    def luma_stride(self) -> int:
        """Bytes per row of the Y plane (width plus alignment padding)."""
        return self._luma_stride

    def render(self, frame_index: int, wall_time: float) -> av.VideoFrame:
        """Return the pattern for ``frame_index`` captured at ``wall_time`` (Unix seconds).

        Motion follows ``wall_time``, so it stays smooth in real time when frames are
        dropped; the panel shows ``clock_text(wall_time)`` and ``counter_text(frame_index)``.
        """
        width, height = self.width, self.height
        luma_stride, chroma_stride = self._luma_stride, self._chroma_stride
        chroma_width = self._chroma_width
        bars_bottom = self._bars_bottom

        scroll = int(wall_time * width / 4) % width & ~1  # a quarter of the width a second
        ramp_scroll = width - 1 - int(wall_time * width / 6) % width
        luma_pad = bytes(luma_stride - width)
        chroma_pad = bytes(chroma_stride - chroma_width)
        luma = bytearray(
            (self._bar_rows[0][scroll : scroll + width] + luma_pad) * bars_bottom
            + (self._ramp_row[ramp_scroll : ramp_scroll + width] + luma_pad)
            * (height - bars_bottom)
        )
        chroma_scroll = scroll // 2
        neutral_chroma_row = bytes([_NEUTRAL_CHROMA]) * chroma_width + chroma_pad
        chroma_planes = [
            bytearray(
                (self._bar_rows[plane][chroma_scroll : chroma_scroll + chroma_width] + chroma_pad)
                * (bars_bottom // 2)
                + neutral_chroma_row * (self._chroma_height - bars_bottom // 2)
            )
            for plane in (1, 2)
        ]

        box = self.box_size
        box_x = _triangle(wall_time * width / 3, width - box) & ~1
        box_y = _triangle(wall_time * height / 2.5, height - box) & ~1
        self._fill(luma, chroma_planes, box_x, box_y, box, box, _BOX_YUV)
        flash = _TEXT_Y if frame_index % BEAT_FRAMES == 0 else _PANEL_Y
        self._fill(luma, chroma_planes, 0, 0, box, box, (flash, _NEUTRAL_CHROMA, _NEUTRAL_CHROMA))
        self._fill(
            luma,
            chroma_planes,
            self.panel_x,
            self.panel_y,
            self.panel_width,
            self.panel_height,
            (_PANEL_Y, _NEUTRAL_CHROMA, _NEUTRAL_CHROMA),
        )
        self._draw_text(luma, clock_text(wall_time), self.text_x, self.text_y)
        self._draw_text(
            luma,
            counter_text(frame_index),
            self.text_x,
            self.text_y + self.line_height + self.line_gap,
        )

        frame = av.VideoFrame(width, height, "yuv420p")
        frame.planes[0].update(bytes(luma))
        frame.planes[1].update(bytes(chroma_planes[0]))
        frame.planes[2].update(bytes(chroma_planes[1]))
        return frame

    def _fill(
        self,
        luma: bytearray,
        chroma_planes: list[bytearray],
        x: int,
        y: int,
        fill_width: int,
        fill_height: int,
        colour: tuple[int, int, int],
    ) -> None:
        """Fill an even-aligned rectangle with one colour."""
        luma_run = bytes([colour[0]]) * fill_width
        for row in range(y, y + fill_height):
            start = row * self._luma_stride + x
            luma[start : start + fill_width] = luma_run
        for plane, value in zip(chroma_planes, colour[1:], strict=True):
            chroma_run = bytes([value]) * (fill_width // 2)
            for row in range(y // 2, (y + fill_height) // 2):
                start = row * self._chroma_stride + x // 2
                plane[start : start + fill_width // 2] = chroma_run

    def _glyph_row(self, character: str, glyph_row: int) -> bytes:
        """One scanline of one character, scaled, with its spacing column (cached)."""
        key = (character, glyph_row)
        cached = self._glyph_rows.get(key)
        if cached is None:
            cells = FONT.get(character, FONT[" "])[glyph_row] + "."
            cached = b"".join(
                bytes([_TEXT_Y if cell == "#" else _PANEL_Y]) * self.scale for cell in cells
            )
            self._glyph_rows[key] = cached
        return cached

    def _draw_text(self, luma: bytearray, text: str, x: int, y: int) -> None:
        """Draw ``text`` with its top-left corner at (x, y), clipped to the frame width."""
        visible = max(0, min(len(text) * GLYPH_ADVANCE * self.scale, self.width - x))
        for glyph_row in range(GLYPH_HEIGHT):
            scanline = b"".join(self._glyph_row(character, glyph_row) for character in text)
            scanline = scanline[:visible]
            for repeat in range(self.scale):
                start = (y + glyph_row * self.scale + repeat) * self._luma_stride + x
                luma[start : start + len(scanline)] = scanline
