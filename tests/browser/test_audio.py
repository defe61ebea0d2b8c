"""Audio in a real browser: the real publisher with ``--audio tone``, the real relay, and
the player in headless Chromium decoding Opus with WebCodecs ``AudioDecoder`` and playing
it through Web Audio in sync with the video.

Headless Chromium lets every AudioContext run, whatever ``--autoplay-policy`` says, so
the page gets the policy of a desktop browser for a page the user has not touched from
an init script (as the suite's probe script, not subject to the page's CSP): a real
AudioContext that starts suspended and may resume only after a user activation
(``navigator.userActivation``).  The player must then start muted, keep decoding, and
show its unmute control.  The test unmutes with a real click (a user gesture), and
checks the decoder's output (how many AudioData, and that they are not silence), the A/V
offset the player measures, and the offset between when each beep is heard and when its
flash frame is painted (read from the canvas)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.browser.conftest import PROBE_SCRIPT, Chromium
from tests.support.browser_page import read_fields_script
from tests.support.relay_process import StartRelay

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

AUDIO_FIELDS = (
    "state contextState packets decoded nonSilent scheduled late serverDropped "
    "decoderErrors playoutMs avOffsetMs avOffsetSamplesMs beeps"
).split()
READ_AUDIO = read_fields_script("streamrelayAudio")

# Watches the painted canvas: the Date.now() of every frame whose top-left flash square
# turned white (the test pattern's beat frames), checked at every animation frame.
WATCH_FLASH = """
() => {
  const src = document.getElementById('video');
  const probe = document.createElement('canvas');
  probe.width = 4; probe.height = 4;
  const g = probe.getContext('2d', { willReadFrequently: true });
  const flashes = [];
  let white = false;
  const look = () => {
    // The square is a sixth of the picture high: sample well inside it.
    const size = Math.max(2, Math.floor(src.height / 12));
    g.drawImage(src, 2, 2, size, size, 0, 0, 4, 4);
    const d = g.getImageData(0, 0, 4, 4).data;
    let sum = 0;
    for (let i = 0; i < d.length; i += 4) sum += d[i];
    const now = sum / 16 > 160;
    if (now && !white) flashes.push(Date.now());
    white = now;
    requestAnimationFrame(look);
  };
  requestAnimationFrame(look);
  window.__flashes = flashes;
}
"""


# A desktop browser's autoplay policy for Web Audio, on the real AudioContext: it does
# not run (suspended again whenever it starts) until resume() is called once the page has
# had a user activation.
AUTOPLAY_POLICY = """
(() => {
  const Native = window.AudioContext;
  window.AudioContext = class extends Native {
    constructor(...args) {
      super(...args);
      this.__allowed = false;
      const hold = () => {
        if (!this.__allowed && this.state === 'running') Native.prototype.suspend.call(this);
      };
      this.addEventListener('statechange', hold);
      hold();
    }
    resume() {
      if (!navigator.userActivation.hasBeenActive) {
        return Promise.reject(new DOMException('no user gesture yet', 'NotAllowedError'));
      }
      this.__allowed = true;
      return super.resume();
    }
  };
})();
"""


@pytest.fixture
def strict_page(browser: Any, chromium: Chromium) -> Iterator[tuple[Any, list[str]]]:
    """A page where sound needs a user gesture, with the suite's probe script, and the
    console errors and page errors it reports."""
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    try:
        context.add_init_script(PROBE_SCRIPT)
        context.add_init_script(AUTOPLAY_POLICY)
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page, errors
    finally:
        chromium.close_bounded(context, "closing the page's context")


def audio_state(page: Any) -> dict[str, Any]:
    """The player's audio counters now ({} before player.js ran)."""
    return page.evaluate(READ_AUDIO, AUDIO_FIELDS) or {}


def wait_page(page: Any, check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` with the page's own timer until it is truthy, or fail with ``what``."""
    waited = 0.0
    while waited < timeout:
        result = check()
        if result:
            return result
        page.wait_for_timeout(100)
        waited += 0.1
    raise AssertionError(f"timed out after {timeout} s waiting for {what}: {audio_state(page)}")


def test_player_decodes_and_plays_audio_in_sync(
    start_relay: StartRelay,
    start_publisher: Callable[..., Any],
    strict_page: tuple[Any, list[str]],
    figures: dict[str, Any],
) -> None:
    """The player asks for audio and decodes the Opus packets into non-silent AudioData;
    where sound needs a gesture it starts muted with its unmute control showing (video
    playing, audio decoded, nothing scheduled); after a click it plays, keeps the video
    playing, and measures an A/V offset near 0; each beep is heard within a frame or two
    of when its flash frame is painted (the figures are printed)."""
    relay = start_relay()
    publisher = start_publisher(
        f"{relay.ws_url}/publish/cam",
        "--audio",
        "tone",
        "--size",
        "640x360",
        "--fps",
        "30",
        "--keyframe-interval",
        "1",
        "--preset",
        "ultrafast",
        "--bitrate",
        "600k",
    )
    page, errors = strict_page
    page.goto(f"{relay.http_url}/view/cam", wait_until="load")
    page.evaluate(WATCH_FLASH)
    wait_page(page, lambda: audio_state(page).get("decoded", 0) > 50, 30, "decoded audio")
    button = page.locator("#unmute")
    button.wait_for(state="visible", timeout=10_000)
    wait_page(page, lambda: audio_state(page).get("state") == "muted", 10, "audio muted")
    muted = audio_state(page)
    page.wait_for_timeout(1000)
    still = audio_state(page)
    assert (still["state"], still["contextState"]) == ("muted", "suspended"), still
    assert still["decoded"] > muted["decoded"], "decoding stopped while muted"
    assert still["scheduled"] == muted["scheduled"], "audio scheduled while muted"
    assert button.text_content() == "Unmute (sound is off)"
    assert page.evaluate("() => window.streamrelayPlayer.framesDecoded") > 0
    button.click()
    wait_page(page, lambda: audio_state(page).get("state") == "playing", 10, "audio playing")
    assert button.text_content() == "Mute"

    def settled() -> bool:
        state = audio_state(page)
        flashes = page.evaluate("() => window.__flashes.length")
        return len(state["avOffsetSamplesMs"]) >= 60 and len(state["beeps"]) >= 4 and flashes >= 4

    wait_page(page, settled, 60, "A/V offset samples, beeps and flashes")
    state = audio_state(page)
    flashes = page.evaluate("() => window.__flashes.slice()")
    video = page.evaluate("() => window.streamrelayPlayer.framesDecoded")
    assert publisher.poll() is None

    assert state["contextState"] == "running"
    assert state["decoderErrors"] == 0, state
    assert state["decoded"] >= 100 and state["decoded"] >= state["packets"] - 5, state
    assert state["nonSilent"] >= 0.95 * state["decoded"], state
    assert state["scheduled"] >= 50, state
    assert video >= 60
    assert abs(state["avOffsetMs"]) < 40, state

    # Each flash paint against the nearest time a beep is heard.
    offsets = []
    for flash in flashes:
        nearest = min(state["beeps"], key=lambda beep: abs(beep - flash))
        if abs(nearest - flash) < 500:
            offsets.append(nearest - flash)
    assert len(offsets) >= 3, (flashes, state["beeps"])
    beep_vs_flash = statistics.median(offsets)
    figures["audio_av_offset_ms (player)"] = state["avOffsetMs"]
    figures["audio_playout_ms"] = state["playoutMs"]
    figures["audio_beep_minus_flash_paint_ms (median)"] = round(beep_vs_flash, 1)
    print(
        f"\nA/V offset measured by the player: {state['avOffsetMs']} ms (playout "
        f"{state['playoutMs']} ms); beep heard minus flash painted: "
        f"{[round(o, 1) for o in offsets]} ms, median {beep_vs_flash:.1f} ms"
    )
    assert abs(beep_vs_flash) < 60, offsets
    assert errors == [], errors
    assert page.evaluate("() => window.__streamrelayTest.cspViolations") == []


# Feeds the player's AudioPlayer (a fresh one, on the page's real WebCodecs decoder) the
# same Opus packet under the given capture times, in order; returns its counters.
FEED_REPEATS = """
async ([packet, captures]) => {
  const { AudioPlayer } = await import('/static/audio.js');
  const player = new AudioPlayer(document, window);
  player.meta({ type: 'meta', audio: { codec: 'opus', sample_rate: 48000, channels: 1 } });
  for (const capture of captures) {
    const buf = new ArrayBuffer(9 + packet.length);
    const view = new DataView(buf);
    view.setUint8(0, 0x04);
    view.setBigUint64(1, BigInt(capture));
    new Uint8Array(buf, 9).set(packet);
    player.media(buf);
  }
  await new Promise((resolve) => setTimeout(resolve, 500));
  return { packets: player.packets, repeated: player.repeated, decoded: player.decoded };
}
"""


def test_the_player_never_plays_a_capture_time_twice(
    start_relay: StartRelay, open_page: Callable[..., Any]
) -> None:
    """The relay sends audio capture times strictly increasing; should one repeat or go
    back anyway, the player does not decode or schedule it over the packet already taken
    (belt and braces: Web Audio would play both)."""
    from tests.support.renditions import encode_tone

    relay = start_relay()
    page, log = open_page(f"{relay.http_url}/view/cam")
    packet = list(encode_tone(3)[1])
    base = 1_700_000_000_000_000
    captures = [base, base + 20_000, base + 20_000, base + 10_000, base + 40_000]
    counts = page.evaluate(FEED_REPEATS, [packet, captures])
    assert counts["packets"] == 5
    assert counts["repeated"] == 2, counts
    assert counts["decoded"] == 3, counts
    assert not log.errors(), log.errors()
