"""Viewer reports and thumbnails in a real browser: the real publisher process sends its
test pattern to the real ``twistd streamrelay``; the player in headless Chromium measures
its clock offset against the relay and reports latency, fps, drops and stalls; the relay
sums them up in ``/api/streams``; the index page shows the publisher's thumbnail.

The latency the players report is compared with the latency read off the picture itself,
the way users are told to measure it ("film a clock"): the test pattern draws its capture
time on every frame, and the test reads those digits back from the player's canvas at a
known moment of the page's clock (same host, so the same clock as the publisher's).
"""

from __future__ import annotations

import datetime
import functools
import signal
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest

from streamrelay.publisher.testpattern import (
    FONT,
    GLYPH_ADVANCE,
    GLYPH_HEIGHT,
    GLYPH_WIDTH,
    TestPattern,
)
from tests.support.publisher_process import light_encode
from tests.support.relay_api import api_streams, stream_entry
from tests.support.relay_process import StartRelay
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(150)]

WIDTH, HEIGHT = 640, 360
CLOCK_CHARACTERS = 12  # HH:MM:SS.mmm

# The page's clock and the font cells of the clock line on the player's canvas (1: lit),
# read in one synchronous step so that the picture cannot change in between.
READ_CLOCK = """
([x0, y0, scale, characters, advance, glyphWidth, glyphHeight]) => {
  const canvas = document.getElementById('video');
  if (!canvas || canvas.width === 0) return null;
  const now = Date.now();
  const g = canvas.getContext('2d');
  const w = characters * advance * scale, h = glyphHeight * scale;
  const d = g.getImageData(x0, y0, w, h).data;
  const cells = [];
  for (let c = 0; c < characters; c++) {
    for (let row = 0; row < glyphHeight; row++) {
      for (let col = 0; col < glyphWidth; col++) {
        const x = (c * advance + col) * scale + (scale >> 1);
        const y = row * scale + (scale >> 1);
        const i = (y * w + x) * 4;
        const luma = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2];
        cells.push(luma > 128 ? 1 : 0);
      }
    }
  }
  return { now, cells, width: canvas.width, height: canvas.height };
}
"""

READ_PLAYER = """() => {
  const p = window.streamrelayPlayer;
  return p ? { state: p.state, framesDecoded: p.framesDecoded, reportsSent: p.reportsSent,
               lastReport: p.lastReport, clockOffsetMs: p.clockOffsetMs,
               clockRttMs: p.clockRttMs, stalls: p.stalls } : null;
}"""


def pictured_clock(cells: list[int]) -> str | None:
    """The HH:MM:SS.mmm drawn on the frame, or None when a glyph is unreadable."""
    glyphs = {rows: character for character, rows in FONT.items()}
    per_glyph = GLYPH_WIDTH * GLYPH_HEIGHT
    text = ""
    for index in range(CLOCK_CHARACTERS):
        bits = cells[index * per_glyph : (index + 1) * per_glyph]
        rows = tuple(
            "".join("#" if bit else "." for bit in bits[r * GLYPH_WIDTH : (r + 1) * GLYPH_WIDTH])
            for r in range(GLYPH_HEIGHT)
        )
        character = glyphs.get(rows)
        if character is None:
            return None
        text += character
    return text


def clock_to_epoch_ms(text: str, near_ms: float) -> float:
    """The Unix time in ms of local ``HH:MM:SS.mmm`` nearest to ``near_ms``."""
    clock = datetime.datetime.strptime(text, "%H:%M:%S.%f").time()
    near = datetime.datetime.fromtimestamp(near_ms / 1000)
    candidates = [
        datetime.datetime.combine(near.date() + datetime.timedelta(days=shift), clock)
        for shift in (-1, 0, 1)
    ]
    return min((c.timestamp() * 1000 for c in candidates), key=lambda t: abs(t - near_ms))


def test_players_report_latency_close_to_the_pictured_clock_and_index_shows_thumbnails(
    start_relay: StartRelay,
    start_publisher: Callable[..., Any],
    open_page: Callable[..., Any],
    figures: dict[str, Any],
) -> None:
    """Two players watch a real publisher's test pattern: each measures a clock offset
    within its round trip's bound (same host: the true offset is 0), sends reports whose
    latency is close to what the pictured capture clock shows on its canvas, and
    ``/api/streams`` shows p50/p95 from both; the index page shows the stream's thumbnail,
    loaded (naturalWidth > 0), and the reported latency."""
    relay = start_relay()
    start_publisher(
        f"{relay.ws_url}/publish/reports",
        "--size", f"{WIDTH}x{HEIGHT}", "--fps", "30", "--preset", "ultrafast",
        "--bitrate", "1500k", "--thumbnail-interval", "2",
    )

    def live() -> bool:
        entry = stream_entry(api_streams(relay), "reports")
        return bool(entry and entry["live"])

    wait_until(live, 30, 0.2)
    pages = [open_page(f"{relay.http_url}/view/reports")[0] for _ in range(2)]

    def decoding(page: Any) -> bool:
        return bool((page.evaluate(READ_PLAYER) or {}).get("framesDecoded", 0) > 30)

    for page in pages:
        wait_until(functools.partial(decoding, page), 30, 0.2)

    # Film the clock: read the pictured capture time off the canvas, many times.
    pattern = TestPattern(WIDTH, HEIGHT)
    geometry = [pattern.text_x, pattern.text_y, pattern.scale, CLOCK_CHARACTERS,
                GLYPH_ADVANCE, GLYPH_WIDTH, GLYPH_HEIGHT]
    pictured: list[float] = []
    unreadable = 0
    reports: list[dict[str, Any]] = []
    seen_reports: set[tuple[int, int]] = set()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and (len(pictured) < 60 or len(reports) < 6):
        for number, page in enumerate(pages):
            sample = page.evaluate(READ_CLOCK, geometry)
            if sample is None or (sample["width"], sample["height"]) != (WIDTH, HEIGHT):
                continue
            text = pictured_clock(sample["cells"])
            if text is None:
                unreadable += 1
                continue
            pictured.append(sample["now"] - clock_to_epoch_ms(text, sample["now"]))
            state = page.evaluate(READ_PLAYER)
            sent = state["reportsSent"]
            if sent and (number, sent) not in seen_reports and state["lastReport"]:
                seen_reports.add((number, sent))
                reports.append({**state["lastReport"], "rtt": state["clockRttMs"]})
        pages[0].wait_for_timeout(150)

    assert len(pictured) >= 30, f"only {len(pictured)} clock readings ({unreadable} unreadable)"
    with_latency = [r for r in reports if r["latency_ms"] is not None]
    assert len(with_latency) >= 4, reports
    for report in with_latency:
        # Same host: the true offset is 0, and NTP's error is within half the round trip.
        assert abs(report["clock_offset_ms"]) <= report["rtt"] / 2 + 2, report
        assert report["fps"] > 0 and report["dropped"] >= 0 and report["stalls"] >= 0

    reported = [r["latency_ms"] for r in with_latency]
    summary: dict[str, Any] = {}

    def summarised() -> bool:
        nonlocal summary
        entry = stream_entry(api_streams(relay), "reports") or {}
        summary = entry.get("viewer_reports") or {}
        return bool(summary.get("reports", 0) >= 4 and summary.get("latency_ms"))

    wait_until(summarised, 20, 0.5)
    pictured_p50 = statistics.median(pictured)
    reported_p50 = statistics.median(reported)
    result = {
        "reported_latency_ms": {"p50": round(reported_p50, 1), "reports": len(reported),
                                "min": min(reported), "max": max(reported)},
        "relay_summary": summary,
        "pictured_clock_latency_ms": {
            "p50": round(pictured_p50, 1), "samples": len(pictured), "unreadable": unreadable,
            "min": round(min(pictured), 1), "max": round(max(pictured), 1),
            # A frame stays on the canvas for a frame interval and is read at a random
            # moment of it: on average half an interval after it was shown.
            "p50_at_display_start": round(pictured_p50 - 1000 / 30 / 2, 1),
        },
        "clock_offsets_ms": sorted({r["clock_offset_ms"] for r in with_latency}),
    }
    print(f"players reported latency p50 {reported_p50:.1f} ms "
          f"(relay: p50 {summary['latency_ms']['p50']} ms, p95 {summary['latency_ms']['p95']} ms, "
          f"{summary['reports']} reports); pictured clock on the canvas p50 {pictured_p50:.1f} ms")
    figures["viewer_reports"] = result
    # Both measure capture-to-picture; the canvas reading adds the time a frame stays
    # shown (up to a frame interval, 33 ms), so it reads a little more.
    assert pictured_p50 > 0 and reported_p50 > 0, result
    assert abs(pictured_p50 - reported_p50) < max(150.0, 0.5 * pictured_p50), result
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p95"]

    # The index page shows the thumbnail, loaded.
    index, log = open_page(f"{relay.http_url}/")

    def thumbnail_loaded() -> Any:
        return index.evaluate(
            "() => { const img = document.querySelector('img.stream-thumb');"
            " return img && !img.hidden && img.complete ? img.naturalWidth : 0; }"
        )

    natural_width = wait_until(thumbnail_loaded, 20, 0.2)
    assert natural_width == 320
    # ...and the latency the players report.
    shown = wait_until(
        lambda: index.evaluate(
            "() => [...document.querySelectorAll('.stream-info .stat')]"
            ".map((e) => e.textContent).find((t) => t.endsWith('ms latency')) || null"
        ),
        10, 0.2,
    )
    assert int(shown.split()[0]) >= 0
    assert index.evaluate("() => window.__streamrelayTest.cspViolations") == []
    assert log.errors() == []


def test_a_publisher_that_freezes_shows_as_a_stall_in_the_reports(
    start_relay: StartRelay,
    start_publisher: Callable[..., Any],
    open_page: Callable[..., Any],
) -> None:
    """The publisher process is stopped (SIGSTOP) for 3 s while a player watches: the
    stream stays live but no frame comes, so the player counts a stall, its next
    report carries it, and /api/streams sums it up; afterwards playback goes on."""
    relay = start_relay()
    process = start_publisher(
        f"{relay.ws_url}/publish/freeze", *light_encode("320x180", 30, "300k")
    )
    page, _ = open_page(f"{relay.http_url}/view/freeze")
    wait_until(lambda: (page.evaluate(READ_PLAYER) or {}).get("reportsSent", 0) >= 1, 40, 0.2)
    # A loaded machine may have stalled already: count from here.
    before = page.evaluate(READ_PLAYER)
    process.send_signal(signal.SIGSTOP)
    try:
        page.wait_for_timeout(3000)
    finally:
        process.send_signal(signal.SIGCONT)

    def reported_stall() -> dict[str, Any] | None:
        state = page.evaluate(READ_PLAYER) or {}
        last = state.get("lastReport") or {}
        fresh = state.get("reportsSent", 0) > before["reportsSent"]
        return state if fresh and last.get("stalls", 0) >= 1 else None

    state = wait_until(reported_stall, 20, 0.2)
    assert state["stalls"] >= before["stalls"] + 1, (before, state)

    def summed() -> bool:
        entry = stream_entry(api_streams(relay), "freeze") or {}
        return bool((entry.get("viewer_reports") or {}).get("stalls", 0) >= 1)

    wait_until(summed, 15, 0.5)
    decoded = page.evaluate(READ_PLAYER)["framesDecoded"]
    wait_until(lambda: page.evaluate(READ_PLAYER)["framesDecoded"] > decoded + 10, 15, 0.2)
