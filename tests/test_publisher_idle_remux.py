"""On demand with a remuxed source (:class:`SourcePipeline`): while the sink is IDLE a
paced file pauses where it is (its clock stopped) and a live source is closed, then
opened again; either way the stream resumes at the source's next keyframe, the status
line says so meanwhile, and nothing read while idle counts as a drop. Also: a transcoded
network source (decoded from an open container) closes and reopens across a pause."""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from streamrelay.publisher.client import Readiness
from streamrelay.publisher.remux import IDLE_CLOSED, IDLE_PAUSED, REMUXING, RESUMED
from streamrelay.publisher.sources import DeviceInput, DeviceSource, MediaInput
from tests.support.pipelines import running
from tests.support.waiting import wait_until
from tests.test_publisher_client import FakeSink, ThreadedMemoryReactor


def frames(sink: FakeSink) -> list[str]:
    """The kinds of the frames the sink received, in order."""
    return [kind for kind, _ in sink.received if kind in ("key", "delta")]


def source_pipeline(media: MediaInput, sink: FakeSink) -> Any:
    """A SourcePipeline on ``media`` that must remux (an encoder is a failure)."""
    from streamrelay.publisher.remux import SourcePipeline

    return SourcePipeline(
        media,
        sink,
        reactor=ThreadedMemoryReactor(),
        encoder_factory=lambda: pytest.fail("a remuxable source must not be encoded"),
        frame_size=(320, 240),
        fps=Fraction(25),
    )


def test_a_paced_file_pauses_where_it_is_and_resumes_at_its_next_keyframe(
    tmp_path: Path,
) -> None:
    """A remuxed file played at its own rate: once the sink turns IDLE nothing more is
    read (not a frame counted as dropped), its clock stops; on ACTIVE it goes on from
    where it paused (the next keyframe is less than a GOP further), starting with a KEY,
    the status line saying it waits for one until it has come."""
    from tests.integration.test_publisher_source import GOP, encode_to

    clip = tmp_path / "clip.flv"
    encode_to([str(clip)], "flv", 4 * GOP, str(tmp_path / "clip.jsonl"), paced=False)
    sink = FakeSink()
    pipeline = source_pipeline(MediaInput(str(clip), {}, False, False, "file:clip.flv"), sink)
    with running(pipeline):
        wait_until(lambda: len(frames(sink)) >= 5, 20)
        sink.readiness = Readiness.IDLE
        wait_until(lambda: pipeline.mode == IDLE_PAUSED, 20)
        stats = pipeline.remux_stats
        read = stats.frames_captured
        time.sleep(1.0)  # 25 frames' time: none may be read
        assert stats.frames_captured == read
        sent = len(sink.received)
        sink.readiness = Readiness.READY
        pipeline.request_keyframe()  # what the publisher does when it turns active
        wait_until(lambda: len(frames(sink)) > 6 and pipeline.mode == REMUXING, 20)
        after = [kind for kind, _ in sink.received[sent:] if kind in ("key", "delta")]
        assert after[0] == "key"
        assert stats.frames_captured - read <= GOP + 1  # on from where it paused
    assert stats.frames_dropped == 0 and stats.frames_idle >= 1
    assert stats.idle_periods == 1 and pipeline.idle_clock.paused_seconds() >= 1.0
    assert stats.source_opens == 1  # paused, not reopened


def test_a_live_source_is_closed_while_idle_and_opened_again(tmp_path: Path) -> None:
    """A live source (MPEG-TS over UDP on loopback from a producer process) is closed
    once the sink is IDLE, stays closed while idle, and is opened again once it is not;
    the status line says that viewers start at the source's next keyframe until one went
    out; the stream restarts at a KEY and nothing counts as a drop."""
    import socket

    from tests.integration.test_publisher_source import GOP, free_port, producer_process

    port = free_port(socket.SOCK_DGRAM)
    url = f"udp://127.0.0.1:{port}"
    sink = FakeSink()
    sink.readiness = Readiness.IDLE
    pipeline = source_pipeline(MediaInput(url, {}, True, False, url), sink)
    pipeline.start()
    time.sleep(0.5)  # the source binds its port
    producer = producer_process(
        [f"{url}?pkt_size=1316"], "mpegts", 20 * GOP, str(tmp_path / "produced.jsonl")
    )
    try:
        wait_until(lambda: pipeline.mode == IDLE_CLOSED, 30)
        stats = pipeline.remux_stats
        time.sleep(0.5)
        assert stats.source_opens == 1 and pipeline.mode == IDLE_CLOSED
        assert frames(sink) == []
        # Active again, but offline: opened again, and nothing can go out yet.
        sink.readiness = Readiness.OFFLINE
        pipeline.request_keyframe()
        wait_until(lambda: stats.source_opens >= 2 and stats.frames_offline >= 1, 30)
        assert pipeline.mode == REMUXING + RESUMED
        sink.readiness = Readiness.READY
        wait_until(lambda: frames(sink) and pipeline.mode == REMUXING, 30)
        assert frames(sink)[0] == "key"
    finally:
        pipeline.stop()
        joined = pipeline.join(15)  # the producer's next packet ends the read at once
        producer.kill()
        producer.wait()
    assert joined
    assert stats.frames_dropped == 0 and stats.idle_periods == 1


def test_a_listening_source_is_read_on_while_idle_and_not_counted_as_drops(
    tmp_path: Path,
) -> None:
    """A listening source (its pusher might not come back if it were closed) stays open
    while idle; what it sends is skipped, and none of it counts as dropped."""
    from tests.integration.test_publisher_source import GOP, encode_to

    clip = tmp_path / "clip.ts"
    encode_to([str(clip)], "mpegts", 2 * GOP, str(tmp_path / "clip.jsonl"), paced=False)
    sink = FakeSink()
    sink.readiness = Readiness.IDLE
    pipeline = source_pipeline(MediaInput(str(clip), {}, True, True, "rtmp://listen"), sink)
    with running(pipeline):
        wait_until(lambda: pipeline.remux_stats.frames_idle >= 2, 20)
    stats = pipeline.remux_stats
    assert stats.frames_dropped == 0 and stats.idle_periods == 0 and frames(sink) == []


def test_a_source_decoded_from_an_open_container_reopens_after_a_pause() -> None:
    """A transcoded network source (DeviceSource.from_container) closes on pause and is
    opened again on resume when it knows how; without that it stays open (it could not
    reopen) instead of failing on resume."""
    import av

    lavfi = DeviceInput("testsrc=size=160x96:rate=30", "lavfi", {})
    container = av.open(lavfi.url, format=lavfi.format)
    source = DeviceSource.from_container(container, 160, 96, "lavfi", reopen=lavfi)
    try:
        source.read(0, 0.0)
        source.pause()
        assert not source.opened
        source.resume()
        assert source.opened and source.read(1, 0.0).frame.width == 160
    finally:
        source.close()
    container = av.open(lavfi.url, format=lavfi.format)
    kept = DeviceSource.from_container(container, 160, 96, "lavfi")
    try:
        kept.pause()
        assert kept.opened
        kept.resume()
        assert kept.read(0, 0.0).frame.height == 96
    finally:
        kept.close()


class CountingDevice(DeviceSource):
    """A device source (FFmpeg's lavfi test source), counting reads."""

    reads = 0

    def read(self, frame_index: int, elapsed: float) -> Any:
        self.reads += 1
        return super().read(frame_index, elapsed)


def test_a_listening_source_is_drained_while_the_capture_thread_idles() -> None:
    """A decoded source marked ``drain_while_paused`` (a listener: its pusher must not
    back up) stays open and is read on while the capture thread idles, nothing of it
    encoded or counted as dropped; active again, it is encoded from a KEY."""
    from streamrelay.publisher.pipeline import CapturePipeline
    from tests.test_publisher_client import make_pipeline

    sink = FakeSink()
    sink.readiness = Readiness.IDLE
    _, encoder = make_pipeline(sink, None)
    source = CountingDevice(
        DeviceInput("testsrc=size=160x96:rate=30", "lavfi", {}), 160, 96, "listener"
    )
    source.drain_while_paused = True
    pipeline = CapturePipeline(
        source, encoder, sink, reactor=ThreadedMemoryReactor(), fps=Fraction(30)
    )
    with running(pipeline):
        wait_until(lambda: source.reads >= 10, 20)
        assert source.opened and frames(sink) == []
        sink.readiness = Readiness.READY
        pipeline.request_keyframe()
        wait_until(lambda: frames(sink), 20)
        assert frames(sink)[0] == "key"
    stats = pipeline.stats
    assert stats.idle_periods == 1 and stats.frames_dropped == 0 and stats.frames_offline >= 9
