"""A remuxed source's audio and thumbnails: audio PTS on the video's timeline, Opus passed
through byte for byte, AAC transcoded to Opus with its timing kept, and thumbnails made
from one decoded keyframe, in the source thread."""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from streamrelay.publisher.client import Readiness
from streamrelay.publisher.remux_audio import SourceAudio
from streamrelay.publisher.thumbnail import KeyframeThumbnails, ThumbnailMaker
from streamrelay.publisher.timeline import LiveClock, MediaTimeline, PacedClock
from tests.integration.test_publisher_source_media import BEEP_FRAME, write_av_clip
from tests.support.pipelines import running
from tests.test_publisher_client import FakeSink, ThreadedMemoryReactor

BASE_US = 1_700_000_000_000_000
MS90 = Fraction(1, 90_000)


class AudioSink(FakeSink):
    """A FakeSink that also takes audio and thumbnails."""

    def __init__(self) -> None:
        super().__init__()
        self.audio: list[tuple[bytes, int]] = []
        self.thumbnails: list[bytes] = []

    def send_audio_threadsafe(self, payload: bytes, capture_time_us: int) -> bool:
        """Record one audio packet."""
        self.audio.append((payload, capture_time_us))
        return True

    def send_thumbnail_threadsafe(self, jpeg: bytes) -> None:
        """Record one thumbnail."""
        self.thumbnails.append(jpeg)


def test_audio_pts_map_onto_the_video_timeline_and_clocks() -> None:
    """Another stream's PTS takes the video's shift (its media time starts where the
    video's did), nothing before the first video PTS or across a jump the video has not
    made; the clocks stamp it on the video's offset without moving it."""
    timeline = MediaTimeline(frame_duration_us=40_000)
    assert timeline.media_time_of(90_000, MS90) is None
    assert timeline.advance(90_000, MS90) == 0  # the video starts at PTS 1 s
    assert timeline.media_time_of(90_000 + 4_500, MS90) == 50_000
    assert timeline.media_time_of(90_000 - 900, MS90) == -10_000
    assert timeline.media_time_of(None, MS90) is None
    assert timeline.media_time_of(90_000 + 10 * 90_000, MS90) is None  # across a jump
    # A wrap in the video: the audio after it follows the new shift.
    assert timeline.advance(5, MS90) == 40_000
    assert timeline.media_time_of(5 + 900, MS90) == 50_000

    live = LiveClock()
    assert live.time_of(0) is None
    stamp = live.capture_time(0, BASE_US)
    assert live.time_of(20_000) == stamp + 20_000
    assert live.capture_time(40_000, BASE_US + 40_000) == stamp + 40_000  # unchanged
    paced = PacedClock()
    assert paced.time_of(0) is None
    due = paced.due(0, BASE_US)
    assert paced.time_of(-5_000) == due - 5_000


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[bytes]]]:
    """The integration test's clips: H.264 with Opus, and with AAC (a beep at frame 25)."""
    directory = tmp_path_factory.mktemp("clips")
    made = {}
    for codec in ("libopus", "aac"):
        path = directory / f"{codec}.mkv"
        _, packets = write_av_clip(path, codec)
        made[codec] = (path, packets)
    return made


def feed(path: Path, audio: Any, shift_after: int | None = None) -> None:
    """Demux ``path``'s audio into ``audio``, stamped BASE_US + PTS (plus 10 s from the
    ``shift_after``-th packet on: a jump in the source)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        for number, packet in enumerate(container.demux(stream)):
            if not packet.size or packet.pts is None:
                continue
            stamp = BASE_US + int(packet.pts * packet.time_base * 1_000_000)
            if shift_after is not None and number >= shift_after:
                stamp += 10_000_000
            audio.handle(packet, stamp)


def opened(path: Path, sink: Any) -> tuple[Any, SourceAudio]:
    """A container (to close) and a SourceAudio for its audio track."""
    container = av.open(str(path))
    return container, SourceAudio(container.streams.audio[0], sink)


def test_opus_passes_through_packet_for_packet(clips: dict[str, Any]) -> None:
    """Opus: each packet goes out as it is, with its own capture time; meta says mono
    Opus; offline or untimed packets are counted, not sent."""
    path, packets = clips["libopus"]
    sink = AudioSink()
    container, audio = opened(path, sink)
    try:
        assert audio.passthrough and audio.mode == "audio: Opus passed through"
        assert audio.meta == {"codec": "opus", "sample_rate": 48_000, "channels": 1}
        feed(path, audio)
    finally:
        container.close()
    assert [payload for payload, _ in sink.audio] == packets
    # Matroska keeps milliseconds: the packets' own times, 20 ms apart give or take 1.
    times = [stamp for _, stamp in sink.audio]
    assert all(abs(b - a - 20_000) <= 1_000 for a, b in zip(times, times[1:], strict=False))

    sink = AudioSink()
    sink.readiness = Readiness.OFFLINE
    container, audio = opened(path, sink)
    try:
        feed(path, audio)
        packet = next(container.demux(container.streams.audio[0]))
        sink.readiness = Readiness.READY
        audio.handle(packet, None)
    finally:
        container.close()
    assert sink.audio == []
    assert audio.stats.offline == len(packets) and audio.stats.untimed == 1


def onset(packets: list[tuple[bytes, int]], channels: int) -> int:
    """The capture time of the first loud decoded sample (PyAV's Opus decoder, no
    pre-skip dropped, as the wire's Opus profile assumes)."""
    decoder: Any = av.CodecContext.create("opus", "r")
    decoder.sample_rate = 48_000
    decoder.layout = "stereo" if channels == 2 else "mono"
    for payload, stamp in packets:
        for frame in decoder.decode(av.Packet(payload)):
            level = np.abs(frame.to_ndarray().astype(np.float64)).max(axis=0)
            loud = np.nonzero(level > 0.2)[0]
            if loud.size:
                return stamp + int(loud[0]) * 1_000_000 // 48_000
    raise AssertionError("no beep decoded")


def test_aac_is_transcoded_to_opus_keeping_its_timing(clips: dict[str, Any]) -> None:
    """AAC (44.1 kHz stereo): decoded, resampled and encoded as 20 ms stereo Opus
    packets, 20 ms apart, that PyAV decodes; the beep's onset keeps its source time
    (1.0 s after PTS 0, within 5 ms); a 10 s jump in the source re-anchors once."""
    path, _ = clips["aac"]
    sink = AudioSink()
    container, audio = opened(path, sink)
    try:
        assert not audio.passthrough and audio.mode == "audio: AAC transcoded to Opus"
        assert audio.meta == {"codec": "opus", "sample_rate": 48_000, "channels": 2}
        feed(path, audio)
    finally:
        container.close()
    assert 140 <= len(sink.audio) <= 152, len(sink.audio)  # 3 s in 20 ms packets
    times = [stamp for _, stamp in sink.audio]
    assert all(b - a == 20_000 for a, b in zip(times, times[1:], strict=False))
    expected = BASE_US + BEEP_FRAME * 40_000
    assert abs(onset(sink.audio, 2) - expected) <= 5_000

    sink = AudioSink()
    container, audio = opened(path, sink)
    try:
        feed(path, audio, shift_after=30)  # 0.7 s: before the beep
    finally:
        container.close()
    assert audio.stats.resyncs == 1
    assert abs(onset(sink.audio, 2) - (expected + 10_000_000)) <= 5_000


def idr_access_unit() -> bytes:
    """One Annex-B H.264 IDR access unit from libx264, with its SPS and PPS in-band."""
    encoder: Any = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 640, 360, "yuv420p"
    encoder.time_base = Fraction(1, 25)
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency"}
    picture = np.zeros((360, 640, 3), dtype=np.uint8)
    picture[:, 320:] = 200
    frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
    frame.pts = 0
    packets = list(encoder.encode(frame)) + list(encoder.encode(None))
    return bytes(packets[0])


def test_keyframe_thumbnails_decode_one_keyframe_per_interval() -> None:
    """A due thumbnail decodes the KEY alone into a 320-pixel JPEG that PyAV reads;
    within the interval nothing is decoded; an undecodable KEY is counted and waits for
    the next interval too."""
    now = [100.0]
    sent: list[bytes] = []
    thumbnails = KeyframeThumbnails(
        ThumbnailMaker(interval=5.0, monotonic=lambda: now[0]), sent.append
    )
    key = idr_access_unit()
    jpeg = thumbnails.offer("h264", key)
    assert jpeg is not None and sent == [jpeg]
    picture = av.CodecContext.create("mjpeg", "r").decode(av.Packet(jpeg))[0]
    assert (picture.width, picture.height) == (320, 180)
    now[0] += 4.9
    assert thumbnails.offer("h264", key) is None
    now[0] += 0.2
    assert thumbnails.offer("h264", b"\x00\x00\x00\x01\x65garbage") is None
    assert thumbnails.undecodable == 1 and len(sent) == 1
    assert thumbnails.offer("h264", key) is None  # the interval started again
    now[0] += 5.0
    assert thumbnails.offer("h264", key) is not None and len(sent) == 2


def test_source_thread_carries_the_audio_and_makes_thumbnails(clips: dict[str, Any]) -> None:
    """SourcePipeline on an H.264 + Opus file: meta carries the audio member, the Opus
    packets reach the sink unchanged, the status mode says so, and a thumbnail is sent
    from a decoded keyframe."""
    from streamrelay.publisher.remux import SourcePipeline
    from streamrelay.publisher.sources import MediaInput
    from tests.support.waiting import wait_until

    path, packets = clips["libopus"]
    sink = AudioSink()
    ticks = itertools.count()
    pipeline = SourcePipeline(
        MediaInput(str(path), {}, False, False, "file:clip.mkv"),
        sink,
        reactor=ThreadedMemoryReactor(),
        encoder_factory=lambda: pytest.fail("a remuxable file must not be encoded"),
        frame_size=(320, 240),
        fps=Fraction(25),
        audio_sink=sink,
        thumbnails=ThumbnailMaker(interval=3600),
        send_thumbnail=sink.send_thumbnail_threadsafe,
        # Every read is late: the file is read as fast as it goes (no waiting).
        wall_clock_us=lambda: BASE_US + next(ticks) * 1_000_000,
    )
    with running(pipeline):
        wait_until(lambda: len(sink.audio) >= len(packets) and sink.thumbnails, 30)
    assert pipeline.mode.endswith("; audio: Opus passed through")
    assert pipeline.mode.startswith("remuxing H.264")
    metas = [meta for kind, meta in sink.received if kind == "meta"]
    assert metas[0]["audio"] == {"codec": "opus", "sample_rate": 48_000, "channels": 1}
    sent = [payload for payload, _ in sink.audio]
    assert set(sent) <= set(packets)
    assert len(sink.thumbnails) == 1 and sink.thumbnails[0][:3] == b"\xff\xd8\xff"
