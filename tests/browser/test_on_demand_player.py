"""Publishing on demand in a real browser: the real relay, the real
``python -m streamrelay.publisher --on-demand`` and the index page and player in headless
Chromium. The index shows the idle stream as "available"; the player opening it shows
"starting" (never "offline") until the woken publisher's first frame, then plays."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.relay_api import api_streams, stream_entry
from tests.support.relay_process import StartRelay
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(90)]

# Every value <body data-state> takes, in order (a MutationObserver sees each change
# after the task that made it, so none is missed).
STATE_RECORDER = """
(() => {
  const states = [];
  Object.defineProperty(window, '__states', { value: states });
  new MutationObserver((records) => {
    for (const r of records) {
      const s = r.target.dataset ? r.target.dataset.state : undefined;
      if (s && states[states.length - 1] !== s) states.push(s);
    }
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-state'] });
})();
"""


def _state(relay: Any, name: str) -> str | None:
    entry = stream_entry(api_streams(relay), name)
    return None if entry is None else str(entry["state"])


def test_idle_stream_is_available_in_the_index_and_starts_for_the_player(
    start_relay: StartRelay,
    start_publisher: Callable[..., Any],
    open_page: Callable[..., Any],
    figures: dict,
) -> None:
    """Unwatched, the stream is "available" on the index page; the player shows
    "starting", then "live" with decoded frames and no decoder error, never "offline";
    once the page is closed the stream is available again after the grace."""
    relay = start_relay()
    start_publisher(
        f"{relay.ws_url}/publish/cam", "--on-demand", "--on-demand-grace", "1",
        "--size", "640x360",
    )
    wait_until(lambda: _state(relay, "cam") == "available", 30, 0.1)

    index, log = open_page(f"{relay.http_url}/")
    badge = index.locator('a[href="/view/cam"] .pill')
    badge.wait_for(timeout=10_000)
    wait_until(lambda: badge.text_content() == "available", 10, 0.1)
    assert "pill-available" in (badge.get_attribute("class") or "")
    assert index.locator("#summary").text_content().startswith("0 live streams · 1 available")
    index.context.close()

    page, log = open_page()
    page.context.add_init_script(STATE_RECORDER)
    page.goto(f"{relay.http_url}/view/cam", wait_until="load")
    wait_until(
        lambda: page.evaluate("() => (window.streamrelayPlayer || {}).framesDecoded > 10"),
        15,
    )
    states = page.evaluate("() => window.__states")
    timing = page.evaluate("() => ({ ...window.__streamrelayTest })")
    assert "starting" in states and "offline" not in states, states
    assert states.index("starting") < states.index("live"), states
    assert page.evaluate("() => window.streamrelayPlayer.decoderErrors") == 0
    assert log.errors() == [], log.console
    figures["on_demand_first_frame_ms"] = round(timing["firstDecoded"] - timing["wsOpen"], 1)
    assert _state(relay, "cam") == "live"
    page.context.close()
    left = time.monotonic()
    wait_until(lambda: _state(relay, "cam") == "available", 20, 0.1)
    assert time.monotonic() - left >= 0.9  # the grace, not sooner
