"""Renditions through the real ``twistd streamrelay`` (docs/protocol.md "Renditions"):
three GOP-aligned H.264 renditions published as three v1 streams, an adaptive viewer
(``?abr=1``) behind a throttled link steps down, keeps a continuous picture, and steps
back up once the limit is lifted.  Every message the viewer gets is decoded with
libavcodec, the decoder reconfigured at each CONFIG as a player does.  With audio
(``?abr=1&audio=1``, the same Opus packets on every rendition) the audio's capture
times strictly increase across the switches, every gap announced by a ``dropped``."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import pytest

from tests.support.figures import record_figure
from tests.support.media import HEADER
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.renditions import (
    AUDIO_PACKET_US,
    THREE_RENDITIONS,
    RenditionPublisher,
    encode_renditions,
    encode_tone,
)
from tests.support.throttle import Throttle
from tests.support.tokens import write_secret
from tests.support.waiting import run
from tests.support.ws_client import SUBPROTOCOL, ws_connect

pytestmark = pytest.mark.integration

FPS = 25
GOP = 25
SPECS = THREE_RENDITIONS
RELAY_ARGUMENTS = (
    "--viewer-stall-timeout", "120", "--ping-interval", "120", "--ping-timeout", "120",
    "--publisher-idle-timeout", "120",
)  # fmt: skip


@dataclass
class Received:
    """What an adaptive viewer got: every message with its arrival time."""

    messages: list[tuple[float, bytes | dict[str, Any]]] = field(default_factory=list)

    def texts(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [
            (at, message)
            for at, message in self.messages
            if isinstance(message, dict) and message.get("type") == kind
        ]

    def media(self) -> list[tuple[float, bytes]]:
        return [(at, m) for at, m in self.messages if isinstance(m, bytes)]


async def read_all(connection: Any, received: Received) -> None:
    async for message in connection:
        now = time.monotonic()
        received.messages.append(
            (now, message if isinstance(message, bytes) else json.loads(message))
        )


def decode_check(received: Received, sizes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Decode what the viewer got as a player does (a new decoder at each CONFIG after a
    ``rendition``); every picture must decode, at the size of the rendition announced,
    and no P-frame may follow a KEY of another rendition.  Returns the capture times
    decoded, per rendition stream, in order."""
    decoder: Any = None
    current: str | None = None
    announced: str | None = None
    awaiting_key = True
    config = b""
    decoded: list[tuple[int, str]] = []
    for _, message in received.messages:
        if isinstance(message, dict):
            if message.get("type") == "rendition":
                announced = message["stream"]
            continue
        flags, capture = HEADER.unpack_from(message)
        payload = message[HEADER.size :]
        if flags & 0x04:  # AUDIO: checked by audio_check
            continue
        if flags & 0x02:  # CONFIG
            if announced != current or decoder is None:
                decoder = av.CodecContext.create("h264", "r")
                current = announced
                awaiting_key = True
            config = payload
            continue
        if flags & 0x01:
            awaiting_key = False
            # The parameter sets go with the KEY, as a player's decoder configuration.
            payload = config + payload
        assert not awaiting_key, "a P-frame before the KEY of the rendition switched to"
        assert decoder is not None and current is not None
        frames = decoder.decode(av.Packet(payload))
        for frame in frames:
            assert (frame.width, frame.height) == sizes[current], (current, frame.width)
        decoded.extend((capture, current) for _ in frames)
    return {"decoded": decoded}


def audio_check(received: Received) -> dict[str, int]:
    """The contract of docs/protocol.md "Audio" for one viewer: capture times strictly
    increase, and a gap of more than a packet comes after a ``dropped`` notice with
    ``audio`` counting at least the packets missing.  Returns the counts."""
    last: int | None = None
    announced = 0
    counts = {"packets": 0, "gaps": 0, "announced": 0}
    for _, message in received.messages:
        if isinstance(message, dict):
            if message.get("type") == "dropped" and "audio" in message:
                announced += int(message["audio"])
                counts["announced"] += int(message["audio"])
            continue
        flags, capture = HEADER.unpack_from(message)
        if not flags & 0x04:
            continue
        counts["packets"] += 1
        if last is not None:
            assert capture > last, f"audio repeated or went back: {last} -> {capture}"
            missing = (capture - last) // AUDIO_PACKET_US - 1
            if missing:
                counts["gaps"] += 1
            assert missing <= announced, f"{missing} audio packets lost unannounced at {capture}"
        last = capture
        announced = 0
    return counts


def frames_lost(published: list[int], decoded: list[int], around: int, window: int) -> int:
    """Source frames (by capture time) published within ``window`` frames of the one
    captured at ``around`` that the viewer never decoded."""
    if around not in published:
        position = min(range(len(published)), key=lambda i: abs(published[i] - around))
    else:
        position = published.index(around)
    span = published[max(0, position - window) : position + window]
    got = set(decoded)
    # Only what the viewer could have had: between its first and its last frame.
    first, last = min(decoded), max(decoded)
    return sum(1 for capture in span if first <= capture <= last and capture not in got)


@pytest.mark.timeout(240)
def test_a_throttled_adaptive_viewer_steps_down_keeps_its_picture_and_steps_back_up(
    start_relay: StartRelay,
) -> None:
    """Three renditions (~1.3 Mb/s, ~0.45 Mb/s, ~0.13 Mb/s measured); an ``abr=1``
    viewer through a proxy: unthrottled it stays on the top; throttled to between the
    top and the middle bitrates it steps down (announced, before the new CONFIG/KEY),
    then has no ``dropped`` episode and decodes every frame; with the limit lifted it
    steps back up.  Figures: time to step down, time to step up, frames lost around
    each switch."""
    relay: RelayProcess = start_relay(*RELAY_ARGUMENTS)
    throttled_viewer(relay, relay, "renditions_throttled_viewer")


@pytest.mark.timeout(240)
def test_an_adaptive_audio_viewer_hears_every_packet_once_across_switches(
    start_relay: StartRelay,
) -> None:
    """The same with audio (``?abr=1&audio=1``; every rendition carries the same Opus
    packets, as the reference publisher sends them, each lower rendition's 60 ms later
    than the one above, as separate connections may deliver them): through the step
    down and the step up, the audio's capture times strictly increase and none is
    missing unannounced; and audio keeps coming after each switch."""
    relay: RelayProcess = start_relay(*RELAY_ARGUMENTS)
    throttled_viewer(relay, relay, "renditions_throttled_audio_viewer", audio=True)


@pytest.mark.timeout(240)
def test_an_adaptive_viewer_of_an_edge_switches_between_renditions_it_pulls(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    """The same through an edge relay (``--upstream``): the publisher on the origin, the
    viewer on the edge, which pulls each rendition as its own stream when the viewer
    switches to it; the switch is as clean as on the origin."""
    secret = str(write_secret(tmp_path, "relay.key", b"renditions-test-relay-secret"))
    origin = start_relay("--relay-secret-file", secret, *RELAY_ARGUMENTS)
    edge = start_relay("--relay-secret-file", secret, "--upstream", origin.ws_url, *RELAY_ARGUMENTS)
    throttled_viewer(origin, edge, "renditions_throttled_viewer_on_an_edge")


def throttled_viewer(
    origin: RelayProcess, relay: RelayProcess, figure: str, audio: bool = False
) -> None:
    """Publish three renditions to ``origin``, watch adaptively from ``relay`` through a
    throttle, and check the step down, the picture, the step up (see above); with
    ``audio``, the audio too."""
    renditions = encode_renditions("cam", SPECS, 4 * GOP, FPS, GOP)
    tone = encode_tone() if audio else None
    skew = 0.06 if audio else 0.0
    top, middle = renditions[0].bitrate, renditions[1].bitrate
    # Between the middle rendition (with the policy's margin) and the top one.
    limit_bps = int(min(top * 0.7, max(middle * 1.8, (top + middle) / 2)))
    assert middle * 1.25 < limit_bps < top, [r.bitrate for r in renditions]
    sizes = {r.stream: (r.spec.width, r.spec.height) for r in renditions}
    figures: dict[str, Any] = {"bitrates": [r.bitrate for r in renditions],
                               "limit_bps": limit_bps}  # fmt: skip

    async def scenario() -> None:
        publisher = await RenditionPublisher(
            origin.ws_url, renditions, FPS, GOP, tone, skew
        ).start()
        captures = publisher.captures
        throttle = await Throttle(relay.port, None).start()
        received = Received()
        connection = await ws_connect(
            f"ws://127.0.0.1:{throttle.port}/watch/cam?abr=1{'&audio=1' if audio else ''}",
            subprotocols=[SUBPROTOCOL],
            max_size=1 << 24,
            max_queue=None,
            open_timeout=10,
        )
        reader = asyncio.create_task(read_all(connection, received))
        try:
            await _until(lambda: len(received.media()) > 3 * FPS, 20, "media unthrottled")
            starts = received.texts("rendition")
            assert starts and starts[0][1]["reason"] == "start"
            assert starts[0][1]["stream"] == "cam"

            throttled_at = time.monotonic()
            throttle.set_rate(limit_bps // 8)
            await _until(lambda: _switches(received, "down"), 30, "a step down")
            down_at, down = _switches(received, "down")[0]
            figures["step_down_seconds"] = round(down_at - throttled_at, 2)
            assert down["stream"] != "cam"
            # Let the backlog of the top rendition drain, then watch for drops.
            await asyncio.sleep(3)
            settled = len(received.messages)
            await asyncio.sleep(8)
            after = received.messages[settled:]
            assert not [m for _, m in after if isinstance(m, dict) and m["type"] == "dropped"]
            figures["on_while_throttled"] = _on(received)
            assert _on(received) != "cam"

            lifted_at = time.monotonic()
            throttle.set_rate(None)
            await _until(lambda: _switches(received, "up", after=lifted_at), 60, "a step up")
            up_at, _up = _switches(received, "up", after=lifted_at)[0]
            figures["step_up_seconds"] = round(up_at - lifted_at, 2)
            await _until(lambda: _on(received) == "cam", 60, "back on the top rendition")
            await asyncio.sleep(3)
        finally:
            await connection.close()
            reader.cancel()
            await publisher.close()
            await throttle.close()

        assert not received.texts("dropped"), received.texts("dropped")
        checked = await asyncio.to_thread(decode_check, received, sizes)
        decoded_captures = [capture for capture, _ in checked["decoded"]]
        figures["frames_decoded"] = len(decoded_captures)
        figures["switches"] = [
            (message["reason"], message["stream"]) for _, message in received.texts("rendition")
        ]
        lost = []
        for at, _message in received.texts("rendition")[1:]:
            first = _first_capture_after(received, at)
            if first is not None:
                lost.append(frames_lost(captures, decoded_captures, first, 2 * FPS))
        figures["frames_lost_around_switches"] = lost
        first, last = min(decoded_captures), max(decoded_captures)
        got = set(decoded_captures)
        overall = sum(1 for c in captures if first <= c <= last and c not in got)
        figures["frames_lost_overall"] = overall
        assert overall == 0, overall
        assert all(count == 0 for count in lost), lost
        if audio:
            figures["audio"] = audio_check(received)
            # Audio on every rendition the viewer was on, after each switch.
            for at, _message in received.texts("rendition")[1:]:
                assert _first_capture_after(received, at, audio=True) is not None, at

    run(scenario(), timeout=200)
    print(record_figure(figure, **figures))


def _switches(
    received: Received, reason: str, after: float = 0.0
) -> list[tuple[float, dict[str, Any]]]:
    return [
        (at, message)
        for at, message in received.texts("rendition")
        if message["reason"] == reason and at >= after
    ]


def _on(received: Received) -> str | None:
    found = received.texts("rendition")
    return found[-1][1]["stream"] if found else None


def _first_capture_after(received: Received, at: float, audio: bool = False) -> int | None:
    """The capture time of the first video (or ``audio``) message after ``at``."""
    for arrived, message in received.messages:
        if arrived >= at and isinstance(message, bytes):
            flags, capture = HEADER.unpack_from(message)
            if bool(flags & 0x04) == audio:
                return int(capture)
    return None


async def _until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        await asyncio.sleep(0.05)
