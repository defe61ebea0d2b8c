"""A publisher of GOP-aligned H.264 renditions for the rendition tests (docs/protocol.md
"Renditions"): real libx264 encodes (PyAV, the publisher's own encoder) of the test
pattern at several sizes, published as the contract says -- one v1 publisher
connection per rendition, the top one at the base name, each ``meta`` carrying the whole
set.

The renditions are encoded once, before the test, from the same source frames with the
same fixed GOP (so keyframes fall on the same source frames), then sent in a loop at the
frame rate with one capture time per source frame for all of them: the relay's CPU, not
the test's encoder, is what the test loads.  A keyframe request on any connection makes
every rendition jump to its next GOP start, i.e. an IDR on the same source frame in all.
The announced bitrates are those measured on the encoded loop, not the encoder targets.

With ``audio`` the publisher also sends Opus packets (a tone encoded with the
publisher's own libopus encoder, once, looped) every 20 ms, the same packet with the
same capture time on every rendition connection, as ``streamrelay-publish`` does;
``audio_skew`` delays each lower rendition's audio by that many seconds more than the
one above it (separate connections and outboxes: the relay gets them out of step).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from streamrelay.publisher.audio import OpusEncoder, audio_meta
from streamrelay.publisher.audio_sources import FRAME_SAMPLES, SAMPLE_RATE, AudioBlock
from streamrelay.publisher.encoder import EncoderSettings, H264Encoder
from streamrelay.publisher.testpattern import TestPattern
from tests.support.media import HEADER, now_us
from tests.support.ws_client import SUBPROTOCOL, ws_connect


@dataclass(frozen=True)
class RenditionSpec:
    """What to encode: a label, a size and the encoder's target bitrate."""

    label: str
    width: int
    height: int
    bitrate: int


# The ladder the relay's and the browser's rendition tests publish, highest first.
THREE_RENDITIONS = [
    RenditionSpec("360p", 640, 360, 1_200_000),
    RenditionSpec("180p", 320, 180, 400_000),
    RenditionSpec("96p", 160, 96, 120_000),
]


@dataclass
class EncodedRendition:
    """One rendition's loop: per source frame, its messages as (flags, payload)."""

    spec: RenditionSpec
    stream: str
    codec: str
    frames: list[list[tuple[int, bytes]]]
    bitrate: int  # measured over the loop, bits a second

    def entry(self) -> dict[str, Any]:
        """This rendition in a ``meta``'s ``renditions`` list."""
        return {
            "name": self.spec.label,
            "stream": self.stream,
            "width": self.spec.width,
            "height": self.spec.height,
            "bitrate": self.bitrate,
            "codec": self.codec,
        }


def encode_renditions(
    base: str, specs: list[RenditionSpec], frames: int, fps: int, gop: int
) -> list[EncodedRendition]:
    """Encode ``frames`` source frames (a multiple of ``gop``) at each spec; the first
    spec is published at ``base``, the others at ``base~label``."""
    assert frames % gop == 0
    top = specs[0]
    pattern = TestPattern(top.width, top.height)
    pictures = [_noisy(pattern.render(index, index / fps), index) for index in range(frames)]
    encoded = []
    for position, spec in enumerate(specs):
        encoder = H264Encoder(
            EncoderSettings(
                width=spec.width,
                height=spec.height,
                fps=Fraction(fps),
                bitrate=spec.bitrate,
                keyframe_interval_frames=gop,
                preset="ultrafast",
                threads=1,
            )
        )
        loop: list[list[tuple[int, bytes]]] = []
        for index, picture in enumerate(pictures):
            messages = encoder.encode(picture, index, force_keyframe=index % gop == 0)
            loop.append([(m.flags, m.data[HEADER.size :]) for m in messages])
        codec = encoder.codec_string or "avc1.42c01f"
        encoder.close()
        size = sum(len(payload) for frame in loop for _, payload in frame)
        stream = base if position == 0 else f"{base}~{spec.label}"
        encoded.append(EncodedRendition(spec, stream, codec, loop, size * 8 * fps // frames))
    return encoded


AUDIO_PACKET_US = 20_000
_FLAG_AUDIO = 0x04


def encode_tone(packets: int = 50) -> list[bytes]:
    """``packets`` 20 ms Opus packets of a 440 Hz tone (mono, libopus through PyAV)."""
    encoder = OpusEncoder(channels=1)
    encoded: list[bytes] = []
    block = 0
    while len(encoded) < packets:
        samples = b"".join(
            struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * n / SAMPLE_RATE)))
            for n in range(block * FRAME_SAMPLES, (block + 1) * FRAME_SAMPLES)
        )
        encoded += [packet for packet, _ in encoder.encode(AudioBlock(samples, block))]
        block += 1
    encoder.close()
    return encoded[:packets]


def _noisy(picture: Any, index: int) -> Any:
    """The pattern with a band of noise across its luma: the test pattern alone is so
    easy to compress that every rendition would come out at about the same bitrate."""
    plane = picture.planes[0]
    data = bytearray(bytes(plane))
    noise = random.Random(index)
    top, bottom = picture.height // 3, picture.height // 2
    for row in range(top, bottom):
        start = row * plane.line_size
        data[start : start + picture.width] = noise.randbytes(picture.width)
    plane.update(bytes(data))
    return picture


@dataclass
class RenditionPublisher:
    """Publishes ``renditions`` to ``ws_url`` (``ws://host:port``) at ``fps``."""

    ws_url: str
    renditions: list[EncodedRendition]
    fps: int
    gop: int
    # Opus packets to loop (encode_tone), or None for no audio.
    audio: list[bytes] | None = None
    audio_skew: float = 0.0
    keyframe_requests: int = 0
    viewer_counts: dict[str, int] = field(default_factory=dict)
    frames_sent: int = 0
    # The capture time of every source frame sent, in order; of every audio packet.
    captures: list[int] = field(default_factory=list)
    audio_captures: list[int] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _connections: list[Any] = field(default_factory=list)
    _jump: bool = False

    def meta(self, rendition: EncodedRendition) -> dict[str, Any]:
        """The ``meta`` a rendition's connection sends."""
        meta = {
            "type": "meta",
            "codec": rendition.codec,
            "width": rendition.spec.width,
            "height": rendition.spec.height,
            "fps": self.fps,
            "bitrate": rendition.bitrate,
            "rendition": rendition.spec.label,
            "renditions": [r.entry() for r in self.renditions],
        }
        if self.audio is not None:
            meta["audio"] = audio_meta(1)
        return meta

    async def start(self) -> RenditionPublisher:
        """Open one connection per rendition, send its meta, then start the frames."""
        for rendition in self.renditions:
            connection = await ws_connect(
                f"{self.ws_url}/publish/{rendition.stream}",
                subprotocols=[SUBPROTOCOL],
                max_size=1 << 20,
                open_timeout=10,
            )
            await connection.send(json.dumps(self.meta(rendition)))
            self._connections.append(connection)
            self._tasks.append(asyncio.create_task(self._listen(rendition, connection)))
        self._tasks.append(asyncio.create_task(self._send()))
        if self.audio is not None:
            loop = asyncio.get_running_loop()
            clock = (loop.time(), now_us())
            for position, connection in enumerate(self._connections):
                delay = position * self.audio_skew
                sender = self._send_audio(self.audio, connection, clock, delay, position == 0)
                self._tasks.append(asyncio.create_task(sender))
        return self

    async def _listen(self, rendition: EncodedRendition, connection: Any) -> None:
        with contextlib.suppress(Exception):
            async for message in connection:
                if not isinstance(message, str):
                    continue
                parsed = json.loads(message)
                if parsed.get("type") == "keyframe-request":
                    self.keyframe_requests += 1
                    self._jump = True
                elif parsed.get("type") == "viewers":
                    self.viewer_counts[rendition.stream] = int(parsed["count"])

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1 / self.fps
        length = len(self.renditions[0].frames)
        index = 0
        next_at = loop.time()
        while True:
            if self._jump:
                # A forced keyframe on the same source frame in every rendition.
                self._jump = False
                if index % self.gop:
                    index = (index // self.gop + 1) * self.gop % length
            capture = now_us()
            self.captures.append(capture)
            sends = []
            for rendition, connection in zip(self.renditions, self._connections, strict=True):
                for flags, payload in rendition.frames[index]:
                    sends.append(connection.send(HEADER.pack(flags, capture) + payload))
            await asyncio.gather(*sends)
            self.frames_sent += 1
            index = (index + 1) % length
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = loop.time()

    async def _send_audio(
        self,
        packets: list[bytes],
        connection: Any,
        clock: tuple[float, int],
        delay: float,
        record: bool,
    ) -> None:
        # One audio clock for all: a packet every 20 ms from the start, capture times
        # exactly 20 ms apart (a late turn sends the packets due at once, as a capture
        # buffer would); this connection gets each ``delay`` seconds after it is due.
        loop = asyncio.get_running_loop()
        started_at, anchor = clock
        index = 0
        while True:
            due = started_at + delay + index * AUDIO_PACKET_US / 1e6
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            capture = anchor + index * AUDIO_PACKET_US
            if record:
                self.audio_captures.append(capture)
            await connection.send(HEADER.pack(_FLAG_AUDIO, capture) + packets[index % len(packets)])
            index += 1

    async def close(self) -> None:
        """Stop sending and close every connection (bounded)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        for connection in self._connections:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await connection.close()
