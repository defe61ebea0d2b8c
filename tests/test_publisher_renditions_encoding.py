"""Rendition sets, encoding: one source encoded into three renditions with real libx264
(PyAV), GOP-aligned: keyframes on the same source frames, identical capture times, and a
keyframe request on any connection forcing a keyframe in all of them."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import av
import pytest

from streamrelay.publisher.client import Readiness
from streamrelay.publisher.h264 import NAL_SPS, nal_type, parse_sps, split_annexb
from streamrelay.publisher.rendition_pipeline import RenditionEncoders, RenditionPipeline
from streamrelay.publisher.rendition_publisher import RenditionPublisher
from streamrelay.publisher.renditions import RenditionSet, parse_renditions
from streamrelay.publisher.settings import PublisherSettings
from streamrelay.publisher.sources import TestPatternSource
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, MediaMessage
from tests.test_publisher_client import FakeRelay, ThreadedMemoryReactor

RENDITIONS = parse_renditions("320x180@400k,192x108@200k,128x72@100k")
GOP = 10


class RecordingSink:
    """One rendition's connection: readiness set by the test; records what it is given."""

    def __init__(self) -> None:
        self.readiness = Readiness.READY
        self.accept = True
        self.metas: list[dict[str, Any]] = []
        self.configs: list[bytes] = []
        # (source frame index, key?, capture time, payload) per frame
        self.frames: list[tuple[int, bool, int, bytes]] = []
        self.frame_index = 0

    def send_meta_threadsafe(self, meta: Any) -> None:
        self.metas.append(dict(meta))

    def send_config_threadsafe(self, payload: bytes, capture_time_us: int | None = None) -> None:
        self.configs.append(payload)

    def send_frame_threadsafe(
        self, payload: bytes, *, key: bool, capture_time_us: int | None = None
    ) -> bool:
        assert capture_time_us is not None
        self.frames.append((self.frame_index, key, capture_time_us, payload))
        return self.accept

    def keys(self) -> list[tuple[int, int]]:
        """(source frame index, capture time) of every KEY."""
        return [(index, stamp) for index, key, stamp, _ in self.frames if key]


@pytest.fixture
def rig() -> tuple[RenditionPipeline, list[RecordingSink]]:
    """A rendition pipeline over the test pattern, its sinks recording."""
    encoders = RenditionEncoders(
        RENDITIONS, fps=Fraction(30), keyframe_interval_frames=GOP, preset="ultrafast"
    )
    sinks = [RecordingSink() for _ in RENDITIONS]
    pipeline = RenditionPipeline(
        TestPatternSource(320, 180),
        encoders,
        sinks,
        RenditionSet("cam", RENDITIONS),
        reactor=ThreadedMemoryReactor(),
        fps=Fraction(30),
    )
    return pipeline, sinks


def run(pipeline: RenditionPipeline, sinks: list[RecordingSink], frames: range) -> None:
    """Drive the capture loop's body over ``frames`` (source frame indices); the set's
    own keyframe decision makes the first frame a KEY."""
    force = False
    for index in frames:
        for sink in sinks:
            sink.frame_index = index
        force = pipeline.run_once(index, index / 30, force)


def decoded_size(sink: RecordingSink) -> tuple[int, int]:
    """Decode the rendition's first KEY with FFmpeg's H.264 decoder: its picture size."""
    decoder: Any = av.CodecContext.create("h264", "r")
    key = next(payload for _, key, _, payload in sink.frames if key)
    frames = decoder.decode(av.Packet(key))
    frames += decoder.decode(None)
    assert frames, "the KEY did not decode"
    return frames[0].width, frames[0].height


def test_keyframes_fall_on_the_same_source_frames_with_identical_capture_times(
    rig: tuple[RenditionPipeline, list[RecordingSink]],
) -> None:
    """35 source frames into three renditions: every rendition has a frame for every
    source frame, KEYs at 0, 10, 20, 30 (the fixed GOP) in all three with identical
    capture times, each rendition at its own size (SPS and decoded picture)."""
    pipeline, sinks = rig
    run(pipeline, sinks, range(35))
    expected_keys = [0, 10, 20, 30]
    for sink in sinks:
        assert [index for index, *_ in sink.frames] == list(range(35))
        assert [index for index, _ in sink.keys()] == expected_keys
    assert sinks[0].keys() == sinks[1].keys() == sinks[2].keys()
    assert [f[2] for f in sinks[0].frames] == [f[2] for f in sinks[2].frames]
    for sink, rendition in zip(sinks, RENDITIONS, strict=True):
        sps = next(u for u in split_annexb(sink.configs[0]) if nal_type(u) == NAL_SPS)
        info = parse_sps(sps)
        assert (info.width, info.height) == (rendition.width, rendition.height)
        assert decoded_size(sink) == (rendition.width, rendition.height)
    assert pipeline.stats.keyframes_encoded == 4
    assert [s.keyframes_encoded for s in pipeline.rendition_stats] == [4, 4, 4]


def test_a_keyframe_request_forces_the_next_source_frame_key_in_all(
    rig: tuple[RenditionPipeline, list[RecordingSink]],
) -> None:
    """A request (from any rendition's connection) mid-GOP makes the very next source frame
    a KEY in all three, and the fixed GOP counts again from there."""
    pipeline, sinks = rig
    run(pipeline, sinks, range(14))
    pipeline.request_keyframe()
    run(pipeline, sinks, range(14, 30))
    for sink in sinks:
        assert [index for index, _ in sink.keys()] == [0, 10, 14, 24]
    assert sinks[0].keys() == sinks[1].keys() == sinks[2].keys()


def test_a_rendition_behind_drops_its_own_frames_and_comes_back_aligned(
    rig: tuple[RenditionPipeline, list[RecordingSink]],
) -> None:
    """One rendition's connection congested drops that rendition's frames only; when it is
    ready again the next source frame is a KEY in every rendition (alignment kept); an
    offline rendition is skipped without counting drops; a frame refused at a handoff makes
    the next one a KEY everywhere."""
    pipeline, sinks = rig
    run(pipeline, sinks, range(3))
    sinks[1].readiness = Readiness.CONGESTED
    run(pipeline, sinks, range(3, 6))
    sinks[1].readiness = Readiness.READY
    run(pipeline, sinks, range(6, 8))
    assert [index for index, *_ in sinks[1].frames] == [0, 1, 2, 6, 7]
    assert [index for index, *_ in sinks[0].frames] == list(range(8))
    sinks[2].readiness = Readiness.OFFLINE
    run(pipeline, sinks, range(8, 9))
    sinks[2].readiness = Readiness.READY
    sinks[0].accept = False
    run(pipeline, sinks, range(9, 10))
    sinks[0].accept = True
    run(pipeline, sinks, range(10, 12))
    for sink in sinks:
        keys = [index for index, _ in sink.keys()]
        assert set(keys) <= {0, 6, 9, 10}
    assert [i for i, _ in sinks[0].keys()] == [0, 6, 9, 10]
    assert [i for i, _ in sinks[2].keys()] == [0, 6, 9, 10]
    assert [i for i, _ in sinks[1].keys()] == [0, 6, 9, 10]
    assert pipeline.rendition_stats[1].frames_dropped == 3
    assert pipeline.rendition_stats[2].frames_dropped == 0
    assert pipeline.stats.frames_dropped == 3  # rendition frames, all of the 108p one


def test_every_meta_announces_the_whole_set_with_codecs(
    rig: tuple[RenditionPipeline, list[RecordingSink]],
) -> None:
    """Before the first CONFIG each rendition sends its meta: its own label, size and
    bitrate, and the whole set with every rendition's codec (known from the first meta
    on), matching the codec of each rendition's own stream."""
    pipeline, sinks = rig
    run(pipeline, sinks, range(2))
    metas = [sink.metas[0] for sink in sinks]
    announced = metas[0]["renditions"]
    assert [m["renditions"] for m in metas] == [announced] * 3
    assert [entry["stream"] for entry in announced] == ["cam", "cam~108p", "cam~72p"]
    for meta, rendition, entry in zip(metas, RENDITIONS, announced, strict=True):
        assert meta["rendition"] == rendition.label == entry["name"]
        assert meta["bitrate"] == rendition.bitrate == entry["bitrate"]
        assert (meta["width"], meta["height"]) == (rendition.width, rendition.height)
        assert meta["codec"] == entry["codec"]


def test_a_stalled_rendition_connection_stays_bounded_and_rejoins_at_an_aligned_key() -> None:
    """Real connections (in-memory relays) fed by the real pipeline: while the 108p
    connection's transport is paused, its outbox never passes its limit and its frames are
    dropped at the source, the others get every frame; when it drains it resumes at a KEY
    that all three renditions carry, with the same capture time."""
    reactor, relay = ThreadedMemoryReactor(), FakeRelay()
    group = RenditionPublisher(
        PublisherSettings("ws://relay.test/publish/cam", ping_interval=0, open_timeout=0),
        RENDITIONS,
        reactor=reactor,
        queue_bounds=lambda bitrate: (8_000, 24_000),
        endpoint_factory=relay.endpoint,
    )
    encoders = RenditionEncoders(
        RENDITIONS, fps=Fraction(30), keyframe_interval_frames=1000, preset="ultrafast"
    )
    pipeline = RenditionPipeline(
        TestPatternSource(320, 180),
        encoders,
        group.publishers,
        group.rendition_set,
        reactor=reactor,
        fps=Fraction(30),
    )
    group.on_keyframe_request = pipeline.request_keyframe
    group.start()
    for connection in relay.connections:
        connection.accept()
    received: list[list[Any]] = [[], [], []]

    def frames(count: int, start: int) -> None:
        for index in range(start, start + count):
            pipeline.run_once(index, index / 30, False)
            reactor.run_thread_calls()
            for got, connection in zip(received, relay.connections, strict=True):
                got.extend(m for m in connection.messages() if isinstance(m, MediaMessage))

    frames(5, 0)
    stalled = relay.connections[1].transport.producer
    assert stalled is not None
    stalled.pauseProducing()
    frames(60, 5)
    assert group.publishers[1].queued_bytes <= 24_000
    assert pipeline.rendition_stats[1].frames_dropped > 0
    assert group.publishers[1].readiness is Readiness.CONGESTED
    stalled.resumeProducing()
    frames(5, 65)

    def keys(got: list[Any]) -> list[int]:
        return [m.capture_time_us for m in got if m.flags & FLAG_KEY]

    late_key = keys(received[1])[-1]
    assert late_key > keys(received[1])[0]
    assert late_key in keys(received[0]) and late_key in keys(received[2])
    assert keys(received[0]) == keys(received[2])
    assert len([m for m in received[0] if not m.flags & FLAG_CONFIG]) == 70
    assert len([m for m in received[2] if not m.flags & FLAG_CONFIG]) == 70
