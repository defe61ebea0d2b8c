"""Named streams, publishers and viewers: the relay's core with a Clock and no sockets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.task import Clock

from streamrelay.budget import MESSAGE_OVERHEAD_BYTES
from streamrelay.config import RelayConfig
from streamrelay.limits import Refusal
from streamrelay.streams import PublisherSession, StreamRegistry, ViewerSession
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, MediaMessage, encode_media, parse_media
from tests.fakes import captured_log


def identity_frame(payload: bytes, is_binary: bool) -> tuple[bool, bytes]:
    """Frames are the payloads themselves, so viewers see exactly what was sent."""
    return (is_binary, payload)


@dataclass(eq=False)
class FakePublisher:
    """A publisher connection: records what the core tells it."""

    peer_address: str = "127.0.0.1:5000"
    counts: list[tuple[float, int]] = field(default_factory=list)
    keyframe_requests: list[float] = field(default_factory=list)
    replaced_calls: int = 0
    clock: Clock | None = None

    def send_viewer_count(self, count: int) -> None:
        self.counts.append((self.clock.seconds() if self.clock else 0.0, count))

    def send_keyframe_request(self) -> None:
        self.keyframe_requests.append(self.clock.seconds() if self.clock else 0.0)

    def replaced(self) -> None:
        self.replaced_calls += 1


@dataclass(eq=False)
class FakeViewer:
    """A viewer connection: records every frame written to it."""

    frames: list[tuple[bool, bytes]] = field(default_factory=list)
    stalls: int = 0

    def write_frame(self, frame: tuple[bool, bytes]) -> None:
        self.frames.append(frame)

    def stalled(self) -> None:
        self.stalls += 1

    def attached(self, queue: Any) -> None:
        pass

    def received(self) -> list[Any]:
        """Text as decoded JSON, media as its capture-time tag."""
        result: list[Any] = []
        for is_binary, payload in self.frames:
            if is_binary:
                result.append(parse_media(payload).capture_time_us)
            else:
                result.append(json.loads(payload))
        return result

    def media(self) -> list[int]:
        return [parse_media(p).capture_time_us for b, p in self.frames if b]

    def texts(self) -> list[dict[str, Any]]:
        return [json.loads(p) for b, p in self.frames if not b]


def config_msg(tag: int, size: int = 40) -> MediaMessage:
    return parse_media(encode_media(FLAG_CONFIG, tag, b"c" * (size - 9)))


def key_msg(tag: int, size: int = 100) -> MediaMessage:
    return parse_media(encode_media(FLAG_KEY, tag, b"k" * (size - 9)))


def delta_msg(tag: int, size: int = 100) -> MediaMessage:
    return parse_media(encode_media(0, tag, b"d" * (size - 9)))


LIVE = {"type": "status", "state": "live"}
OFFLINE = {"type": "status", "state": "offline"}


class Core:
    """A registry on a Clock with helpers to attach fakes."""

    def __init__(self, **overrides: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.config = RelayConfig(**overrides)
        self.registry = StreamRegistry(self.config, self.clock, identity_frame)

    def publish(self, name: str = "cam", peer: str = "127.0.0.1:5000") -> tuple[
        PublisherSession, FakePublisher
    ]:
        link = FakePublisher(peer_address=peer, clock=self.clock)
        session = self.registry.publish(name, link)
        assert isinstance(session, PublisherSession), session
        return session, link

    def watch(self, name: str = "cam") -> tuple[ViewerSession, FakeViewer]:
        sink = FakeViewer()
        session = self.registry.watch(name, sink)
        assert isinstance(session, ViewerSession), session
        return session, sink


def send(session: PublisherSession, *messages: MediaMessage) -> None:
    for message in messages:
        session.media(message)


# -- joining ---------------------------------------------------------------------------


def test_late_joiner_gets_status_meta_config_and_the_cached_gop() -> None:
    """A viewer joining a live stream gets, at once: status live, the latest meta, the
    CONFIG and the GOP since the latest KEY (its first frame needs no wait)."""
    core = Core()
    publisher, _link = core.publish()
    publisher.meta(b'{"type":"meta","codec":"h264","width":640}')
    send(publisher, config_msg(1), key_msg(2), delta_msg(3), key_msg(4), delta_msg(5))
    _session, viewer = core.watch()
    assert viewer.received() == [
        LIVE,
        {"type": "meta", "codec": "h264", "width": 640},
        1,
        4,
        5,
    ]
    send(publisher, delta_msg(6))
    assert viewer.media() == [1, 4, 5, 6]


def test_media_reaches_viewers_byte_for_byte() -> None:
    """Each viewer gets the publisher's messages unchanged, header included."""
    core = Core()
    publisher, _ = core.publish()
    viewers = [core.watch()[1] for _ in range(3)]
    messages = [config_msg(1), key_msg(2), delta_msg(3), delta_msg(4)]
    send(publisher, *messages)
    for viewer in viewers:
        assert [payload for is_binary, payload in viewer.frames if is_binary] == [
            m.data for m in messages
        ]


def test_meta_is_forwarded_and_the_latest_kept() -> None:
    """Metadata reaches current viewers; a joining viewer gets only the latest."""
    core = Core()
    publisher, _ = core.publish()
    _, early = core.watch()
    publisher.meta(b'{"type":"meta","v":1}')
    publisher.meta(b'{"type":"meta","v":2}')
    _, late = core.watch()
    assert early.texts() == [LIVE, {"type": "meta", "v": 1}, {"type": "meta", "v": 2}]
    assert late.texts() == [LIVE, {"type": "meta", "v": 2}]


def test_with_the_cache_off_a_joiner_waits_for_the_next_key_and_asks_for_one() -> None:
    """--gop-cache-bytes 0: a joining viewer gets no stale deltas, a keyframe request
    goes out, and its first frames are the CONFIG then the next KEY."""
    core = Core(gop_cache_bytes=0)
    publisher, link = core.publish()
    send(publisher, config_msg(1), key_msg(2), delta_msg(3))
    assert link.keyframe_requests == []
    _, viewer = core.watch()
    assert link.keyframe_requests == [core.clock.seconds()]
    send(publisher, delta_msg(4))
    assert viewer.media() == []
    send(publisher, key_msg(5), delta_msg(6))
    assert viewer.received() == [LIVE, 1, 5, 6]


def test_joining_before_any_key_asks_for_a_keyframe() -> None:
    """A live stream with no cached KEY yet: the joiner's need is sent."""
    core = Core()
    publisher, link = core.publish()
    send(publisher, config_msg(1), delta_msg(2))
    core.watch()
    assert len(link.keyframe_requests) == 1


def test_joining_with_a_cached_key_asks_for_nothing() -> None:
    """When the cache can start the viewer no keyframe request is sent."""
    core = Core()
    publisher, link = core.publish()
    send(publisher, key_msg(1))
    core.watch()
    core.watch()
    assert link.keyframe_requests == []


# -- keyframe requests and viewer counts ------------------------------------------------


def test_keyframe_requests_are_rate_limited_and_never_lost() -> None:
    """At most one keyframe request per --keyframe-request-interval; a need that arises
    inside the interval is sent at its end, once."""
    core = Core(gop_cache_bytes=0, keyframe_request_interval=1.0)
    publisher, link = core.publish()
    start = core.clock.seconds()
    core.watch()
    assert link.keyframe_requests == [start]
    core.clock.advance(0.2)
    core.watch()
    core.clock.advance(0.3)
    viewer, _ = core.watch()
    viewer.request_keyframe()
    assert link.keyframe_requests == [start]
    core.clock.advance(0.49)
    assert link.keyframe_requests == [start]
    core.clock.advance(0.01)
    assert link.keyframe_requests == [start, start + 1.0]
    core.clock.advance(10)
    assert link.keyframe_requests == [start, start + 1.0]
    # After a quiet period a need is sent at once again.
    viewer.request_keyframe()
    assert link.keyframe_requests[-1] == core.clock.seconds()
    assert len(link.keyframe_requests) == 3


def test_keyframe_requests_over_a_storm_of_needs() -> None:
    """Many needs over many intervals: one request per interval, none in between."""
    core = Core(keyframe_request_interval=0.5)
    publisher, link = core.publish()
    viewer, _ = core.watch()
    for _ in range(100):
        viewer.request_keyframe()
        core.clock.advance(0.05)
    core.clock.advance(1)
    times = link.keyframe_requests
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert all(gap >= 0.5 - 1e-9 for gap in gaps)
    assert 10 <= len(times) <= 11


def test_viewer_count_once_at_open_then_on_change() -> None:
    """The publisher hears the count when it connects and whenever it changes."""
    core = Core()
    _, early_viewer = core.watch()
    publisher, link = core.publish()
    assert [count for _, count in link.counts] == [1]
    core.clock.advance(1)
    session, _ = core.watch()
    core.clock.advance(1)
    session.close()
    core.clock.advance(1)
    assert [count for _, count in link.counts] == [1, 2, 1]


def test_viewer_counts_are_coalesced_to_four_a_second() -> None:
    """A burst of joins and leaves produces at most 4 counts a second and the last
    count always arrives."""
    core = Core()
    publisher, link = core.publish()
    sessions = []
    for index in range(200):
        sessions.append(core.watch()[0])
        if index % 3 == 2:
            sessions.pop(0).close()
        core.clock.advance(0.01)
    core.clock.advance(1)
    times = [when for when, _ in link.counts]
    for when in times:
        assert sum(1 for other in times if when <= other < when + 1.0) <= 4
    assert link.counts[-1][1] == len(sessions) == len(core.registry.streams["cam"].viewers)


def test_no_count_sent_when_it_did_not_change() -> None:
    """A join and a leave inside the gap cancel out: nothing is sent."""
    core = Core()
    _, link = core.publish()
    core.clock.advance(0.1)
    session, _ = core.watch()
    session.close()
    core.clock.advance(5)
    assert [count for _, count in link.counts] == [0]


# -- publisher lifecycle ----------------------------------------------------------------


def test_viewer_before_publisher_gets_offline_then_live() -> None:
    """Viewers may connect first; they see offline, then live and media."""
    core = Core()
    _, viewer = core.watch()
    publisher, _ = core.publish()
    send(publisher, config_msg(1), key_msg(2))
    assert viewer.received() == [OFFLINE, LIVE, 1, 2]


def test_publisher_leaving_sends_offline_and_forgets_its_stream_state() -> None:
    """When the publisher goes, viewers stay and get offline; a new publisher's viewers
    never see the old CONFIG, meta or GOP."""
    core = Core()
    publisher, _ = core.publish()
    publisher.meta(b'{"type":"meta","v":1}')
    send(publisher, config_msg(1), key_msg(2), delta_msg(3))
    _, viewer = core.watch()
    publisher.close()
    assert viewer.texts()[-1] == OFFLINE
    assert core.registry.streams["cam"].live is False
    _, late = core.watch()
    assert late.received() == [OFFLINE]
    second, _ = core.publish()
    send(second, delta_msg(10), config_msg(11), key_msg(12), delta_msg(13))
    assert viewer.received()[-5:] == [OFFLINE, LIVE, 11, 12, 13]
    assert late.received() == [OFFLINE, LIVE, 11, 12, 13]


def test_takeover_replaces_the_publisher_and_keeps_viewers_and_counters() -> None:
    """A second publisher takes the stream over: the old one is told it was replaced
    and is ignored from then on; viewers stay, get no offline, and continue from the
    new publisher's CONFIG and KEY; the stream's counters continue."""
    core = Core()
    first, first_link = core.publish(peer="127.0.0.1:1111")
    send(first, config_msg(1), key_msg(2), delta_msg(3))
    _, viewer = core.watch()
    stream = core.registry.streams["cam"]
    assert (stream.messages_in, stream.keyframes) == (3, 1)
    second, second_link = core.publish(peer="127.0.0.1:2222")
    assert first_link.replaced_calls == 1
    assert second_link.replaced_calls == 0
    assert not first.current and second.current
    send(first, delta_msg(4), key_msg(5))  # late messages of the replaced publisher
    send(second, delta_msg(20), config_msg(21), key_msg(22), delta_msg(23))
    assert viewer.received() == [LIVE, 1, 2, 3, 21, 22, 23]
    assert OFFLINE not in viewer.texts()
    assert (stream.messages_in, stream.keyframes) == (7, 2)
    assert [count for _, count in second_link.counts] == [1]
    # The replaced publisher's connection ending does not take the stream offline.
    first.close()
    assert stream.live and stream.publisher is second_link
    assert viewer.texts()[-1] == LIVE
    assert core.registry.describe(True)[0]["publisher"]["peer"] == "127.0.0.1:2222"


def test_takeover_never_replays_the_old_gop_to_joiners() -> None:
    """After a takeover a joining viewer waits for the new publisher's KEY."""
    core = Core()
    first, _ = core.publish()
    send(first, config_msg(1), key_msg(2), delta_msg(3))
    second, _ = core.publish()
    _, viewer = core.watch()
    assert viewer.media() == []
    send(second, config_msg(10), key_msg(11))
    assert viewer.media() == [10, 11]


def test_no_takeover_refuses_a_second_publisher_with_409() -> None:
    """With --no-takeover a live stream refuses another publisher (409), and accepts
    one again once the first has left."""
    core = Core(takeover=False)
    first, link = core.publish()
    refusal = core.registry.check_publisher("cam")
    assert isinstance(refusal, Refusal) and refusal.status == 409
    refused = core.registry.publish("cam", FakePublisher())
    assert isinstance(refused, Refusal) and refused.status == 409
    assert link.replaced_calls == 0
    assert core.registry.check_publisher("other") is None
    first.close()
    assert core.registry.check_publisher("cam") is None


def test_takeover_is_allowed_by_default() -> None:
    """Without --no-takeover check_publisher accepts a second publisher."""
    core = Core()
    core.publish()
    assert core.registry.check_publisher("cam") is None


# -- limits ----------------------------------------------------------------------------


def test_max_streams_refuses_new_publishers_with_503() -> None:
    """Over --max-streams a publisher of another stream is refused (503 + Retry-After);
    only streams with a publisher count: taking over a live stream, publishing to a name
    viewers wait for once a slot is free, and viewers of any name are still fine."""
    core = Core(max_streams=2)
    core.publish("a")
    core.watch("b")
    assert core.registry.check_publisher("b") is None  # viewers hold no slot
    core.publish("b")
    for name in ("c", "d"):
        refusal = core.registry.check_publisher(name)
        assert isinstance(refusal, Refusal)
        assert refusal.status == 503 and refusal.retry_after
        assert refusal.reason == "stream limit reached"
    assert isinstance(core.registry.publish("c", FakePublisher()), Refusal)
    assert core.registry.check_publisher("a") is None  # a takeover is not a new stream
    core.publish("a")
    assert core.registry.check_viewer("c") is None
    core.watch("c")
    assert sorted(core.registry.streams) == ["a", "b", "c"]
    assert core.registry.publisher_count == 2


def test_viewers_of_many_invented_names_never_lock_publishers_out() -> None:
    """The issue-8 scenario in the core: 1,000 viewers, 100 from each of 10 addresses,
    each on its own invented name, with the limits at their defaults.  The waiting names
    are bounded on their own (per address and in total) and a publisher of a new name is
    accepted whatever they hold."""
    core = Core()
    accepted: list[ViewerSession] = []
    refusals: dict[str, int] = {}
    for host in range(2, 12):
        address = f"127.0.0.{host}"
        for index in range(100):
            result = core.registry.watch(f"invented-{host}-{index}", FakeViewer(), address)
            if isinstance(result, Refusal):
                assert result.status == 503 and result.retry_after
                refusals[result.reason] = refusals.get(result.reason, 0) + 1
            else:
                accepted.append(result)
    per_address = core.config.max_waiting_streams_per_ip
    assert len(accepted) == 10 * per_address
    assert refusals == {"too many waiting streams from this address": 1000 - 10 * per_address}
    for name in ("new-stream", "another"):
        assert core.registry.check_publisher(name) is None
        core.publish(name)
    # A waiting name turns into a stream when its publisher comes.
    core.publish(accepted[0].stream.name)
    assert core.registry.waiting.total == len(accepted) - 1


def test_waiting_streams_have_their_own_total_bound() -> None:
    """Over --max-waiting-streams a viewer of another unpublished name gets 503; viewers
    of names that already wait, and of live streams, are still welcome, and the bound
    frees up as waiting names get a publisher or lose their viewers."""
    core = Core(max_waiting_streams=3, max_waiting_streams_per_ip=100)
    sessions = [core.watch(name)[0] for name in ("w1", "w2", "w3")]
    core.publish("live")
    refusal = core.registry.check_viewer("w4", "10.0.0.1")
    assert isinstance(refusal, Refusal) and refusal.status == 503 and refusal.retry_after
    assert refusal.reason == "too many streams waiting for a publisher"
    assert isinstance(core.registry.watch("w4", FakeViewer()), Refusal)
    core.watch("w1")  # already waiting: no new name
    core.watch("live")
    assert core.registry.check_publisher("w4") is None
    core.publish("w2")  # w2 stops waiting
    core.watch("w4")
    assert core.registry.check_viewer("w5") is not None
    sessions[2].close()  # the last viewer of w3 leaves: w3 is forgotten
    assert "w3" not in core.registry.streams
    core.watch("w5")
    assert core.registry.waiting.total == 3


def test_waiting_streams_are_bounded_per_address() -> None:
    """One address's viewers hold at most --max-waiting-streams-per-ip waiting names;
    more viewers of a name it already holds, other addresses, and published names are
    not affected."""
    core = Core(max_waiting_streams_per_ip=2)
    first = core.registry.watch("a", FakeViewer(), "10.0.0.1")
    assert isinstance(first, ViewerSession)
    assert isinstance(core.registry.watch("b", FakeViewer(), "10.0.0.1"), ViewerSession)
    refusal = core.registry.watch("c", FakeViewer(), "10.0.0.1")
    assert isinstance(refusal, Refusal) and refusal.status == 503
    assert refusal.reason == "too many waiting streams from this address"
    assert isinstance(core.registry.watch("a", FakeViewer(), "10.0.0.1"), ViewerSession)
    assert isinstance(core.registry.watch("c", FakeViewer(), "10.0.0.2"), ViewerSession)
    # Another address's name: joining it would make this address hold a third one.
    assert isinstance(core.registry.watch("c", FakeViewer(), "10.0.0.1"), Refusal)
    core.publish("c")
    assert isinstance(core.registry.watch("c", FakeViewer(), "10.0.0.1"), ViewerSession)
    first.close()  # another viewer from 10.0.0.1 still waits on "a"
    assert isinstance(core.registry.watch("d", FakeViewer(), "10.0.0.1"), Refusal)
    core.publish("a")  # "a" is a stream now: 10.0.0.1 holds one waiting name
    assert isinstance(core.registry.watch("d", FakeViewer(), "10.0.0.1"), ViewerSession)
    assert core.registry.waiting.held_by("10.0.0.1") == 2


def test_viewers_may_still_connect_before_the_publisher() -> None:
    """A waiting viewer gets ``offline``, then ``live`` and the media when the
    publisher comes, and stays across a publisher restart."""
    core = Core()
    session = core.registry.watch("cam", FakeViewer(), "10.0.0.1")
    assert isinstance(session, ViewerSession)
    sink = session._sink
    assert isinstance(sink, FakeViewer)
    publisher, _ = core.publish("cam")
    send(publisher, config_msg(1), key_msg(2))
    publisher.close()
    assert "cam" in core.registry.streams
    assert not core.registry.waiting.is_waiting("cam")
    again, _ = core.publish("cam")
    send(again, config_msg(3), key_msg(4))
    assert sink.received() == [OFFLINE, LIVE, 1, 2, OFFLINE, LIVE, 3, 4]


def test_waiting_bookkeeping_returns_to_idle() -> None:
    """After waiting viewers come, get a publisher, leave, in any order, no waiting name
    or address is left behind and the live count matches."""
    core = Core(max_waiting_streams_per_ip=5)
    sessions = [
        core.registry.watch(f"n{index % 7}", FakeViewer(), f"10.0.0.{index % 3}")
        for index in range(30)
    ]
    viewers = [s for s in sessions if isinstance(s, ViewerSession)]
    publisher, _ = core.publish("n3")
    for viewer in viewers[::2]:
        viewer.close()
    publisher.close()
    for viewer in viewers[1::2]:
        viewer.close()
    assert core.registry.streams == {}
    assert core.registry.waiting.total == 0
    assert core.registry.waiting.tracked_addresses == 0
    assert core.registry.live_streams == core.registry.publisher_count == 0


def test_max_viewers_per_stream_refuses_with_503() -> None:
    """Over --max-viewers-per-stream more viewers get 503; others streams are fine."""
    core = Core(max_viewers_per_stream=2)
    core.publish()
    first, _ = core.watch()
    core.watch()
    refusal = core.registry.check_viewer("cam")
    assert isinstance(refusal, Refusal) and refusal.status == 503 and refusal.retry_after
    assert isinstance(core.registry.watch("cam", FakeViewer()), Refusal)
    assert core.registry.check_viewer("other") is None
    first.close()
    assert core.registry.check_viewer("cam") is None


def test_zero_max_viewers_means_no_limit() -> None:
    """--max-viewers-per-stream 0 is unlimited."""
    core = Core(max_viewers_per_stream=0)
    for _ in range(50):
        core.watch()
    assert core.registry.check_viewer("cam") is None


# -- leaks -------------------------------------------------------------------------------


def test_registry_returns_to_empty_after_everyone_leaves() -> None:
    """After any mix of joins, media, takeovers and leaves: no stream, no buffered
    bytes, no timer."""
    core = Core(viewer_queue_bytes=300)
    viewers = [core.watch(name) for name in ("a", "a", "b")]
    first, _ = core.publish("a")
    send(first, config_msg(1), key_msg(2, 500), delta_msg(3))
    viewers[0][0].queue.pause_producing()
    send(first, delta_msg(4), delta_msg(5), delta_msg(6), delta_msg(7))
    second, _ = core.publish("a")
    send(second, config_msg(8), key_msg(9))
    third, _ = core.publish("c")
    send(third, key_msg(10))
    viewers[1][0].request_keyframe()
    assert core.registry.budget.total > 0
    for session, _ in viewers:
        session.close()
    first.close()
    second.close()
    third.close()
    third.close()
    assert core.registry.streams == {}
    assert core.registry.budget.total == 0
    assert core.registry.describe(True) == []
    assert core.registry.publisher_count == 0
    assert core.registry.viewer_count == 0
    core.clock.advance(100)
    assert core.clock.getDelayedCalls() == []


def test_viewer_leaving_a_live_stream_keeps_the_stream() -> None:
    """The stream stays while its publisher does."""
    core = Core()
    core.publish()
    session, _ = core.watch()
    session.close()
    session.close()
    assert list(core.registry.streams) == ["cam"]
    assert core.registry.viewer_count == 0


# -- the global bound ------------------------------------------------------------------


def test_global_bound_sheds_the_slowest_viewer_not_the_others() -> None:
    """When buffered bytes reach --max-buffered-bytes the largest backlog is put into
    skipping; a viewer that keeps up is not touched."""
    core = Core(max_buffered_bytes=5000, viewer_queue_bytes=100_000, gop_cache_bytes=1000)
    publisher, link = core.publish()
    send(publisher, config_msg(1), key_msg(2))
    slow_session, slow = core.watch()
    _, fast = core.watch()
    slow_session.queue.pause_producing()
    for tag in range(3, 60):
        send(publisher, delta_msg(tag))
    assert slow_session.queue.skip_episodes >= 1
    assert core.registry.budget.total < 5000
    assert fast.media() == [1, 2, *range(3, 60)]
    slow_session.queue.resume_producing()
    send(publisher, key_msg(100))
    assert slow.texts()[-1]["type"] == "dropped"
    assert slow.media()[-1] == 100
    assert core.registry.streams["cam"].dropped == slow_session.queue.dropped_total > 0


# -- describe -----------------------------------------------------------------------------


def test_describe_reports_the_documented_fields() -> None:
    """``/api/streams`` entries carry name, live, viewers, publisher {peer, since},
    messages_in, bytes_in, keyframes, dropped, bitrate_bps and fps."""
    core = Core()
    _, _ = core.watch("idle-viewer")
    publisher, _ = core.publish("cam", peer="127.0.0.1:5555")
    core.watch("cam")
    send(publisher, config_msg(1, 40), key_msg(2, 1000), delta_msg(3, 500))
    entries = core.registry.describe(show_peers=True)
    assert [entry["name"] for entry in entries] == ["cam", "idle-viewer"]
    cam = entries[0]
    assert set(cam) == {
        "name", "live", "state", "viewers", "publisher", "messages_in", "bytes_in", "keyframes",
        "dropped", "bitrate_bps", "fps",
        "thumbnail", "viewer_reports", "renditions", "adaptive_viewers",
    }
    assert cam["renditions"] is None and cam["adaptive_viewers"] == 0
    assert cam["live"] is True
    assert cam["viewers"] == 1
    assert cam["publisher"] == {"peer": "127.0.0.1:5555", "since": "2023-11-14T22:13:20Z"}
    assert (cam["messages_in"], cam["bytes_in"], cam["keyframes"], cam["dropped"]) == (
        3, 1540, 1, 0
    )
    idle = entries[1]
    assert idle["live"] is False and idle["publisher"] is None and idle["viewers"] == 1
    assert core.registry.describe(show_peers=False)[0]["publisher"]["peer"] is None
    json.dumps(entries)


def test_bitrate_and_fps_over_the_last_five_seconds() -> None:
    """bitrate_bps and fps describe the last 5 s: CONFIG messages add bytes, not
    frames; a publisher that stops decays to 0."""
    core = Core()
    publisher, _ = core.publish()
    for second in range(10):
        send(publisher, config_msg(second, 1000))
        for _frame in range(25):
            send(publisher, delta_msg(1, 1000))
            core.clock.advance(1 / 25)
        del second
    stream = core.registry.streams["cam"]
    bitrate, fps = stream.rate.rates()
    assert 24 <= fps <= 26
    assert 26 * 1000 * 8 * 0.95 <= bitrate <= 26 * 1000 * 8 * 1.05
    core.clock.advance(5.1)
    assert stream.rate.rates() == (0, 0.0)


@pytest.mark.parametrize("phase", [0.0, 0.04, 0.26, 0.48])
def test_fps_is_accurate_whatever_the_phase(phase: float) -> None:
    """A steady 30 fps stream reads 30 fps (within 3%), whenever /api/streams asks."""
    core = Core()
    publisher, _ = core.publish()
    core.clock.advance(phase)
    for _frame in range(300):
        send(publisher, delta_msg(1, 1000))
        core.clock.advance(1 / 30)
    readings = []
    for _ in range(30):
        send(publisher, delta_msg(1, 1000))
        core.clock.advance(1 / 30)
        readings.append(core.registry.describe(True)[0]["fps"])
    assert all(29.1 <= fps <= 30.9 for fps in readings), readings


def test_fps_of_a_new_publisher_is_not_diluted() -> None:
    """During its first seconds a publisher's rate is measured over the time it has
    been sending, not over the full window."""
    core = Core()
    publisher, _ = core.publish()
    for _frame in range(30):
        send(publisher, delta_msg(1, 1000))
        core.clock.advance(1 / 30)
    fps = core.registry.describe(True)[0]["fps"]
    assert 27 <= fps <= 33


# -- keyframe needs around a publisher change -----------------------------------------------


def test_new_publisher_with_waiting_viewers_is_asked_for_a_keyframe() -> None:
    """Viewers that wait for a KEY when a publisher (re)connects are a need the cache
    cannot meet: the new publisher gets a keyframe request."""
    core = Core()
    first, _ = core.publish()
    send(first, config_msg(1), key_msg(2))
    core.watch()
    _second, link = core.publish()
    assert len(link.keyframe_requests) == 1


def test_slow_viewer_after_takeover_gets_a_keyframe_request_when_it_drains() -> None:
    """A slow viewer whose queue cannot take the new publisher's first KEY asks for one
    as soon as its transport drains."""
    # Room for eight 100-byte messages (each is charged its bytes plus the overhead).
    core = Core(viewer_queue_bytes=1000 + 8 * MESSAGE_OVERHEAD_BYTES)
    first, _ = core.publish()
    send(first, config_msg(1), key_msg(2))
    session, _viewer = core.watch()
    session.queue.pause_producing()
    send(first, *[delta_msg(tag) for tag in range(3, 11)])  # 800 bytes waiting
    assert not session.queue.skipping
    second, link = core.publish()
    send(second, config_msg(20), key_msg(21, 400))  # no room for this KEY
    assert session.queue.skipping
    session.queue.resume_producing()
    core.clock.advance(core.config.keyframe_request_interval)
    assert link.keyframe_requests


@dataclass(eq=False)
class SmallPipeViewer(FakeViewer):
    """A viewer whose transport pauses its producer once ``capacity`` bytes are written
    (as Twisted's does past its high-water mark) and never drains."""

    capacity: int = 1000
    written_bytes: int = 0
    queue: Any = None

    def attached(self, queue: Any) -> None:
        self.queue = queue

    def write_frame(self, frame: tuple[bool, bytes]) -> None:
        super().write_frame(frame)
        self.written_bytes += len(frame[1])
        if self.written_bytes >= self.capacity and not self.queue.paused:
            self.queue.pause_producing()


def test_the_join_burst_is_subject_to_backpressure() -> None:
    """A viewer joining a stream with a large cached GOP gets it through its queue: once
    its transport pauses, the rest waits in the bounded queue (counted in the global
    budget) or is dropped to the next KEY, never all pushed into the transport."""
    world = Core(viewer_queue_bytes=100_000, gop_cache_bytes=1_000_000)
    publisher, _ = world.publish()
    deltas = [delta_msg(tag, 1_000) for tag in range(3, 300)]
    send(publisher, config_msg(1), key_msg(2, 1_000), *deltas)
    sink = SmallPipeViewer(capacity=2_000)
    world.registry.watch("cam", sink)
    assert sink.written_bytes < 4_000, "the transport got more than its high-water mark"
    assert sink.queue.backlog_bytes <= 100_000 + 1_100
    assert world.registry.budget.total >= sink.queue.backlog_bytes
    assert sink.queue.skipping, "a GOP larger than the viewer's bound starts a drop episode"


def test_gop_cache_message_cap_applies_to_streams() -> None:
    """--gop-cache-messages: a stream's cache of tiny messages empties at the cap, so a
    late joiner gets no stale deltas and the budget holds no more than the cap's worth."""
    core = Core(gop_cache_messages=50)
    publisher, _ = core.publish()
    send(publisher, config_msg(1), key_msg(2, 9))
    send(publisher, *[delta_msg(tag, 9) for tag in range(3, 52)])
    assert core.registry.streams["cam"].gop.message_count == 50
    assert core.registry.budget.total == 40 + 50 * 9 + 51 * MESSAGE_OVERHEAD_BYTES
    send(publisher, delta_msg(52, 9))
    assert core.registry.streams["cam"].gop.message_count == 0
    _, viewer = core.watch()
    assert viewer.media() == []
    send(publisher, key_msg(53, 9))
    assert viewer.media() == [1, 53]


class BrokenPuller:
    """A puller whose ``want`` raises (a bug, a bad locator)."""

    def __init__(self) -> None:
        self.released: list[str] = []

    def check(self, name: str) -> Refusal | None:
        return None

    def want(self, name: str) -> None:
        raise RuntimeError("no pull")

    def release(self, name: str) -> None:
        self.released.append(name)

    def stop(self, name: str) -> None:
        pass

    def describe(self, name: str) -> dict[str, Any] | None:
        return None


def test_a_puller_that_raises_leaves_no_viewer_attached() -> None:
    """If starting the pull raises, the viewer (or edge) is refused and detached, the
    stream forgotten, and the failure logged; nothing escapes to the reactor."""
    core = Core()
    puller = BrokenPuller()
    core.registry.puller = puller
    with captured_log() as log:
        result = core.registry.watch("cam", FakeViewer(), "10.0.0.1")
        relayed = core.registry.relay("cam", FakeViewer())
    assert isinstance(result, Refusal) and result.status == 503
    assert isinstance(relayed, Refusal)
    assert core.registry.streams == {} and core.registry.viewer_count == 0
    assert not core.registry.waiting.is_waiting("cam")
    assert puller.released == ["cam", "cam"]
    assert sum("log_failure" in event for event in log.events) == 2
