"""The relay's side of publishing on demand, through the real protocol on a Clock: the
``publisher-state`` message, the "available" stream, the status viewers get, the idle
timeout that spares an idle publisher but not a silent one, and the immediate viewer
count and keyframe request for the first viewer of an idle stream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, encode_media
from tests.fakes import HOST, Peer, Relay
from tests.support.frames import OP_PONG, binary_frame, client_frame, text_frame

# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


def media(flags: int, tag: int) -> bytes:
    return encode_media(flags, tag, bytes([tag % 256]) * 20)


def state(peer: Peer, value: str) -> None:
    peer.send(text_frame({"type": "publisher-state", "state": value}))


def texts(peer: Peer) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in peer.messages(("text",))]


def entry(relay: Relay, name: str = "cam") -> dict[str, Any]:
    [found] = [e for e in relay.context.registry.describe(True) if e["name"] == name]
    return found


def streaming_publisher(relay: Relay) -> Peer:
    """A publisher that has sent a CONFIG and a GOP (KEY + two deltas)."""
    publisher = relay.publisher()
    publisher.send(
        binary_frame(media(FLAG_CONFIG, 1))
        + binary_frame(media(FLAG_KEY, 2))
        + binary_frame(media(0, 3))
        + binary_frame(media(0, 4))
    )
    return publisher


IDLE_STATUS = {"type": "status", "state": "live", "publisher": "idle"}


def woken_by(viewer: Peer, publisher: Peer) -> None:
    """A viewer joining an idle stream gets only the status (no minutes-old pictures);
    the publisher is told of it and asked for a KEY, goes active and sends CONFIG (tag
    10) and a KEY (tag 11)."""
    assert [m.json for m in viewer.messages()] == [IDLE_STATUS]
    to_publisher = texts(publisher)
    assert {"type": "viewers", "count": 1} in to_publisher
    assert {"type": "keyframe-request"} in to_publisher
    state(publisher, "active")
    publisher.send(binary_frame(media(FLAG_CONFIG, 10)) + binary_frame(media(FLAG_KEY, 11)))
LIVE_STATUS = {"type": "status", "state": "live"}


def test_an_idle_publisher_makes_the_stream_available_and_a_viewer_wakes_it() -> None:
    """After ``idle`` the stream is "available" (still ``live: true`` for v1 readers) and
    its stale GOP is gone (the CONFIG kept); the first viewer gets the idle status, the
    publisher hears the count and a keyframe request at once; once it is active again the
    viewer gets the plain live status, then CONFIG and KEY first, nothing stale."""
    relay = Relay.with_options(ping_interval=100, ping_timeout=100)
    publisher = streaming_publisher(relay)
    assert entry(relay)["state"] == "live"
    publisher.messages()
    state(publisher, "idle")
    described = entry(relay)
    assert (described["state"], described["live"]) == ("available", True)
    stream = relay.context.registry.streams["cam"]
    assert not stream.gop.has_keyframe and stream.gop.config is not None
    assert stream.gop.discarded == 0  # nothing was lost: the publisher chose to idle
    assert relay.context.registry.available_count == 1

    viewer = relay.viewer()
    woken_by(viewer, publisher)
    publisher.send(binary_frame(media(0, 12)))
    assert [m.json if m.kind == "text" else m.payload for m in viewer.messages()] == [
        LIVE_STATUS, media(FLAG_CONFIG, 10), media(FLAG_KEY, 11), media(0, 12)
    ]
    assert entry(relay)["state"] == "live"
    assert relay.context.registry.available_count == 0


def test_the_first_viewer_of_an_idle_stream_is_counted_without_coalescing() -> None:
    """Viewer counts are coalesced to one per 0.25 s; the count that wakes an idle
    publisher is not held back: it goes out at the join, even right after another."""
    relay = Relay.with_options(ping_interval=100, ping_timeout=100)
    publisher = streaming_publisher(relay)
    first = relay.viewer()
    first.lose()
    relay.clock.advance(0.3)
    state(publisher, "idle")
    publisher.messages()
    relay.viewer()
    assert {"type": "viewers", "count": 1} in texts(publisher)
    # The same join on a stream that is live waits for the end of the interval.
    state(publisher, "active")
    other = relay.viewer()
    assert texts(publisher) == []
    relay.clock.advance(0.25)
    assert texts(publisher) == [{"type": "viewers", "count": 2}]
    other.lose()


def test_an_idle_publisher_outlives_the_idle_timeout_but_not_silence() -> None:
    """--publisher-idle-timeout spares a publisher that said ``idle`` (no media is the
    point) and applies again in full from when it turns ``active``; pings still bound
    an idle publisher that stops answering."""
    relay = Relay.with_options(publisher_idle_timeout=20, ping_interval=10, ping_timeout=10)
    publisher = streaming_publisher(relay)
    state(publisher, "idle")
    for _ in range(20):  # 200 s idle, answering every ping
        relay.tick(10)
        for ping in publisher.messages(("ping",)):
            publisher.send(pong(ping.payload))
    assert publisher.close_codes() == [] and not publisher.aborted
    state(publisher, "active")
    relay.tick(9)
    for ping in publisher.messages(("ping",)):
        publisher.send(pong(ping.payload))
    relay.tick(10)
    for ping in publisher.messages(("ping",)):
        publisher.send(pong(ping.payload))
    assert publisher.close_codes() == []
    relay.tick(1.2)
    assert publisher.close_codes() == [1008]

    silent = relay.publisher("quiet")
    state(silent, "idle")
    relay.tick(25)  # never answers a ping: aborted within interval + timeout
    assert silent.aborted
    relay.settle()


def pong(payload: bytes) -> bytes:
    return client_frame(OP_PONG, payload)


def test_media_from_an_idle_publisher_means_active_and_unknown_states_are_ignored() -> None:
    """A state this relay does not know (a later version's) changes nothing; a frame
    (not a CONFIG) after ``idle`` makes the stream live again; a publisher that leaves while idle
    leaves an offline stream, and the next one starts live."""
    relay = Relay.with_options(ping_interval=100, ping_timeout=100)
    publisher = streaming_publisher(relay)
    viewer = relay.viewer()
    viewer.messages()
    state(publisher, "sleeping")
    publisher.send(text_frame({"type": "publisher-state", "state": 3}))
    assert entry(relay)["state"] == "live" and texts(viewer) == []
    state(publisher, "idle")
    assert texts(viewer) == [IDLE_STATUS]
    publisher.send(binary_frame(media(FLAG_CONFIG, 19)))  # a CONFIG alone is no frame
    assert entry(relay)["state"] == "available"
    publisher.send(binary_frame(media(FLAG_KEY, 20)))
    assert entry(relay)["state"] == "live"
    assert texts(viewer) == [LIVE_STATUS]
    state(publisher, "idle")
    publisher.lose()
    assert texts(viewer)[-1] == {"type": "status", "state": "offline"}
    assert entry(relay)["state"] == "offline"
    relay.publisher()
    assert texts(viewer) == [LIVE_STATUS]
    assert entry(relay)["state"] == "live"


def test_metrics_count_available_streams() -> None:
    """``streamrelay_streams_available`` counts the streams of idle publishers (which
    ``streamrelay_streams{state="live"}`` still counts as live)."""
    relay = Relay.with_options(ping_interval=100, ping_timeout=100)
    streaming_publisher(relay)
    idle = relay.publisher("idle-cam")
    state(idle, "idle")
    response = relay.connect().request("GET", "/metrics", {"Host": HOST})
    assert response.status == 200
    lines = response.body.decode().splitlines()
    assert "streamrelay_streams_available 1.0" in lines
    assert 'streamrelay_streams{state="live"} 2.0' in lines


def test_a_flood_of_state_flips_sends_viewers_a_bounded_number_of_statuses() -> None:
    """Each flip that takes effect sheds the GOP and sends every viewer a status: a
    publisher flipping idle/active as fast as its inbound budget lets it (about 1,000
    flips a second for 5 s) costs each viewer at most one status per second, the publisher stays
    connected, and the stream ends in the publisher's last word."""
    from streamrelay.streams import PUBLISHER_STATE_MIN_GAP

    relay = Relay.with_options(ping_interval=100, ping_timeout=100)
    publisher = streaming_publisher(relay)
    viewers = [relay.viewer() for _ in range(3)]
    for viewer in viewers:
        viewer.messages()
    per_turn = 99
    seconds = 5
    flips = 0
    for _ in range(seconds * 10):
        batch = []
        for _ in range(per_turn):
            flips += 1
            batch.append(text_frame({"type": "publisher-state",
                                     "state": "idle" if flips % 2 else "active"}))  # fmt: skip
        publisher.send(b"".join(batch))
        relay.clock.advance(0.1)
    state(publisher, "idle")
    relay.clock.advance(PUBLISHER_STATE_MIN_GAP)
    bound = seconds / PUBLISHER_STATE_MIN_GAP + 2
    for viewer in viewers:
        statuses = [m for m in texts(viewer) if m["type"] == "status"]
        assert 1 <= len(statuses) <= bound, len(statuses)
        assert statuses[-1] == IDLE_STATUS
    assert publisher.close_codes() == [] and not publisher.aborted
    assert entry(relay)["state"] == "available"
    # The publisher's connection (the stream's PublisherLink) holds its session.
    session = getattr(relay.context.registry.streams["cam"].publisher, "session", None)
    assert session is not None
    assert session.state_messages == flips + 1
    assert session.state_changes <= bound


def test_a_flip_inside_the_gap_waits_for_its_end_and_a_frame_overrides_it() -> None:
    """A flip within the gap after another takes effect at its end (not lost); a frame
    sent after an ``idle`` still waiting keeps the stream live (the frame is newer); the
    ``active`` a publisher repeats on connecting costs no turn."""
    from streamrelay.streams import PUBLISHER_STATE_MIN_GAP

    relay = Relay.with_options(ping_interval=100, ping_timeout=100)
    publisher = streaming_publisher(relay)
    viewer = relay.viewer()
    viewer.messages()
    state(publisher, "active")  # no change: no status, no turn used
    state(publisher, "idle")
    assert texts(viewer) == [IDLE_STATUS]
    state(publisher, "active")
    assert texts(viewer) == [] and entry(relay)["state"] == "available"
    relay.clock.advance(PUBLISHER_STATE_MIN_GAP)
    assert texts(viewer) == [LIVE_STATUS] and entry(relay)["state"] == "live"
    state(publisher, "idle")
    publisher.send(binary_frame(media(FLAG_KEY, 30)))
    relay.clock.advance(PUBLISHER_STATE_MIN_GAP)
    assert entry(relay)["state"] == "live"
    assert [m for m in texts(viewer) if m["type"] == "status"] == []


# -- on demand through an edge ---------------------------------------------------------------


def test_an_edge_learns_its_origins_publisher_idles_and_drops_its_stale_gop() -> None:
    """An edge still pulling (in its grace) when the origin's publisher idles: the edge's
    stream turns available and lets its GOP go as the origin's did; a viewer joining the
    edge gets the idle status and no stale media, the origin's publisher hears the count
    and a keyframe request at once, and the fresh CONFIG and KEY follow its wake."""
    from tests.support.relay_links import Network
    from tests.test_upstream import ORIGIN, seen

    net = Network()
    origin = net.relay(ORIGIN, ping_interval=100, ping_timeout=100)
    publisher = streaming_publisher(origin)
    edge, _manager = net.edge("edge:8080", ORIGIN, upstream_grace=60, ping_interval=100,
                              ping_timeout=100)  # fmt: skip
    first = edge.viewer("cam")
    net.flush()
    assert seen(first)[-5:] == ["live", "C1", "K2", "d3", "d4"]
    first.lose()
    net.flush()
    assert entry(edge)["upstream"]["grace"] is True
    net.tick(5)  # the origin heard 0; the keyframe requests of the cold start are old
    state(publisher, "idle")
    net.flush()
    described = entry(edge)
    assert (described["state"], described["live"]) == ("available", True)
    assert described["upstream"]["publisher_idle"] is True
    cached = edge.context.registry.streams["cam"].gop
    assert not cached.has_keyframe and cached.discarded == 0
    publisher.messages()

    joining = edge.viewer("cam")
    net.flush()
    woken_by(joining, publisher)
    net.flush()
    assert seen(joining) == ["live", "C10", "K11"]
    assert entry(edge)["state"] == "live"


def test_a_cold_pull_of_an_idle_stream_is_available_at_once() -> None:
    """An edge that starts pulling a stream whose publisher idles upstream shows it
    available from the first status (never a plain live first) and its viewer gets the
    idle status, then the wake's CONFIG and KEY."""
    from tests.support.relay_links import Network
    from tests.test_upstream import ORIGIN, seen

    net = Network()
    origin = net.relay(ORIGIN, ping_interval=100, ping_timeout=100)
    publisher = streaming_publisher(origin)
    state(publisher, "idle")
    edge, _manager = net.edge("edge:8080", ORIGIN, ping_interval=100, ping_timeout=100)
    viewer = edge.viewer("cam")
    net.flush()
    statuses = [m.json for m in viewer.messages(("text",)) if m.json["type"] == "status"]
    assert statuses[-1] == IDLE_STATUS
    assert {"type": "status", "state": "live"} not in statuses
    assert entry(edge)["state"] == "available"
    state(publisher, "active")
    publisher.send(binary_frame(media(FLAG_CONFIG, 10)) + binary_frame(media(FLAG_KEY, 11)))
    net.flush()
    assert seen(viewer) == ["live", "C10", "K11"]
