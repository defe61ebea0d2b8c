"""``streamrelay-publish --renditions`` end to end: the real publisher process against the
real ``twistd streamrelay`` relay, watched by independent ``websockets`` viewers, one per
rendition stream (``cam``, ``cam~360p``, ``cam~180p``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from streamrelay.publisher.h264 import NAL_SPS, nal_type, parse_sps, split_annexb
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, parse_media
from tests.support.publisher_process import (
    publisher_environment,
    start_publisher,
    stop_publisher,
)
from tests.support.relay_process import RelayProcess
from tests.support.waiting import run, wait_until
from tests.support.ws_client import SUBPROTOCOL, ws_connect

pytestmark = [pytest.mark.integration, pytest.mark.publisher_process]

RENDITIONS = "1280x720@2500k,640x360@800k,320x180@250k"
# (stream, label, width, height, bitrate), highest first: what the set must announce.
EXPECTED = [
    ("cam", "720p", 1280, 720, 2_500_000),
    ("cam~360p", "360p", 640, 360, 800_000),
    ("cam~180p", "180p", 320, 180, 250_000),
]


@dataclass
class Watched:
    """Everything one viewer of one rendition stream received, with arrival times."""

    stream: str
    metas: list[dict[str, Any]] = field(default_factory=list)
    configs: list[bytes] = field(default_factory=list)
    # (arrival monotonic time, capture time, payload) of every KEY
    keys: list[tuple[float, int, bytes]] = field(default_factory=list)
    frames: int = 0
    statuses: list[str] = field(default_factory=list)

    def ready(self) -> bool:
        """meta, CONFIG and a KEY have arrived."""
        return bool(self.metas and self.configs and self.keys)


async def record(connection: ClientConnection, watched: Watched) -> None:
    """Read one viewer's messages into ``watched`` until the connection closes."""
    with contextlib.suppress(ConnectionClosed):
        async for message in connection:
            if isinstance(message, str):
                value = json.loads(message)
                if value.get("type") == "meta":
                    watched.metas.append(value)
                elif value.get("type") == "status":
                    watched.statuses.append(value["state"])
                continue
            media = parse_media(message)
            if media.flags & FLAG_CONFIG:
                watched.configs.append(media.payload)
            else:
                watched.frames += 1
                if media.flags & FLAG_KEY:
                    watched.keys.append((time.monotonic(), media.capture_time_us, media.payload))


def start_renditions_publisher(relay: RelayProcess, log: Path) -> subprocess.Popen[bytes]:
    """The real command line, as a user runs it (stderr to ``log``)."""
    return start_publisher(
        f"{relay.ws_url}/publish/cam",
        "--renditions",
        RENDITIONS,
        "--fps",
        "15",
        "--preset",
        "ultrafast",
        # A GOP longer than the test: every KEY after the first ones is a forced one.
        "--keyframe-interval",
        "120s",
        log=log,
        stdout_to_log=False,
        append=False,
        env=publisher_environment(),
    )


def sps_size(config: bytes) -> tuple[int, int]:
    """Picture size from the SPS in a CONFIG payload."""
    sps = next(unit for unit in split_annexb(config) if nal_type(unit) == NAL_SPS)
    info = parse_sps(sps)
    return info.width, info.height


def decoded_size(config: bytes, key: bytes) -> tuple[int, int]:
    """Decode a KEY (after its CONFIG) with FFmpeg's H.264 decoder: the picture size."""
    decoder: Any = av.CodecContext.create("h264", "r")
    pictures = decoder.decode(av.Packet(config + key))
    pictures += decoder.decode(None)
    assert pictures, "the KEY did not decode"
    return pictures[0].width, pictures[0].height


@pytest.mark.timeout(120)
def test_three_renditions_are_live_aligned_and_announced(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """``streamrelay-publish --renditions 1280x720@2500k,640x360@800k,320x180@250k``
    publishes three live streams, cam, cam~360p and cam~180p, each at its own size (SPS
    and a decoded KEY), each announcing the whole set in its meta with its own label and
    bitrate; their KEYs carry identical capture times, and a keyframe request from a viewer
    of one rendition yields a KEY with one and the same capture time in all three."""
    log = tmp_path / "publisher.log"
    publisher = start_renditions_publisher(relay, log)
    watched = [Watched(stream) for stream, *_ in EXPECTED]

    async def scenario() -> float:
        connections = [
            await ws_connect(f"{relay.ws_url}/watch/{w.stream}", subprotocols=[SUBPROTOCOL])
            for w in watched
        ]
        readers = [
            asyncio.create_task(record(c, w)) for c, w in zip(connections, watched, strict=True)
        ]
        try:
            deadline = time.monotonic() + 60
            while not all(w.ready() for w in watched):
                assert time.monotonic() < deadline, "not every rendition went live"
                assert publisher.poll() is None, log.read_text()
                await asyncio.sleep(0.1)
            # Past the first KEYs (one per connection opening), ask on the lowest rendition.
            await asyncio.sleep(1.5)
            asked = time.monotonic()
            await connections[2].send(json.dumps({"type": "keyframe-request"}))
            while not all(any(at > asked for at, *_ in w.keys) for w in watched):
                assert time.monotonic() < asked + 30, "no KEY after the keyframe request"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            return asked
        finally:
            for connection in connections:
                await connection.close()
            for reader in readers:
                await reader

    try:
        asked = run(scenario(), 100)
    finally:
        status = stop_publisher(publisher, 20, signal.SIGINT)
    output = log.read_text()
    assert status == 0, output
    assert "Traceback" not in output, output

    announced = [
        {"name": label, "stream": stream, "width": w, "height": h, "bitrate": bitrate}
        for stream, label, w, h, bitrate in EXPECTED
    ]
    codecs = {}
    for viewer, (_, label, width, height, bitrate) in zip(watched, EXPECTED, strict=True):
        assert "live" in viewer.statuses
        meta = viewer.metas[-1]
        assert (meta["rendition"], meta["bitrate"]) == (label, bitrate)
        assert (meta["width"], meta["height"]) == (width, height)
        assert [
            {k: v for k, v in entry.items() if k != "codec"} for entry in meta["renditions"]
        ] == announced
        codecs[label] = meta["codec"]
        assert sps_size(viewer.configs[0]) == (width, height)
        assert decoded_size(viewer.configs[0], viewer.keys[0][2]) == (width, height)
        assert viewer.frames > 10
    for viewer in watched:
        assert {e["name"]: e["codec"] for e in viewer.metas[-1]["renditions"]} == codecs

    # Every KEY from the moment all three streams had one is in all three, same capture
    # time (they are the same source frames).
    since = max(viewer.keys[0][1] for viewer in watched)
    key_times = [sorted({c for _, c, _ in v.keys if c >= since}) for v in watched]
    assert key_times[0] == key_times[1] == key_times[2], key_times
    requested = [min(c for at, c, _ in v.keys if at > asked) for v in watched]
    assert requested[0] == requested[1] == requested[2], requested
    assert requested[0] in key_times[0]
    wait_until(lambda: publisher.poll() is not None, 5)
