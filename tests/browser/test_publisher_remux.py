"""A remuxed source in a real browser: ``streamrelay-publish --source file:clip.mp4``
(H.264 High profile without B-frames, AVCC in MP4) through the real relay to the player in
headless Chromium, which decodes it with WebCodecs."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.test_player import player, wait_decoding, wait_live
from tests.integration.test_publisher_source import GOP, encode_to
from tests.support.browser_page import sample_canvas
from tests.support.relay_process import StartRelay

pytestmark = [pytest.mark.browser, pytest.mark.timeout(90)]


def test_remuxed_high_profile_mp4_plays_in_chromium(
    start_relay: StartRelay,
    start_publisher: Callable[..., Any],
    open_page: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """An MP4 file (High profile, CABAC, no B-frames; parameter sets only in avcC) is
    remuxed, not re-encoded, and the player decodes it without a decoder error: codec
    avc1.64..., the file's own size, a picture that is not blank."""
    clip = tmp_path / "clip.mp4"
    encode_to([str(clip)], "mp4", 4 * GOP, str(tmp_path / "clip.jsonl"), paced=False,
              profile="high")  # fmt: skip
    relay = start_relay()
    start_publisher(f"{relay.ws_url}/publish/clip", "--source", f"file:{clip}")
    wait_live(relay, "clip")
    page, log = open_page()
    page.goto(f"{relay.http_url}/view/clip", wait_until="load")
    wait_decoding(page, more_than=40, timeout=20.0)
    stats = player(page)
    assert stats["decoderErrors"] == 0 and stats["state"] == "live", stats
    assert stats["codec"].startswith("avc1.64"), stats
    assert (stats["width"], stats["height"]) == (320, 240), stats
    sample = sample_canvas(page, 64, 48)
    assert statistics.pstdev(sample) > 10, "canvas is flat (blank)"
    assert not log.page_errors, log.page_errors
