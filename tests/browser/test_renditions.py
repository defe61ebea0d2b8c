"""Renditions in a real browser: the player page in headless Chromium, loaded through a
throttling proxy, watches a stream published as three GOP-aligned H.264 renditions.  When
the link is throttled the relay steps the player down, and the picture it decodes (its
canvas, sized by each decoded frame) changes resolution with no decoder error; when the
limit is lifted it comes back to the top rendition.

Playwright's sync API holds the main thread's event loop, so the publisher and the proxy
(asyncio) run on a loop of their own in a background thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from tests.support.relay_process import StartRelay
from tests.support.renditions import (
    THREE_RENDITIONS,
    RenditionPublisher,
    encode_renditions,
)
from tests.support.throttle import Throttle
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

T = TypeVar("T")
FPS = 25
GOP = 25
SPECS = THREE_RENDITIONS
FIELDS = "state framesDecoded decoderErrors serverDropped rendition renditionSwitches width height"
READ = (
    "(fields) => { const p = window.streamrelayPlayer; if (!p) return {};"
    " const o = {}; for (const f of fields.split(' ')) o[f] = p[f]; "
    " o.overlay = document.getElementById('stat-video').textContent; return o; }"
)


class BackgroundLoop:
    """An asyncio loop in a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coroutine`` there and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, function: Any, *arguments: Any) -> None:
        """Call ``function`` on the loop's thread."""
        self.loop.call_soon_threadsafe(function, *arguments)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def background() -> Iterator[BackgroundLoop]:
    """A background asyncio loop, stopped at teardown."""
    loop = BackgroundLoop()
    yield loop
    loop.stop()


def read(page: Any) -> dict[str, Any]:
    return dict(page.evaluate(READ, FIELDS))


def wait_player(page: Any, check: Any, timeout: float, what: str) -> dict[str, Any]:
    """Poll the player's counters until ``check(counters)``; fail with the last ones."""
    last: dict[str, Any] = {}

    def probe() -> bool:
        nonlocal last
        last = read(page)
        return bool(check(last))

    try:
        wait_until(probe, timeout, 0.1)
    except AssertionError as error:
        raise AssertionError(f"timed out waiting for {what}: {last}") from error
    return last


def test_the_player_steps_down_on_a_throttled_link_and_back_up_without_decode_errors(
    start_relay: StartRelay,
    background: BackgroundLoop,
    open_page: Any,
    figures: dict[str, Any],
) -> None:
    """Through a proxy throttled to between the top and middle bitrates, the player goes
    from 640x360 to a lower rendition (decoded frames of the new size, shown in the stats
    overlay), with no decoder error and no console error; unthrottled, back to 640x360."""
    relay = start_relay("--ping-interval", "120", "--ping-timeout", "120")
    renditions = encode_renditions("cam", SPECS, 4 * GOP, FPS, GOP)
    top, middle = renditions[0].bitrate, renditions[1].bitrate
    limit_bps = int(min(top * 0.7, max(middle * 1.8, (top + middle) / 2)))
    assert middle * 1.25 < limit_bps < top, [r.bitrate for r in renditions]

    async def begin() -> tuple[RenditionPublisher, Throttle]:
        publisher = await RenditionPublisher(relay.ws_url, renditions, FPS, GOP).start()
        throttle = await Throttle(relay.port, None).start()
        return publisher, throttle

    publisher, throttle = background.run(begin())
    try:
        page, log = open_page(f"http://127.0.0.1:{throttle.port}/view/cam")
        started = wait_player(
            page,
            lambda p: p.get("framesDecoded", 0) > 25 and "640×360" in p.get("overlay", ""),
            30,
            "the top rendition decoding, in the stats overlay",
        )
        assert started["rendition"] == "360p" and "360p" in started["overlay"]

        throttled_at = time.monotonic()
        background.call(throttle.set_rate, limit_bps // 8)
        down = wait_player(
            page,
            lambda p: (
                p.get("rendition") not in (None, "360p")
                and p.get("width", 640) < 640
                and p["rendition"] in p.get("overlay", "")
            ),
            40,
            "a lower rendition on the canvas and in the overlay",
        )
        figures["browser_rendition_step_down_s"] = round(time.monotonic() - throttled_at, 2)
        assert down["decoderErrors"] == 0, down
        decoded = down["framesDecoded"]
        # The lower rendition keeps playing.
        wait_player(page, lambda p: p["framesDecoded"] > decoded + 50, 20, "decoding on")

        lifted_at = time.monotonic()
        background.call(throttle.set_rate, None)
        up = wait_player(
            page,
            lambda p: p.get("rendition") == "360p" and p.get("width") == 640,
            90,
            "the top rendition again",
        )
        figures["browser_rendition_step_up_s"] = round(time.monotonic() - lifted_at, 2)
        decoded = up["framesDecoded"]
        final = wait_player(page, lambda p: p["framesDecoded"] > decoded + 25, 20, "decoding")
        assert final["decoderErrors"] == 0, final
        assert final["renditionSwitches"] >= 2, final
        assert final["state"] == "live", final
        assert not log.errors(), log.errors()
    finally:
        background.run(publisher.close())
        background.run(throttle.close())
