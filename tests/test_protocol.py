"""Publisher and viewer WebSockets end to end through the real Site, RelayChannel,
StreamGate and Autobahn protocols, on StringTransports and a Clock (no sockets)."""

from __future__ import annotations

import json

import pytest

from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, encode_media
from tests.fakes import HOST, Peer, Relay
from tests.support.frames import (
    OP_BINARY,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    binary_frame,
    client_frame,
    close_frame,
    text_frame,
)
from tests.support.http import request_head, upgrade_headers

# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


def media(flags: int, tag: int, payload: bytes = b"") -> bytes:
    return encode_media(flags, tag, payload or bytes([tag % 256]) * 20)


def close_code(peer: Peer) -> int | None:
    """The code of the one close frame the relay sent (fails if there is none)."""
    codes = peer.close_codes()
    assert len(codes) == 1, codes
    return codes[0]


def binaries(peer: Peer) -> list[bytes]:
    return [m.payload for m in peer.messages(("binary",))]


# -- the opening handshake ------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "selected"),
    [
        ("streamrelay.v1", "streamrelay.v1"),
        ("chat, streamrelay.v1", "streamrelay.v1"),
        (None, None),
        ("streamrelay.v2", None),
    ],
)
@pytest.mark.parametrize("role", ["publish", "watch"])
def test_subprotocol_selected_when_offered(
    role: str, offered: str | None, selected: str | None
) -> None:
    """101 with Sec-WebSocket-Protocol: streamrelay.v1 when the client offers it; no
    subprotocol (still v1) when it offers none or only others."""
    relay = Relay()
    peer = relay.connect()
    response = peer.upgrade(f"/{role}/cam", subprotocol=offered)
    assert response.status == 101
    assert response.header("sec-websocket-protocol") == selected
    assert response.header("sec-websocket-extensions") is None
    assert peer.protocol is not None


def test_http_channel_producer_is_replaced_after_the_upgrade() -> None:
    """After the upgrade twisted.web's channel no longer pauses the transport: each
    WebSocket registers its own push producer, and a full write buffer towards a
    publisher never pauses reading from it (IOCP can reorder data around such pauses)."""
    relay = Relay()
    viewer = relay.viewer()
    publisher = relay.publisher()
    for connection in (viewer, publisher):
        assert connection.transport.producer is not None
        assert connection.transport.producer is not connection.channel
        assert connection.transport.streaming is True
    publisher.producer.pauseProducing()
    assert publisher.transport.producerState == "producing"


def test_frames_sent_with_the_handshake_are_not_lost() -> None:
    """Bytes that arrive in the same segment as the request head reach the WebSocket."""
    relay = Relay()
    viewer = relay.viewer()
    publisher = relay.connect()
    publisher.send(
        request_head("GET", "/publish/cam", upgrade_headers(host=HOST))
        + binary_frame(media(FLAG_KEY, 1))
    )
    assert publisher.response().status == 101
    assert binaries(viewer) == [media(FLAG_KEY, 1)]


# -- publisher -> viewers ---------------------------------------------------------------


def test_publisher_media_reaches_viewers_byte_for_byte_in_order() -> None:
    """Every binary message arrives at every viewer unchanged and in order; fan-out
    frames each message once."""
    relay = Relay()
    publisher = relay.publisher()
    viewers = [relay.viewer() for _ in range(3)]
    sent = [media(FLAG_CONFIG, 1), media(FLAG_KEY, 2)] + [
        encode_media(0, tag, bytes(range(256)) * 3) for tag in range(3, 40)
    ]
    for message in sent:
        publisher.send(binary_frame(message))
    for viewer in viewers:
        assert binaries(viewer) == sent


def test_message_observers_still_hear_every_message() -> None:
    """The relay skips Autobahn's per-message ``message`` signal only while nobody
    listens: a listener registered on a publisher's protocol hears every message, and
    the viewers get them all the same."""
    relay = Relay()
    publisher = relay.publisher()
    viewer = relay.viewer()
    heard: list[tuple[bytes, bool]] = []
    publisher.protocol.on("message", lambda payload, is_binary: heard.append((payload, is_binary)))
    sent = [media(FLAG_CONFIG, 1), media(FLAG_KEY, 2), media(0, 3)]
    for message in sent:
        publisher.send(binary_frame(message))
    assert heard == [(message, True) for message in sent]
    assert binaries(viewer) == sent


def test_viewer_starts_with_status_then_config_and_key() -> None:
    """A late joiner gets status live, the meta, CONFIG and the cached GOP at once."""
    relay = Relay()
    publisher = relay.publisher()
    publisher.send(text_frame({"type": "meta", "codec": "h264", "width": 320}))
    for message in (media(FLAG_CONFIG, 1), media(FLAG_KEY, 2), media(0, 3)):
        publisher.send(binary_frame(message))
    viewer = relay.viewer()
    kinds = viewer.messages()
    assert [m.kind for m in kinds] == ["text", "text", "binary", "binary", "binary"]
    assert kinds[0].json == {"type": "status", "state": "live"}
    assert kinds[1].json == {"type": "meta", "codec": "h264", "width": 320}
    assert [m.payload for m in kinds[2:]] == [
        media(FLAG_CONFIG, 1), media(FLAG_KEY, 2), media(0, 3)
    ]


def test_publisher_hears_viewer_counts_and_keyframe_requests() -> None:
    """The publisher gets ``viewers`` at open and on change, and a viewer's own
    ``keyframe-request`` (rate-limited)."""
    relay = Relay()
    publisher = relay.publisher()
    assert publisher.json_messages() == [{"type": "viewers", "count": 0}]
    publisher.send(binary_frame(media(FLAG_KEY, 1)))
    viewer = relay.viewer()
    relay.clock.advance(0.3)
    assert publisher.json_messages() == [{"type": "viewers", "count": 1}]
    viewer.send(text_frame({"type": "keyframe-request"}))
    viewer.send(text_frame({"type": "keyframe-request"}))
    assert publisher.json_messages() == [{"type": "keyframe-request"}]
    relay.clock.advance(relay.config.keyframe_request_interval)
    assert publisher.json_messages() == [{"type": "keyframe-request"}]
    viewer.send(text_frame({"type": "something-else"}))
    viewer.send(text_frame("not json at all"))
    relay.clock.advance(5)
    assert publisher.json_messages() == []
    assert not viewer.closing


def test_meta_is_forwarded_as_sent() -> None:
    """``meta`` reaches viewers byte for byte; other publisher text types are ignored."""
    relay = Relay()
    publisher = relay.publisher()
    viewer = relay.viewer()
    viewer.messages()
    raw = '{"type": "meta", "codec": "h264", "note": "café"}'
    publisher.send(text_frame(raw))
    publisher.send(text_frame({"type": "chat", "x": 1}))
    assert [m.payload for m in viewer.messages()] == [raw.encode()]
    assert not publisher.closing


def test_fragmented_publisher_message_is_reassembled() -> None:
    """A message in several fragments (within the cap) reaches viewers whole."""
    relay = Relay()
    publisher = relay.publisher()
    viewer = relay.viewer()
    message = media(FLAG_KEY, 7, b"abcdefghij" * 10)
    pieces = [message[i : i + 10] for i in range(0, len(message), 10)]
    frames = [client_frame(OP_BINARY, pieces[0], fin=False)]
    frames += [client_frame(OP_CONTINUATION, p, fin=False) for p in pieces[1:-1]]
    frames += [client_frame(OP_CONTINUATION, pieces[-1], fin=True)]
    for frame in frames:
        publisher.send(frame)
    assert binaries(viewer) == [message]


def test_media_split_across_tcp_reads_is_reassembled() -> None:
    """Frames arriving a byte at a time are parsed correctly."""
    relay = Relay()
    publisher = relay.publisher()
    viewer = relay.viewer()
    data = binary_frame(media(FLAG_KEY, 1)) + binary_frame(media(0, 2))
    for index in range(len(data)):
        publisher.send(data[index : index + 1])
    assert binaries(viewer) == [media(FLAG_KEY, 1), media(0, 2)]


# -- close codes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"\x01" * 8,
        bytes([FLAG_KEY | FLAG_CONFIG]) + bytes(8) + b"x",
        bytes([0x80]) + bytes(8) + b"x",
        bytes([0x08]) + bytes(8) + b"x",
        bytes([0x06]) + bytes(8) + b"x",
    ],
)
def test_bad_media_closes_with_1007_and_a_reason(bad: bytes) -> None:
    """A binary message that breaks v1 closes the publisher with 1007 and a reason;
    nothing of it reaches viewers."""
    relay = Relay()
    publisher = relay.publisher()
    viewer = relay.viewer()
    publisher.send(binary_frame(bad))
    [close] = publisher.messages(("close",))
    assert close.close_code == 1007
    assert len(close.payload) > 2
    assert binaries(viewer) == []


def test_oversized_media_closes_with_1009_before_buffering() -> None:
    """A message over --max-message-bytes is refused with 1009 as soon as its frame
    header announces the size, before the payload is buffered."""
    relay = Relay.with_options(max_message_bytes=1000)
    publisher = relay.publisher()
    publisher.send(client_frame(OP_BINARY, b"", claimed_length=2**62))
    assert close_code(publisher) == 1009
    relay2 = Relay.with_options(max_message_bytes=1000)
    publisher2 = relay2.publisher()
    viewer2 = relay2.viewer()
    publisher2.send(binary_frame(media(FLAG_KEY, 1, b"x" * 991)))
    publisher2.send(binary_frame(media(0, 2, b"x" * 992)))
    assert close_code(publisher2) == 1009
    assert binaries(viewer2) == [media(FLAG_KEY, 1, b"x" * 991)]


def test_oversized_message_in_fragments_closes_with_1009() -> None:
    """Fragments adding up to more than the limit: 1009."""
    relay = Relay.with_options(max_message_bytes=1000)
    publisher = relay.publisher()
    publisher.send(client_frame(OP_BINARY, b"\x01" + b"\x00" * 599, fin=False))
    publisher.send(client_frame(OP_CONTINUATION, b"\x00" * 600, fin=True))
    assert close_code(publisher) == 1009


def test_text_that_is_not_a_json_object_closes_with_1007() -> None:
    """Publisher text must be a JSON object."""
    for payload in ("[1, 2]", "hello", '"meta"'):
        relay = Relay()
        publisher = relay.publisher()
        publisher.send(text_frame(payload))
        assert close_code(publisher) == 1007


def test_invalid_utf8_text_closes_with_1007() -> None:
    """Text frames must be UTF-8 (Autobahn checks, close code 1007)."""
    relay = Relay()
    publisher = relay.publisher()
    publisher.send(client_frame(OP_TEXT, b'{"type": "\xff"}'))
    assert close_code(publisher) == 1007


def test_meta_over_64_kib_closes_with_1009() -> None:
    """Text messages are bounded at 64 KiB."""
    relay = Relay()
    publisher = relay.publisher()
    publisher.send(text_frame({"type": "meta", "pad": "x" * 70000}))
    assert close_code(publisher) == 1009


def test_viewer_binary_closes_with_1003() -> None:
    """Viewers may not send binary messages."""
    relay = Relay()
    viewer = relay.viewer()
    viewer.send(binary_frame(b"hello"))
    assert close_code(viewer) == 1003


def test_viewer_message_over_4_kib_closes_with_1009() -> None:
    """Viewers may send at most 4 KiB."""
    relay = Relay()
    viewer = relay.viewer()
    viewer.send(text_frame({"type": "keyframe-request", "pad": "x" * 5000}))
    assert close_code(viewer) == 1009


def test_too_many_fragments_closes_publisher_with_1009() -> None:
    """Autobahn bounds bytes, not fragments: a message split into more fragments than
    --max-fragments-per-message is refused with 1009."""
    relay = Relay.with_options(max_fragments_per_message=16)
    publisher = relay.publisher()
    publisher.send(client_frame(OP_BINARY, b"\x01", fin=False))
    for _ in range(20):
        publisher.send(client_frame(OP_CONTINUATION, b"", fin=False))
    assert close_code(publisher) == 1009


def test_fragments_up_to_the_cap_are_fine() -> None:
    """Exactly the allowed number of fragments is accepted."""
    relay = Relay.with_options(max_fragments_per_message=16)
    publisher = relay.publisher()
    viewer = relay.viewer()
    message = media(FLAG_KEY, 1, b"y" * 7)  # 16 bytes
    publisher.send(client_frame(OP_BINARY, message[:1], fin=False))
    for index in range(1, 15):
        publisher.send(client_frame(OP_CONTINUATION, message[index : index + 1], fin=False))
    publisher.send(client_frame(OP_CONTINUATION, message[15:], fin=True))
    assert binaries(viewer) == [message]
    assert not publisher.close_codes()


def test_too_many_fragments_closes_viewer_with_1009() -> None:
    """The fragment cap applies to viewers too (empty fragments cost no bytes)."""
    relay = Relay.with_options(max_fragments_per_message=16)
    viewer = relay.viewer()
    viewer.send(client_frame(OP_TEXT, b"{", fin=False))
    for _ in range(100):
        viewer.send(client_frame(OP_CONTINUATION, b"", fin=False))
    assert viewer.close_codes() == [1009]


def test_unmasked_client_frame_closes_with_1002() -> None:
    """Client frames must be masked."""
    relay = Relay()
    publisher = relay.publisher()
    publisher.send(client_frame(OP_BINARY, media(FLAG_KEY, 1), masked=False))
    assert close_code(publisher) == 1002


def test_idle_publisher_closes_with_1008() -> None:
    """A publisher that sends no binary message for --publisher-idle-timeout is closed
    with 1008; media resets the clock, text does not."""
    relay = Relay.with_options(publisher_idle_timeout=20, ping_interval=100, ping_timeout=100)
    publisher = relay.publisher()
    relay.clock.advance(15)
    publisher.send(binary_frame(media(FLAG_KEY, 1)))
    relay.clock.advance(15)
    publisher.send(text_frame({"type": "meta"}))
    relay.clock.advance(4.9)
    assert publisher.close_codes() == []
    relay.clock.advance(0.2)
    assert close_code(publisher) == 1008


def test_takeover_closes_the_old_publisher_with_4409() -> None:
    """A new publisher replaces the old (closed with 4409); viewers stay and continue
    from the new CONFIG and KEY; the old publisher's late media is ignored."""
    relay = Relay()
    first = relay.publisher()
    viewer = relay.viewer()
    first.send(binary_frame(media(FLAG_CONFIG, 1)) + binary_frame(media(FLAG_KEY, 2)))
    second = relay.publisher()
    assert close_code(first) == 4409
    first.send(binary_frame(media(0, 3)))
    second.send(
        binary_frame(media(0, 10))
        + binary_frame(media(FLAG_CONFIG, 11))
        + binary_frame(media(FLAG_KEY, 12))
    )
    assert binaries(viewer) == [media(FLAG_CONFIG, 1), media(FLAG_KEY, 2),
                                media(FLAG_CONFIG, 11), media(FLAG_KEY, 12)]
    assert not viewer.closing
    first.send(close_frame(4409))
    relay.settle()
    assert relay.context.registry.streams["cam"].live


def test_publisher_leaving_sends_offline_to_viewers() -> None:
    """When the publisher's connection ends viewers stay and see ``offline``, then
    ``live`` again when a publisher returns."""
    relay = Relay()
    publisher = relay.publisher()
    viewer = relay.viewer()
    viewer.messages()
    publisher.lose()
    assert viewer.json_messages() == [{"type": "status", "state": "offline"}]
    relay.publisher()
    assert viewer.json_messages() == [{"type": "status", "state": "live"}]


def test_nothing_is_relayed_after_a_publisher_was_closed_for_a_violation() -> None:
    """Once the relay closed a publisher for breaking v1, later messages in the same
    read are not relayed."""
    relay = Relay()
    publisher = relay.publisher()
    viewer = relay.viewer()
    publisher.send(
        binary_frame(media(FLAG_KEY, 1)) + binary_frame(b"bad") + binary_frame(media(0, 2))
    )
    assert close_code(publisher) == 1007
    assert binaries(viewer) == [media(FLAG_KEY, 1)]


# -- liveness -----------------------------------------------------------------------------


def _pings(peer: Peer) -> list[bytes]:
    return [m.payload for m in peer.messages(("ping",))]


def test_pings_answered_keep_the_connection() -> None:
    """A peer that answers pings is never aborted."""
    relay = Relay.with_options(ping_interval=10, ping_timeout=10, publisher_idle_timeout=1000)
    viewer = relay.viewer()
    for _ in range(10):
        relay.tick(10)
        for payload in _pings(viewer):
            viewer.send(client_frame(OP_PONG, payload))
    assert not viewer.closing


def test_pings_every_interval() -> None:
    """--ping-interval: a ping every interval, whether or not the peer answered."""
    relay = Relay.with_options(ping_interval=10, ping_timeout=10, viewer_stall_timeout=1000)
    viewer = relay.viewer()
    counts = []
    for _ in range(6):
        relay.tick(10)
        pings = _pings(viewer)
        for payload in pings:
            viewer.send(client_frame(OP_PONG, payload))
        counts.append(len(pings))
    assert counts == [1] * 6


def test_silent_peer_is_aborted_after_interval_plus_timeout() -> None:
    """A half-open peer (no bytes at all) is aborted at ping interval + ping timeout."""
    relay = Relay.with_options(ping_interval=10, ping_timeout=5)
    viewer = relay.viewer()
    relay.tick(14.9)
    assert not viewer.aborted
    relay.tick(0.2)
    assert viewer.aborted


def test_peer_going_silent_is_aborted_within_interval_plus_timeout() -> None:
    """However its silence starts, a half-open peer dies within interval + timeout."""
    relay = Relay.with_options(ping_interval=10, ping_timeout=10, viewer_stall_timeout=1000)
    viewer = relay.viewer()
    relay.tick(10)
    for payload in _pings(viewer):
        viewer.send(client_frame(OP_PONG, payload))  # last sign of life at t=10
    relay.tick(20.1)
    assert viewer.aborted


def test_any_data_counts_as_a_sign_of_life() -> None:
    """Media from a publisher proves it alive even without a pong."""
    relay = Relay.with_options(ping_interval=10, ping_timeout=5)
    publisher = relay.publisher()
    for tag in range(40):
        relay.tick(1)
        publisher.send(binary_frame(media(FLAG_KEY, tag)))
    assert not publisher.closing


def test_client_ping_gets_a_pong() -> None:
    """Pings from the client are answered."""
    relay = Relay()
    viewer = relay.viewer()
    viewer.send(client_frame(OP_PING, b"hi"))
    assert [m.payload for m in viewer.messages(("pong",))] == [b"hi"]


# -- closing ------------------------------------------------------------------------------


def test_client_close_is_answered_and_bounded() -> None:
    """A close the peer starts is answered (1000) and the TCP connection ends; if the
    peer never lets it end, it is aborted after --close-timeout."""
    relay = Relay.with_options(close_timeout=2)
    viewer = relay.viewer()
    viewer.send(close_frame(1000, b"bye"))
    assert close_code(viewer) == 1000
    assert viewer.closing
    assert not viewer.aborted
    relay.clock.advance(2.01)
    assert viewer.aborted
    viewer.lose(aborted=True)
    relay.disconnect_all()
    relay.assert_idle()


def test_server_close_with_no_reply_is_aborted_after_close_timeout() -> None:
    """A close the relay starts (here: idle publisher, 1008) to a peer that never
    answers ends in an abort after --close-timeout."""
    relay = Relay.with_options(publisher_idle_timeout=5, close_timeout=2)
    publisher = relay.publisher()
    relay.clock.advance(5)
    assert close_code(publisher) == 1008
    relay.clock.advance(1.9)
    assert not publisher.aborted
    relay.clock.advance(0.2)
    assert publisher.aborted


def test_server_close_answered_by_the_peer_ends_at_once() -> None:
    """When the peer answers the relay's close, the connection ends without waiting."""
    relay = Relay.with_options(publisher_idle_timeout=5, close_timeout=2)
    publisher = relay.publisher()
    relay.clock.advance(5)
    publisher.send(close_frame(1008))
    assert publisher.closing
    relay.settle()
    relay.assert_idle()


def test_stalled_viewer_closes_with_1008_then_is_aborted() -> None:
    """A viewer with no write progress for --viewer-stall-timeout gets 1008 and is
    aborted after --close-timeout."""
    relay = Relay.with_options(viewer_stall_timeout=15, close_timeout=2,
                               ping_interval=1000, ping_timeout=1000)
    publisher = relay.publisher()
    viewer = relay.viewer()
    viewer.producer.pauseProducing()
    publisher.send(binary_frame(media(FLAG_KEY, 1)))
    relay.clock.advance(14.9)
    assert viewer.close_codes() == []
    relay.clock.advance(0.2)
    assert viewer.close_codes() == [1008]
    relay.clock.advance(2)
    assert viewer.aborted


def test_paused_viewer_gets_media_when_its_transport_drains() -> None:
    """Backpressure: while the transport is paused media waits; on resume it flows,
    and the other viewers were never held back."""
    relay = Relay()
    publisher = relay.publisher()
    slow = relay.viewer()
    fast = relay.viewer()
    slow.messages()
    slow.producer.pauseProducing()
    sent = [media(FLAG_KEY, 1), media(0, 2), media(0, 3)]
    for message in sent:
        publisher.send(binary_frame(message))
    assert binaries(slow) == []
    assert binaries(fast) == sent
    slow.producer.resumeProducing()
    assert binaries(slow) == sent


def test_slow_viewer_skips_to_the_next_key_with_a_dropped_notice() -> None:
    """A viewer over --viewer-queue-bytes skips: when it drains it gets ``dropped``,
    then a KEY, and a keyframe request reaches the publisher."""
    relay = Relay.with_options(viewer_queue_bytes=2000)
    publisher = relay.publisher()
    slow = relay.viewer()
    publisher.send(binary_frame(media(FLAG_KEY, 1)))
    slow.messages()
    publisher.json_messages()
    slow.producer.pauseProducing()
    for tag in range(2, 40):
        publisher.send(binary_frame(encode_media(0, tag, b"z" * 200)))
    slow.producer.resumeProducing()
    relay.tick(relay.config.keyframe_request_interval)  # the join asked for one at t=0
    assert {"type": "keyframe-request"} in publisher.json_messages()
    publisher.send(binary_frame(media(FLAG_KEY, 50)))
    received = slow.messages()
    notice = next(i for i, m in enumerate(received) if m.kind == "text")
    assert received[notice].json["type"] == "dropped"
    assert received[notice].json["messages"] > 0
    assert received[notice + 1].payload == media(FLAG_KEY, 50)
    assert relay.context.registry.streams["cam"].dropped == received[notice].json["messages"]


# -- handshake deadline, shutdown, leaks ---------------------------------------------------


def test_slowloris_upgrade_is_aborted_at_the_handshake_deadline() -> None:
    """An opening handshake that does not finish within --handshake-timeout of the
    accept is aborted, however steadily its bytes trickle; nothing is left behind."""
    relay = Relay.with_options(handshake_timeout=3)
    peer = relay.connect()
    head = request_head("GET", "/publish/cam", upgrade_headers(host=HOST))
    for index in range(29):
        peer.send(head[index : index + 1])
        relay.tick(0.1)
    assert not peer.aborted
    relay.tick(0.15)
    assert peer.aborted
    assert peer.protocol is None
    peer.lose(aborted=True)
    relay.assert_idle()


def test_drain_closes_every_websocket_with_1001_and_fires() -> None:
    """Graceful stop: each WebSocket gets 1001, idle HTTP connections are closed, the
    Deferred fires once every connection is gone."""
    relay = Relay()
    publisher = relay.publisher()
    viewer = relay.viewer()
    idle_http = relay.connect()
    fired: list[object] = []
    relay.context.drain().addCallback(fired.append)
    assert close_code(publisher) == 1001
    assert close_code(viewer) == 1001
    assert idle_http.closing
    assert fired == []
    publisher.send(close_frame(1001))
    viewer.send(close_frame(1001))
    relay.settle()
    relay.clock.advance(0.1)
    assert fired == [None]
    relay.clock.advance(10)
    relay.assert_idle()


def test_drain_aborts_stragglers_after_close_timeout() -> None:
    """Peers that never answer the 1001 are aborted after --close-timeout and the
    Deferred still fires."""
    relay = Relay.with_options(close_timeout=2)
    viewer = relay.viewer()
    half = relay.connect()
    half.send(b"GET /watch/cam HTTP/1.1\r\n")
    fired: list[object] = []
    relay.context.drain().addCallback(fired.append)
    relay.clock.advance(1.9)
    assert fired == [] and not viewer.aborted
    relay.clock.advance(0.2)
    assert viewer.aborted
    relay.settle()
    relay.clock.advance(1)
    assert fired == [None]
    relay.assert_idle()


def test_everything_returns_to_idle_after_disconnects() -> None:
    """After publishers, viewers, refusals, takeovers and abrupt disconnects, the
    registry, limits, budget and timers are back at their idle state."""
    relay = Relay.with_options(viewer_queue_bytes=1000)
    publishers = [relay.publisher("a"), relay.publisher("b")]
    viewers = [relay.viewer(name) for name in ("a", "a", "b", "c")]
    viewers[0].producer.pauseProducing()
    for tag in range(20):
        publishers[0].send(binary_frame(media(FLAG_KEY if tag % 5 == 0 else 0, tag, b"q" * 300)))
    relay.publisher("a")  # takeover
    viewers[1].send(binary_frame(b"x"))  # 1003
    relay.connect().send(b"GET /watch/a HTTP/1.1\r\nHost")  # half a head
    relay.connect().request("GET", "/nope")
    body = json.loads(relay.connect().request("GET", "/api/streams").body)
    assert body["connections"]["publishers"] == 2
    relay.clock.advance(60)
    relay.settle()
    relay.disconnect_all()
    relay.clock.advance(60)
    relay.assert_idle()


# -- odd but possible inputs -----------------------------------------------------------------


def test_deeply_nested_viewer_text_is_ignored() -> None:
    """Viewer text that is not a usable JSON object is ignored, however it is nested
    (4 KiB is enough for 2000 levels)."""
    relay = Relay()
    viewer = relay.viewer()
    viewer.send(text_frame("[" * 2000 + "]" * 2000))
    assert viewer.close_codes() == []


def test_deeply_nested_publisher_text_closes_with_1007() -> None:
    """Publisher text that is not a JSON object closes with 1007, however nested."""
    relay = Relay()
    publisher = relay.publisher()
    publisher.send(text_frame('{"type":"meta","x":' + "[" * 5000 + "]" * 5000 + "}"))
    assert publisher.close_codes() == [1007]


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-WebSocket-Key": ""},
        {"Sec-WebSocket-Key": "short"},
        {"Sec-WebSocket-Version": "99"},
        {"Connection": "keep-alive"},
    ],
)
def test_handshake_autobahn_refuses_is_a_clean_http_error(headers: dict[str, str]) -> None:
    """A request that passes the gate but is not a valid WebSocket handshake gets an
    HTTP error from Autobahn, no WebSocket, and leaves nothing behind."""
    relay = Relay()
    peer = relay.connect()
    response = peer.upgrade("/watch/cam", headers)
    assert 400 <= response.status < 500
    assert relay.context.registry.streams == {}
    relay.settle()
    relay.disconnect_all()
    relay.assert_idle()


def test_echo_endpoint_with_deflate_only_when_enabled() -> None:
    """--echo serves /echo, which echoes messages and negotiates permessage-deflate;
    the media endpoints never accept compression."""
    deflate = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
    relay = Relay.with_options(echo=True)
    echo = relay.open("/echo", deflate, subprotocol=None)
    extensions = echo.response().header("sec-websocket-extensions")
    assert extensions is not None
    assert extensions.startswith("permessage-deflate")
    plain = relay.open("/echo", subprotocol=None)
    plain.send(text_frame("hello") + binary_frame(b"\x00\x01"))
    assert [(m.kind, m.payload) for m in plain.messages()] == [
        ("text", b"hello"), ("binary", b"\x00\x01")
    ]
    for target in ("/watch/cam", "/publish/cam"):
        peer = relay.open(target, deflate)
        assert peer.response().header("sec-websocket-extensions") is None
    assert Relay().connect().upgrade("/echo").status == 404


def test_echo_caps_fragments_too() -> None:
    """/echo applies the fragment cap (the conformance suite runs against it)."""
    relay = Relay.with_options(echo=True, max_fragments_per_message=8)
    echo = relay.open("/echo", subprotocol=None)
    echo.send(client_frame(OP_TEXT, b"a", fin=False))
    for _ in range(10):
        echo.send(client_frame(OP_CONTINUATION, b"", fin=False))
    assert close_code(echo) == 1009


# -- fan-out and transport handling -------------------------------------------------------


def test_fan_out_frames_each_message_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A message for many viewers is framed once (the registry's frame factory), not once
    per viewer."""
    relay = Relay()
    registry = relay.context.registry
    calls: list[bool] = []
    original = registry.frame_factory

    def counting(payload: bytes, is_binary: bool) -> object:
        calls.append(is_binary)
        return original(payload, is_binary)

    monkeypatch.setattr(registry, "frame_factory", counting)
    publisher = relay.publisher()
    viewers = [relay.viewer() for _ in range(5)]
    calls.clear()
    for tag in range(10):
        publisher.send(binary_frame(media(FLAG_KEY if tag == 0 else 0, tag)))
    assert calls.count(True) == 10
    for viewer in viewers:
        assert len(binaries(viewer)) == 10


def test_closing_viewer_gets_no_more_media() -> None:
    """Once a viewer's WebSocket is closing, nothing but control frames follows the
    close frame."""
    relay = Relay()
    publisher = relay.publisher()
    publisher.send(binary_frame(media(FLAG_KEY, 1)))
    viewer = relay.viewer()
    viewer.send(binary_frame(b"not allowed"))
    assert close_code(viewer) == 1003
    for tag in range(2, 6):
        publisher.send(binary_frame(media(0, tag)))
    publisher.send(text_frame({"type": "meta", "v": 2}))
    messages = viewer.all_messages()
    close_at = [m.kind for m in messages].index("close")
    assert all(m.kind in ("ping", "pong") for m in messages[close_at + 1 :])


def test_slow_viewers_never_pause_the_publisher() -> None:
    """However slow its viewers, the relay never stops reading from a publisher (and
    keeps TCP keepalive on for WebSockets)."""
    relay = Relay.with_options(viewer_queue_bytes=1000, max_buffered_bytes=5000)
    publisher = relay.publisher()
    slow = [relay.viewer() for _ in range(3)]
    fast = relay.viewer()
    for viewer in slow:
        viewer.producer.pauseProducing()
    sent = [media(FLAG_KEY if tag % 10 == 0 else 0, tag, b"p" * 300) for tag in range(100)]
    for message in sent:
        publisher.send(binary_frame(message))
    assert publisher.transport.producerState == "producing"
    assert binaries(fast) == sent
    assert relay.context.registry.budget.total < 5000
    assert publisher.transport.keepalive and fast.transport.keepalive
