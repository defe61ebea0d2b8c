"""Audio end to end: the real ``streamrelay-publish --audio tone`` into the real ``twistd
streamrelay``, watched by ``websockets`` clients with and without ``?audio=1``; the Opus
packets are decoded with PyAV and the beeps are timed against the flash frames."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from streamrelay.publisher.audio_sources import BEEP_LEVEL
from streamrelay.publisher.testpattern import BEAT_FRAMES
from streamrelay.wire import FLAG_AUDIO, MediaMessage, parse_media
from tests.support.frames import OP_BINARY, OP_TEXT
from tests.support.media import capture_of, media
from tests.support.publisher_process import (
    light_encode,
    start_piped_publisher,
    stop_publisher,
)
from tests.support.raw_ws import RawWebSocket
from tests.support.relay_process import StartRelay
from tests.support.tokens import write_secret

pytestmark = [pytest.mark.integration, pytest.mark.publisher_process]

WIDTH, HEIGHT = 320, 240
START_US = 1_800_000_000_000_000
# The slow viewer's link, in bytes a second: a third of the video's.  (Loopback's kernel
# send buffer holds up to 4 MB ahead of what the relay's queue bounds, so the link must
# be fast enough for the drop episodes to reach the reader within the test.)
READ_RATE = 1_000_000
PICTURE_BYTES = 96_000


@contextmanager
def tone_publisher(url: str, audio: str = "tone") -> Iterator[subprocess.Popen[str]]:
    """The real publisher: test pattern with ``--audio tone`` (or ``audio``), a KEY every
    second."""
    process = start_piped_publisher(
        url,
        *light_encode(f"{WIDTH}x{HEIGHT}", 30, "300k"),
        "--keyframe-interval",
        "1",
        "--audio",
        audio,
        "--quiet",
    )
    try:
        yield process
    finally:
        stop_publisher(process)


class Collector:
    """A viewer in a thread of its own, keeping every message it gets."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.texts: list[dict[str, Any]] = []
        self.media: list[MediaMessage] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        try:
            protocols = [Subprotocol("streamrelay.v1")]
            with connect(self.url, subprotocols=protocols, max_size=None) as ws:
                while not self._stop.is_set():
                    try:
                        message = ws.recv(timeout=0.2)
                    except TimeoutError:
                        continue
                    if isinstance(message, str):
                        self.texts.append(json.loads(message))
                    else:
                        self.media.append(parse_media(message))
        except ConnectionClosed:
            pass
        except BaseException as error:  # reported by the test
            self.error = error

    def wait_for(self, condition: Any, timeout: float) -> None:
        """Wait (generously: the machine may be loaded) until ``condition()`` holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"timed out waiting on {self.url}"
            time.sleep(0.1)

    def audio(self) -> list[MediaMessage]:
        return [m for m in list(self.media) if m.is_audio]

    def video(self) -> list[MediaMessage]:
        return [m for m in list(self.media) if not m.is_audio]


def decode_audio(messages: list[MediaMessage], channels: int) -> list[tuple[int, array[float]]]:
    """Each packet decoded with PyAV's Opus decoder: (capture time, float samples)."""
    decoder: Any = av.CodecContext.create("opus", "r")
    decoder.sample_rate = 48_000
    decoder.layout = "stereo" if channels == 2 else "mono"
    decoded = []
    for message in messages:
        for frame in decoder.decode(av.Packet(message.payload)):
            assert frame.sample_rate == 48_000
            plane = array("f", bytes(frame.planes[0])[: frame.samples * 4])
            decoded.append((message.capture_time_us, plane))
    return decoded


def beep_onsets(decoded: list[tuple[int, array[float]]]) -> list[float]:
    """Capture times (µs) of the first loud sample after at least 0.3 s of quiet."""
    onsets: list[float] = []
    threshold = BEEP_LEVEL * 0.5
    last_loud = -1e18
    for capture_us, samples in decoded:
        for index, value in enumerate(samples):
            if abs(value) > threshold:
                at = capture_us + index * 1e6 / 48_000
                if at - last_loud > 300_000:
                    onsets.append(at)
                last_loud = at
    return onsets


def flash_times(video: list[MediaMessage]) -> list[int]:
    """Capture times of the frames whose flash square is white (decoded with PyAV)."""
    decoder: Any = av.CodecContext.create("h264", "r")
    started = False
    times: list[int] = []
    for message in video:
        if message.is_config:
            continue
        started = started or message.is_key
        if not started:
            continue
        for frame in decoder.decode(av.Packet(message.payload)):
            luma = frame.planes[0]
            stride = luma.line_size
            data = bytes(luma)
            corner = [data[row * stride + col] for row in range(4, 20) for col in range(4, 20)]
            if sum(corner) / len(corner) > 128:
                times.append(message.capture_time_us)
    return times


@pytest.mark.timeout(120)
def test_audio_viewers_get_opus_in_sync_plain_viewers_get_none(start_relay: StartRelay) -> None:
    """Through the real launch: an audio viewer gets ``meta.audio``, then CONFIG, KEY,
    and Opus packets (flag 0x04) that PyAV decodes into non-silent 48 kHz audio, never
    before its first KEY's capture time; a plain viewer of the same stream gets no audio
    at all; a joiner mid-stream gets the cached GOP with its audio from the KEY on; and
    every beep starts at its flash frame's capture time (the offset is printed)."""
    relay = start_relay()
    base = f"{relay.ws_url}/watch/cam"
    with (
        Collector(base + "?audio=1") as listener,
        Collector(base) as plain,
        tone_publisher(f"{relay.ws_url}/publish/cam") as publisher,
    ):
        # Four beats: the machine may be loaded, so wait on what arrived, not on time.
        listener.wait_for(lambda: len(listener.audio()) >= 250, 60)
        with Collector(base + "?audio=1") as joiner:
            joiner.wait_for(lambda: len(joiner.audio()) >= 10, 30)
        assert publisher.poll() is None, publisher.stderr.read() if publisher.stderr else ""

    meta = next(text for text in listener.texts if text.get("type") == "meta")
    assert meta["audio"] == {"codec": "opus", "sample_rate": 48_000, "channels": 1}

    for viewer in (listener, joiner):
        first = viewer.media[:2]
        assert [m.is_config for m in first] == [True, False] and first[1].is_key
        key_time = first[1].capture_time_us
        assert min(m.capture_time_us for m in viewer.audio()) >= key_time

    assert plain.media and not any(m.is_audio for m in plain.media)
    assert not any(t.get("audio") is not None for t in plain.texts if t.get("type") == "dropped")

    audio = listener.audio()
    decoded = decode_audio(audio, 1)
    assert len(decoded) == len(audio)
    assert all(len(samples) == 960 for _t, samples in decoded)
    loudest = max(max(abs(v) for v in samples) for _t, samples in decoded)
    assert loudest > BEEP_LEVEL * 0.8
    quiet = sorted(max(abs(v) for v in samples) for _t, samples in decoded)[len(decoded) // 2]
    assert quiet > 0.05, "the tone between beeps is not silence"

    onsets = beep_onsets(decoded)
    flashes = flash_times(listener.video())
    assert len(flashes) >= 3 and len(onsets) >= 3, (flashes, onsets)
    offsets_ms = []
    for flash in flashes:
        nearest = min(onsets, key=lambda onset: abs(onset - flash))
        if abs(nearest - flash) < 500_000:
            offsets_ms.append((nearest - flash) / 1000)
    assert len(offsets_ms) >= 3, (flashes, onsets)
    print(f"\nbeep minus flash capture time, ms (every {BEAT_FRAMES} frames): {offsets_ms}")
    assert all(abs(offset) < 5 for offset in offsets_ms), offsets_ms


@pytest.mark.timeout(120)
def test_an_edge_pulls_the_audio_for_its_audio_viewers(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    """Relay to relay through real processes: ``/relay/`` always carries the audio, so an
    edge serves its ``?audio=1`` viewers the origin's Opus packets byte for byte (they
    decode), and its plain viewers none."""
    secret = str(write_secret(tmp_path, "relay.key", b"audio-chain-secret"))
    origin = start_relay("--relay-secret-file", secret)
    edge = start_relay("--relay-secret-file", secret, "--upstream", origin.ws_url)
    with (
        Collector(f"{origin.ws_url}/watch/cam?audio=1") as at_origin,
        tone_publisher(f"{origin.ws_url}/publish/cam"),
    ):
        at_origin.wait_for(lambda: len(at_origin.audio()) >= 5, 60)
        with (
            Collector(f"{edge.ws_url}/watch/cam?audio=1") as listener,
            Collector(f"{edge.ws_url}/watch/cam") as plain,
        ):
            listener.wait_for(lambda: len(listener.audio()) >= 60, 60)
            plain.wait_for(lambda: len(plain.video()) >= 30, 30)
    edge_audio = listener.audio()
    origin_audio = {m.data for m in at_origin.audio()}
    assert all(m.data in origin_audio for m in edge_audio[:-10])
    assert len(decode_audio(edge_audio, 1)) == len(edge_audio)
    first = listener.media[:2]
    assert first[0].is_config and first[1].is_key
    assert min(m.capture_time_us for m in edge_audio) >= first[1].capture_time_us
    assert not any(m.is_audio for m in plain.media)


@pytest.mark.timeout(120)
def test_a_viewer_too_slow_for_the_video_keeps_its_audio(start_relay: StartRelay) -> None:
    """Through the real relay: a viewer whose link carries 1 MB/s (a third of the video's
    2.9 MB/s, far above the audio's 12 kB/s) loses video to drop episodes (``dropped``
    with ``messages``), yet gets nearly every audio packet, in order, never duplicated;
    a plain viewer on a fast link gets all the video and no audio."""
    relay = start_relay(
        "--viewer-queue-bytes",
        str(256 * 1024),
        "--viewer-stall-timeout",
        "60",
        "--ping-interval",
        "60",
        "--ping-timeout",
        "60",
    )
    stop = threading.Event()
    sent_audio: list[int] = []

    def publish() -> None:
        # 30 fps of 96 kB pictures (a KEY every 15) and 50 audio packets a second.
        started = time.monotonic()
        video_index = audio_index = 0
        with connect(f"{relay.ws_url}/publish/slow") as ws:
            while not stop.is_set():
                now = time.monotonic() - started
                if audio_index * 0.02 <= now:
                    ws.send(media(FLAG_AUDIO, b"a" * 200, START_US + audio_index * 20_000))
                    sent_audio.append(audio_index)
                    audio_index += 1
                elif video_index / 30 <= now:
                    flags = 0x01 if video_index % 15 == 0 else 0x00
                    ws.send(media(flags, b"v" * PICTURE_BYTES, START_US + video_index * 33_333))
                    video_index += 1
                else:
                    time.sleep(0.002)

    slow_messages: list[tuple[int, bytes]] = []

    def read_slowly(sock: RawWebSocket) -> None:
        budget_started = time.monotonic()
        taken = 0
        while not stop.is_set():
            try:
                frame = sock.read_message()
            except (ConnectionError, OSError):
                return
            slow_messages.append((frame.opcode, frame.payload))
            taken += len(frame.payload)
            ahead = taken / READ_RATE - (time.monotonic() - budget_started)
            if ahead > 0:
                time.sleep(ahead)

    slow = RawWebSocket.open(relay.port, "/watch/slow?audio=1", rcvbuf=4096)
    assert slow.status == 101
    threads = [threading.Thread(target=publish), threading.Thread(target=read_slowly, args=(slow,))]
    with Collector(f"{relay.ws_url}/watch/slow") as plain:
        for thread in threads:
            thread.start()
        plain.wait_for(lambda: len(plain.video()) >= 300, 60)
        stop.set()
        slow.close()
        for thread in threads:
            thread.join(10)

    audio = [capture_of(p) for op, p in slow_messages if op == OP_BINARY and p[0] == FLAG_AUDIO]
    video = [p for op, p in slow_messages if op == OP_BINARY and p[0] != FLAG_AUDIO]
    notices = [json.loads(p) for op, p in slow_messages if op == OP_TEXT]
    video_drops = sum(n.get("messages", 0) for n in notices if n.get("type") == "dropped")
    audio_drops = sum(n.get("audio", 0) for n in notices if n.get("type") == "dropped")
    assert video_drops > 0, (notices, len(audio), len(video))
    assert audio == sorted(set(audio)), "audio reordered or duplicated"
    first_audio = (audio[0] - START_US) // 20_000
    expected = [i for i in sent_audio if i >= first_audio and START_US + i * 20_000 <= audio[-1]]
    print(
        f"\nslow viewer: {len(audio)}/{len(expected)} audio packets, {len(video)} pictures, "
        f"{video_drops} pictures dropped, {audio_drops} audio packets dropped"
    )
    assert len(audio) + audio_drops >= len(expected) - 1
    assert len(audio) >= 0.9 * len(expected), (len(audio), len(expected), audio_drops)
    assert len(video) < 0.5 * (len(video) + video_drops)
    assert not any(m.is_audio for m in plain.media)


@pytest.mark.timeout(120)
def test_a_capture_device_is_published_as_opus(
    start_relay: StartRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--audio device:NAME`` through FFmpeg's ALSA input: an ALSA ``null`` device (this
    machine has no sound card; an ALSA configuration of the test's own defines it) is
    captured, encoded and published: the audio viewer gets ``meta.audio`` (stereo), and
    Opus packets of 20 ms each, capture times strictly increasing, that PyAV decodes into
    the device's silence."""
    conf = tmp_path / "asound.conf"
    conf.write_text("pcm.!default { type null }\npcm.null { type null }\n")
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(conf))  # the publisher inherits it
    relay = start_relay()
    with (
        Collector(f"{relay.ws_url}/watch/mic?audio=1") as listener,
        tone_publisher(f"{relay.ws_url}/publish/mic", "device:null") as publisher,
    ):
        listener.wait_for(lambda: len(listener.audio()) >= 100, 60)
        assert publisher.poll() is None, publisher.stderr.read() if publisher.stderr else ""
    meta = next(text for text in listener.texts if text.get("type") == "meta")
    assert meta["audio"] == {"codec": "opus", "sample_rate": 48_000, "channels": 2}
    audio = listener.audio()
    times = [m.capture_time_us for m in audio]
    assert all(later > earlier for earlier, later in zip(times, times[1:], strict=False))
    # (No pacing check: ALSA's null device delivers samples as fast as they are read,
    # where a sound card delivers them in real time.)
    decoded = decode_audio(audio, 2)
    assert len(decoded) == len(audio)
    assert all(len(samples) == 960 for _t, samples in decoded)  # 20 ms at 48 kHz
    # Silence: Opus's start-up ripple (up to ~0.07 from silence, seen on CI) decays within
    # ~10 packets; past the first half second the device's zeros decode to well under 1% of
    # full scale (the tone's quietest is > 0.05).
    settled = decoded[25:]
    assert max(max(abs(v) for v in samples) for _t, samples in settled) < 0.01

