"""The player plays VP9 and AV1 from the real publisher, and says plainly when it cannot.

Real parts end to end: ``twistd streamrelay``, ``python -m streamrelay.publisher --codec
vp9|av1`` and the player page in the session's headless Chromium (tests/browser/conftest.py).
A codec this Chromium cannot decode (``VideoDecoder.isConfigSupported`` says so) must
produce the page's plain "This browser cannot play ..." message instead of a black canvas;
for HEVC that is checked with a stream a test publisher pushes under an ``hvc1`` codec
string the browser refuses.
"""

from __future__ import annotations

import json
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.support.browser_page import MEAN, sample_canvas
from tests.support.relay_process import RelayProcess
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

READ_PLAYER = (
    "() => { const p = window.streamrelayPlayer; if (!p) return null; return {"
    " state: p.state, framesDecoded: p.framesDecoded, framesReceived: p.framesReceived,"
    " decoderErrors: p.decoderErrors, codec: p.codec, error: p.error, width: p.width,"
    " height: p.height}; }"
)
MESSAGE = (
    "() => ({ hidden: document.getElementById('message').hidden,"
    " title: document.getElementById('message-title').textContent,"
    " detail: document.getElementById('message-detail').textContent })"
)
SUPPORTED = (
    "async (codec) => (await VideoDecoder.isConfigSupported("
    "{codec, optimizeForLatency: true})).supported"
)

CODEC_PREFIX = {"h264": "avc1.", "vp9": "vp09.", "av1": "av01."}
CODEC_NAME = {"h264": "H.264", "vp9": "VP9", "av1": "AV1"}
DECODED_AT_LEAST = 45

# hvc1 strings, most plausible first; the test uses the first this browser refuses.
HEVC_CANDIDATES = ("hvc1.1.6.L93.B0", "hev1.2.4.L153.B0", "hvc1.7.0.L186.F0")


def player(page: Any) -> dict[str, Any]:
    """The player's counters now ({} before player.js ran)."""
    return page.evaluate(READ_PLAYER) or {}


def wait_page(
    page: Any, check: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> None:
    """Poll the player's counters (waiting in the page) until ``check`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check(player(page)):
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}: {player(page)}")


def wait_live(relay: RelayProcess, name: str, timeout: float = 30.0) -> None:
    """Wait until ``/api/streams`` lists ``name`` live."""
    from tests.support.relay_api import api_streams, stream_entry

    def live() -> bool:
        entry = stream_entry(api_streams(relay), name)
        return bool(entry and entry["live"])

    wait_until(live, timeout, 0.2)


@pytest.mark.parametrize("codec", ["vp9", "av1"])
def test_publisher_codec_plays_or_is_refused_plainly(
    codec: str,
    relay: RelayProcess,
    start_publisher: Callable[..., Any],
    open_page: Callable[..., Any],
    figures: dict[str, Any],
) -> None:
    """``--codec vp9|av1`` at 640x360: where Chromium supports the codec the player
    decodes more than 45 frames with that codec string configured and a canvas that is
    not blank; where it does not, the page says "This browser cannot play VP9/AV1 video
    (codec string)" and decodes nothing."""
    start_publisher(f"{relay.ws_url}/publish/cam", "--codec", codec, "--size", "640x360")
    wait_live(relay, "cam")
    page, log = open_page(f"{relay.http_url}/view/cam")
    meta_codec = page.evaluate(
        "async (url) => await new Promise((resolve, reject) => {"
        " const ws = new WebSocket(url, 'streamrelay.v1');"
        " ws.onmessage = (e) => { if (typeof e.data === 'string') {"
        "   const m = JSON.parse(e.data);"
        "   if (m.type === 'meta') { ws.close(); resolve(m.codec); } } };"
        " ws.onerror = () => reject(new Error('socket error')); })",
        f"{relay.ws_url}/watch/cam",
    )
    assert meta_codec.startswith(CODEC_PREFIX[codec]), meta_codec
    supported = page.evaluate(SUPPORTED, meta_codec)
    figures[f"chromium_supports_{codec}"] = f"{meta_codec}: {supported}"
    if supported:
        wait_page(
            page,
            lambda p: p.get("framesDecoded", 0) > DECODED_AT_LEAST,
            40.0,
            f"more than {DECODED_AT_LEAST} decoded {codec} frames",
        )
        stats = player(page)
        assert stats["codec"] == meta_codec, stats
        assert stats["state"] == "live" and stats["decoderErrors"] == 0, stats
        assert (stats["width"], stats["height"]) == (640, 360), stats
        sample = sample_canvas(page, 64, 36, MEAN)
        assert statistics.pstdev(sample) > 20, "canvas is flat (blank)"
        assert len(set(sample)) >= 16, f"canvas has only {len(set(sample))} grey levels"
    else:
        wait_page(page, lambda p: p.get("state") == "error", 30.0, "the unsupported-codec state")
        message = page.evaluate(MESSAGE)
        assert not message["hidden"], message
        assert message["title"] == (
            f"This browser cannot play {CODEC_NAME[codec]} video ({meta_codec})"
        ), message
        assert player(page)["framesDecoded"] == 0
    assert not log.page_errors, log.page_errors


class RawPublisher:
    """A test publisher over a plain WebSocket: announces a codec string in ``meta`` and
    sends CONFIG, then a KEY and deltas of dummy payload, ten a second, in its own thread."""

    def __init__(self, url: str, codec: str) -> None:
        self._url = url
        self._codec = codec
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sent = 0
        self.error: BaseException | None = None

    def __enter__(self) -> RawPublisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        try:
            protocols: Any = ["streamrelay.v1"]
            with connect(self._url, subprotocols=protocols, proxy=None) as ws:
                meta = {
                    "type": "meta",
                    "codec": self._codec,
                    "width": 640,
                    "height": 360,
                    "fps": 10,
                }
                ws.send(json.dumps(meta))
                ws.send(struct.pack(">BQ", 2, time.time_ns() // 1000) + b"\x00\x00\x00\x01\x40\x01")
                index = 0
                while not self._stop.wait(0.1):
                    flags = 1 if index % 20 == 0 else 0
                    payload = bytes([index % 251]) * 500
                    ws.send(struct.pack(">BQ", flags, time.time_ns() // 1000) + payload)
                    index += 1
                    self.sent = index
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error


@pytest.fixture
def hevc_refused(open_page: Callable[..., Any], relay: RelayProcess) -> Iterator[str]:
    """An ``hvc1``/``hev1`` codec string this Chromium refuses (fails if it takes them all)."""
    page, _ = open_page(f"{relay.http_url}/static/style.css")
    refused = [c for c in HEVC_CANDIDATES if not page.evaluate(SUPPORTED, c)]
    assert refused, f"this Chromium decodes every HEVC candidate: {HEVC_CANDIDATES}"
    yield refused[0]


def test_unsupported_hevc_stream_shows_a_plain_message(
    relay: RelayProcess, open_page: Callable[..., Any], hevc_refused: str
) -> None:
    """A stream announced as HEVC that this browser cannot decode: the player asks
    ``isConfigSupported`` before configuring, decodes nothing, counts no decoder error,
    and the page says "This browser cannot play HEVC (H.265) video (hvc1...)" with a hint."""
    with RawPublisher(f"{relay.ws_url}/publish/hevc", hevc_refused) as publisher:
        wait_live(relay, "hevc")
        page, log = open_page(f"{relay.http_url}/view/hevc")
        wait_page(page, lambda p: p.get("state") == "error", 30.0, "the unsupported-codec state")
        wait_page(page, lambda p: p.get("framesReceived", 0) >= 5, 30.0, "media reaching the page")
        stats = player(page)
        message = page.evaluate(MESSAGE)
        assert publisher.error is None, publisher.error
    assert not message["hidden"], message
    assert message["title"] == f"This browser cannot play HEVC (H.265) video ({hevc_refused})"
    assert "--codec h264" in message["detail"], message
    assert stats["framesDecoded"] == 0 and stats["decoderErrors"] == 0, stats
    assert stats["codec"] is None, stats
    assert page.evaluate("() => document.body.dataset.state") == "error"
    assert not log.page_errors, log.page_errors


def test_unsupported_message_clears_when_a_playable_publisher_takes_over(
    relay: RelayProcess,
    open_page: Callable[..., Any],
    start_publisher: Callable[..., Any],
    hevc_refused: str,
) -> None:
    """A viewer shown "cannot play HEVC" keeps its page; when a VP9 publisher takes the
    stream over, the message goes and the same player decodes VP9 (a new meta codec is a
    new chance, not a sticky error)."""
    with RawPublisher(f"{relay.ws_url}/publish/swap", hevc_refused):
        wait_live(relay, "swap")
        page, log = open_page(f"{relay.http_url}/view/swap")
        wait_page(page, lambda p: p.get("state") == "error", 30.0, "the unsupported-codec state")
        start_publisher(f"{relay.ws_url}/publish/swap", "--codec", "vp9", "--size", "640x360")
        wait_page(
            page,
            lambda p: p.get("framesDecoded", 0) > DECODED_AT_LEAST,
            40.0,
            "VP9 frames decoded after the takeover",
        )
    stats = player(page)
    assert stats["state"] == "live" and stats["error"] is None, stats
    assert stats["codec"].startswith("vp09."), stats
    assert page.evaluate(MESSAGE)["hidden"], page.evaluate(MESSAGE)
    assert not log.page_errors, log.page_errors
