"""Publishing on demand on the publisher's side: the decision (:class:`OnDemand`, on a
Clock), the Publisher that reports it to an in-memory relay, and the capture thread that
sleeps while idle and starts again from a keyframe."""

from __future__ import annotations

import time
from fractions import Fraction
from typing import Any

import pytest
from twisted.internet.task import Clock

from streamrelay.publisher import Activity, OnDemand, PublisherSettings, Readiness
from streamrelay.publisher.pipeline import CapturePipeline
from streamrelay.publisher.sources import CapturedFrame, TestPatternSource
from streamrelay.wire import MediaMessage
from tests.test_publisher_client import (
    CONFIG,
    META,
    FakeSink,
    ThreadedMemoryReactor,
    connected_publisher,
    make_pipeline,
)

# -- the decision ---------------------------------------------------------------------------


def decider(grace: float = 10.0) -> tuple[OnDemand, Clock, list[Activity]]:
    clock = Clock()
    changes: list[Activity] = []
    on_demand = OnDemand(clock, grace, changes.append)
    on_demand.start()
    return on_demand, clock, changes


def test_idle_after_a_whole_grace_period_without_viewers() -> None:
    """It starts active and goes idle once nobody (or an unknown audience) has watched
    for the whole grace period; a viewer inside the period restarts it from zero."""
    on_demand, clock, changes = decider(10)
    assert on_demand.activity is Activity.ACTIVE
    clock.advance(9.9)
    assert changes == []
    on_demand.update(2)
    clock.advance(100)
    assert changes == []
    on_demand.update(0)
    clock.advance(9.9)
    on_demand.update(None)  # the connection dropped: nobody can be watching through it
    assert changes == []
    clock.advance(0.1)
    assert changes == [Activity.IDLE] and on_demand.idle
    clock.advance(1000)
    on_demand.update(0)
    on_demand.update(None)
    assert changes == [Activity.IDLE]


def test_the_first_viewer_wakes_it_at_once() -> None:
    """Idle, the first report of a viewer turns it active with no delay; the grace
    starts again only when the audience is back to zero. Idle time is accounted."""
    on_demand, clock, changes = decider(5)
    clock.advance(5)
    clock.advance(60)
    on_demand.update(1)
    assert changes == [Activity.IDLE, Activity.ACTIVE]
    assert on_demand.idle_periods == 1 and on_demand.total_idle_seconds() == 60
    on_demand.update(3)
    on_demand.update(0)
    clock.advance(5)
    assert changes[-1] is Activity.IDLE
    clock.advance(2)
    assert on_demand.total_idle_seconds() == 62


def test_stop_cancels_and_grace_bounds_are_checked() -> None:
    """stop() leaves no timer behind; a zero grace idles on the next turn; a negative
    one is refused."""
    on_demand, clock, changes = decider(5)
    on_demand.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert changes == []
    immediate, clock, changes = decider(0)
    clock.advance(0)
    assert changes == [Activity.IDLE]
    with pytest.raises(ValueError):
        OnDemand(clock, -1)
    with pytest.raises(ValueError):
        PublisherSettings(on_demand=True, on_demand_grace=-1)


# -- the Publisher --------------------------------------------------------------------------


def media_kinds(messages: list[Any]) -> list[str]:
    kinds = []
    for message in messages:
        if isinstance(message, MediaMessage):
            kinds.append("config" if message.is_config else "key" if message.is_key else "delta")
        else:
            kinds.append(message["type"] + (":" + message["state"] if "state" in message else ""))
    return kinds


def test_publisher_reports_idle_refuses_frames_and_resumes_with_config_and_key() -> None:
    """On demand, the publisher tells the relay it is active when it connects; with no
    viewers for the grace it says ``idle``, reads IDLE, refuses frames and calls
    on_activity_change; the first viewer makes it say ``active``, send the CONFIG again and
    ask for a KEY, and frames flow from that KEY."""
    publisher, relay, recorder, reactor = connected_publisher(on_demand=True, on_demand_grace=5)
    changes: list[Activity] = []
    publisher.on_activity_change = changes.append
    publisher.send_meta(META)
    publisher.send_config(CONFIG, 10)
    assert publisher.send_frame(b"key", key=True, capture_time_us=11)
    assert media_kinds(relay.last.messages()) == ["publisher-state:active", "meta", "config", "key"]
    relay.last.send_text({"type": "viewers", "count": 0})
    reactor.advance(5)
    assert changes == [Activity.IDLE]
    assert publisher.readiness is Readiness.IDLE and publisher.activity is Activity.IDLE
    assert publisher.send_frame(b"late", key=False, capture_time_us=12) is False
    publisher.send_config(CONFIG, 13)  # kept for the resume, not sent while idle
    assert media_kinds(relay.last.messages()) == ["publisher-state:idle"]
    requests = recorder.keyframe_requests
    relay.last.send_text({"type": "viewers", "count": 1})
    assert changes == [Activity.IDLE, Activity.ACTIVE]
    assert publisher.readiness is Readiness.READY
    assert recorder.keyframe_requests == requests + 1
    assert publisher.send_frame(b"key2", key=True, capture_time_us=20)
    assert media_kinds(relay.last.messages()) == ["publisher-state:active", "config", "key"]


def test_idle_survives_a_reconnect_and_is_said_again() -> None:
    """A publisher idle when its connection drops stays idle, and after reconnecting
    sends meta, CONFIG and then ``idle`` again, so the new relay marks it available."""
    publisher, relay, _, reactor = connected_publisher(on_demand=True, on_demand_grace=1)
    publisher.send_meta(META)
    publisher.send_config(CONFIG, 10)
    reactor.advance(1)
    assert publisher.readiness is Readiness.IDLE
    relay.last.drop()
    reactor.advance(60)  # the backoff's delay
    relay.last.accept()
    assert media_kinds(relay.last.messages()) == ["meta", "config", "publisher-state:idle"]
    assert publisher.readiness is Readiness.IDLE
    publisher.stop()


def test_one_decision_can_drive_several_publishers() -> None:
    """Without ``on_demand`` a caller may drive publishers with one :class:`OnDemand`
    fed their summed audience (several connections, one source): idle only when the sum
    has been 0 for the grace, and each publisher says so to its relay."""
    first, first_relay, _, reactor = connected_publisher()
    second, second_relay, _, _ = connected_publisher()
    counts = {"first": 0, "second": 0}

    def both(activity: Activity) -> None:
        first.set_activity(activity)
        second.set_activity(activity)

    shared = OnDemand(reactor, 3, both)
    shared.start()

    def report(which: str) -> Any:
        def on_viewers(count: int) -> None:
            counts[which] = count
            shared.update(sum(counts.values()))

        return on_viewers

    first.on_viewers, second.on_viewers = report("first"), report("second")
    first_relay.last.send_text({"type": "viewers", "count": 0})
    second_relay.last.send_text({"type": "viewers", "count": 1})
    reactor.advance(10)
    assert first.readiness is Readiness.READY  # the other connection has a viewer
    second_relay.last.send_text({"type": "viewers", "count": 0})
    reactor.advance(3)
    assert first.readiness is Readiness.IDLE and second.readiness is Readiness.IDLE
    for relay in (first_relay, second_relay):
        assert media_kinds(relay.last.messages()) == ["publisher-state:idle"]
    first_relay.last.send_text({"type": "viewers", "count": 2})
    assert first.activity is Activity.ACTIVE and second.activity is Activity.ACTIVE


def test_without_on_demand_nothing_changes() -> None:
    """Without the option: no state message, never IDLE, whatever the audience."""
    publisher, relay, _, reactor = connected_publisher()
    relay.last.send_text({"type": "viewers", "count": 0})
    reactor.advance(3600)
    assert publisher.readiness is Readiness.READY and publisher.on_demand is None
    assert media_kinds(relay.last.messages()) == []


# -- the capture thread ---------------------------------------------------------------------


class PausableSource(TestPatternSource):
    """The test pattern, counting reads, pauses and resumes."""

    def __init__(self) -> None:
        super().__init__(160, 96)
        self.reads = 0
        self.pauses = 0
        self.resumes = 0

    def read(self, frame_index: int, elapsed: float) -> CapturedFrame:
        self.reads += 1
        return super().read(frame_index, elapsed)

    def pause(self) -> None:
        self.pauses += 1

    def resume(self) -> None:
        self.resumes += 1


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_capture_thread_sleeps_while_idle_and_restarts_at_a_keyframe() -> None:
    """While the sink reads IDLE the real capture thread pauses its source and neither
    reads nor encodes a frame; woken by a keyframe request once active, it resumes the
    source and its first frame is a KEY."""
    sink = FakeSink()
    _, encoder = make_pipeline(sink, None)
    source = PausableSource()
    pipeline = CapturePipeline(
        source, encoder, sink, reactor=ThreadedMemoryReactor(), fps=Fraction(60)
    )
    pipeline.start()
    try:
        wait_for(lambda: any(kind == "delta" for kind, _ in sink.received))
        sink.readiness = Readiness.IDLE
        wait_for(lambda: source.pauses == 1)
        reads, encoded = source.reads, pipeline.stats.frames_encoded
        time.sleep(0.5)  # 30 frame intervals: none may be read or encoded
        assert (source.reads, pipeline.stats.frames_encoded) == (reads, encoded)
        sink.received.clear()
        sink.readiness = Readiness.READY
        pipeline.request_keyframe()
        wait_for(lambda: any(kind in ("key", "delta") for kind, _ in sink.received))
        assert source.resumes == 1
        frames = [kind for kind, _ in sink.received if kind in ("key", "delta")]
        assert frames[0] == "key"
    finally:
        pipeline.stop()
        assert pipeline.join(5)
    assert pipeline.stats.idle_periods == 1



def test_a_capture_device_is_closed_while_idle_and_reopened() -> None:
    """A device source (here FFmpeg's lavfi test source, opened like a camera) releases
    the device on pause, opens it again on resume and delivers frames after."""
    from streamrelay.publisher.sources import DeviceInput, DeviceSource

    device = DeviceSource(
        DeviceInput("testsrc=size=160x96:rate=30", "lavfi", {}), 160, 96, "lavfi testsrc"
    )
    try:
        assert device.read(0, 0.0).frame.width == 160
        device.pause()
        assert not device.opened
        device.resume()
        assert device.opened
        frame = device.read(1, 0.0).frame
        assert (frame.width, frame.height, frame.format.name) == (160, 96, "yuv420p")
    finally:
        device.close()
