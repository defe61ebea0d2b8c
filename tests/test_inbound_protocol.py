"""What a peer may send, end to end through the real Site, RelayChannel and Autobahn
protocols on StringTransports and a Clock: floods of every frame kind from every role
are closed (1008 "too many frames" / "too much data" when the frames are legal) and no
longer read; a publisher at a realistic media rate never is; and one read of many frames
is parsed a share per reactor turn, with reading paused in between."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrelay.config import RelayConfig
from streamrelay.inbound import FRAMES_PER_TURN, VIEWER_FRAME_BURST, limits_for
from streamrelay.roles import Role
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, MAX_VIEWER_MESSAGE_BYTES, encode_media
from tests.fakes import HOST, LogCapture, Peer, Relay
from tests.support.frames import (
    OP_BINARY,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    binary_frame,
    client_frame,
    close_frame,
    parse_frames,
    text_frame,
)
from tests.support.http import request_head, upgrade_headers

CONFIG = RelayConfig()
PUBLISHER_LIMITS = limits_for(Role.PUBLISHER, CONFIG, CONFIG.max_message_bytes)
assert PUBLISHER_LIMITS is not None
PUBLISHER_FRAME_BURST = int(PUBLISHER_LIMITS.frame_burst)


# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


def closes(peer: Peer) -> list[tuple[int | None, str]]:
    """Every close frame the relay sent: (code, reason)."""
    return [
        (message.close_code, message.payload[2:].decode())
        for message in peer.all_messages()
        if message.kind == "close"
    ]


def pongs(peer: Peer) -> list[bytes]:
    """Payloads of the pongs the relay sent."""
    return [message.payload for message in peer.all_messages() if message.kind == "pong"]


def reading_paused(peer: Peer) -> bool:
    """The relay paused reading from this peer's transport."""
    return bool(peer.transport.producerState == "paused")


def media(flags: int, tag: int, size: int = 20) -> bytes:
    return encode_media(flags, tag, bytes([tag % 256]) * size)


# -- every frame kind, every role ----------------------------------------------------------

LEGAL_VIEWER_FLOODS: dict[str, bytes] = {
    "ping": client_frame(OP_PING),
    "pong": client_frame(OP_PONG),
    "empty text": client_frame(OP_TEXT),
    "garbage text": text_frame("no json here, just noise"),
    "keyframe requests": text_frame({"type": "keyframe-request"}),
    "unknown json": text_frame({"type": "whatever", "n": 1}),
    "empty fragments": client_frame(OP_CONTINUATION, fin=False),
}

LEGAL_PUBLISHER_FLOODS: dict[str, bytes] = {
    "ping": client_frame(OP_PING),
    "pong": client_frame(OP_PONG, b"12345678"),
    "meta": text_frame({"type": "meta", "codec": "h264"}),
    "ignored text": text_frame({"type": "chat"}),
    "tiny media": binary_frame(media(0, 1, 0)),
}


# Continuation fragments follow the first frame of a message.
FLOOD_PREFIX = {"empty fragments": client_frame(OP_TEXT, b"{", fin=False)}


@pytest.mark.parametrize("kind", sorted(LEGAL_VIEWER_FLOODS))
def test_viewer_flood_closes_with_1008_and_stops_reading(kind: str, log: LogCapture) -> None:
    """A viewer flooding any legal frame kind in one read gets its frame burst, then a
    1008 "too many frames"; the rest is not parsed, nothing more is read, the relay
    counts it, logs it once, and aborts after the close timeout."""
    relay = Relay()
    publisher = relay.publisher()
    publisher.send(binary_frame(media(FLAG_KEY, 1)))
    viewer = relay.viewer()
    publisher.messages()
    viewer.send(FLOOD_PREFIX.get(kind, b"") + LEGAL_VIEWER_FLOODS[kind] * 1000)
    relay.turns()
    assert closes(viewer) == [(1008, "too many frames")]
    assert reading_paused(viewer)
    if kind == "ping":
        assert len(pongs(viewer)) == VIEWER_FRAME_BURST
    requests = [m for m in publisher.json_messages() if m["type"] == "keyframe-request"]
    assert len(requests) <= 1
    # Nothing sent later is parsed, however long the wait.
    relay.clock.advance(0.5)
    viewer.send(text_frame({"type": "keyframe-request"}) + client_frame(OP_PING, b"late"))
    relay.turns()
    assert b"late" not in pongs(viewer)
    assert relay.context.over_budget == {"viewer": {"too many frames": 1}}
    over = [e for e in log.events if "inbound budget" in (e.get("log_format") or "")]
    assert len(over) == 1 and over[0]["reason"] == "too many frames"
    assert not viewer.aborted
    relay.clock.advance(relay.config.close_timeout)
    assert viewer.aborted
    relay.settle()
    assert relay.context.registry.viewer_count == 0


@pytest.mark.parametrize("kind", sorted(LEGAL_PUBLISHER_FLOODS))
def test_publisher_flood_closes_with_1008_and_nothing_is_relayed_after(kind: str) -> None:
    """A publisher flooding legal frames gets its frame burst and no more: 1008 "too many
    frames", and nothing it sent after the burst reaches a viewer."""
    relay = Relay()
    publisher = relay.publisher()
    publisher.send(binary_frame(media(FLAG_CONFIG, 0)) + binary_frame(media(FLAG_KEY, 1)))
    viewer = relay.viewer()
    viewer.messages()
    frame = LEGAL_PUBLISHER_FLOODS[kind]
    count = PUBLISHER_FRAME_BURST + 500
    publisher.send(frame * count)
    turns = relay.turns()
    assert turns >= PUBLISHER_FRAME_BURST // FRAMES_PER_TURN - 2
    assert closes(publisher) == [(1008, "too many frames")]
    assert reading_paused(publisher)
    relayed = viewer.messages(("text", "binary"))
    admitted = PUBLISHER_FRAME_BURST - 2  # the CONFIG and the KEY were frames too
    if kind in ("meta", "tiny media"):
        assert len(relayed) == admitted
    else:
        assert relayed == []
    relay.clock.advance(1.0)
    publisher.send(text_frame({"type": "meta", "late": True}))
    relay.turns()
    assert all(b"late" not in message.payload for message in viewer.messages())
    assert relay.context.over_budget == {"publisher": {"too many frames": 1}}


@pytest.mark.parametrize(
    ("role", "frame", "code"),
    [
        ("watch", client_frame(OP_BINARY), 1003),  # viewers may not send binary
        ("publish", client_frame(OP_BINARY), 1007),  # empty media
        ("publish", client_frame(OP_TEXT), 1007),  # text that is not a JSON object
        ("watch", client_frame(0x3), 1002),  # reserved data opcode
        ("publish", client_frame(0xB), 1002),  # reserved control opcode
        ("watch", client_frame(OP_PING, masked=False), 1002),
        ("publish", client_frame(OP_CONTINUATION), 1002),  # no message to continue
        ("watch", b"\xff" * 60_000, 1002),  # close-less garbage
        ("publish", b"\x8f\x80garbage!" * 6000, 1002),
    ],
)
def test_floods_of_illegal_frames_get_their_own_close_and_are_not_parsed_on(
    role: str, frame: bytes, code: int
) -> None:
    """Frames that break the protocol or the role are refused on the first one with
    their own code (1002, 1003, 1007), and the rest of the flood is not parsed either:
    the peer is dropped, or goes over its budget and is no longer read."""
    relay = Relay()
    peer = relay.open(f"/{role}/cam")
    data = frame * max(1, 60_000 // len(frame))
    # Two reads: Autobahn stops parsing a read at the first protocol error and drops
    # the connection at the next one.
    peer.send(data)
    relay.turns()
    peer.send(data)
    relay.turns()
    assert [close[0] for close in closes(peer)] == [code]
    assert peer.closing or reading_paused(peer)
    relay.clock.advance(relay.config.close_timeout)
    assert peer.closing or peer.aborted


def test_empty_fragments_of_a_publisher_hit_the_fragment_cap_first() -> None:
    """A publisher's frame burst holds a message in the most fragments allowed, so a
    flood of empty fragments is refused by the fragment cap (1009), before its budget;
    the next fragment over the cap drops the connection."""
    relay = Relay()
    publisher = relay.publisher()
    publisher.send(
        client_frame(OP_BINARY, b"\x01", fin=False)
        + client_frame(OP_CONTINUATION, fin=False) * (PUBLISHER_FRAME_BURST + 100)
    )
    relay.turns()
    assert [close[0] for close in closes(publisher)] == [1009]
    assert publisher.closing
    assert relay.context.over_budget == {}


def test_a_message_in_the_most_fragments_allowed_fits_the_burst() -> None:
    """A publisher's message split into ``max_fragments_per_message`` fragments, sent
    at once, is relayed whole."""
    relay = Relay()
    publisher = relay.publisher()
    viewer = relay.viewer()
    message = media(FLAG_KEY, 3, CONFIG.max_fragments_per_message)
    pieces = [message[index : index + 1] for index in range(len(message))]
    fragments = CONFIG.max_fragments_per_message
    head, body, tail = pieces[: -fragments + 1], pieces[-fragments + 1 : -1], pieces[-1]
    frames = client_frame(OP_BINARY, b"".join(head), fin=False)
    frames += b"".join(client_frame(OP_CONTINUATION, piece, fin=False) for piece in body)
    frames += client_frame(OP_CONTINUATION, tail)
    publisher.send(frames)
    relay.turns()
    assert [m.payload for m in viewer.messages(("binary",))] == [message]
    assert not publisher.close_codes()


# -- bytes ---------------------------------------------------------------------------------


def test_a_viewer_sending_large_frames_closes_with_1008_too_much_data() -> None:
    """A viewer within its frame count but over its byte budget: 1008 "too much data"."""
    relay = Relay()
    viewer = relay.viewer()
    viewer.send(text_frame("x" * 1000) * 10)
    relay.turns()
    assert closes(viewer) == [(1008, "too much data")]
    assert relay.context.over_budget == {"viewer": {"too much data": 1}}


def test_a_viewer_message_of_the_largest_size_fits_its_burst() -> None:
    """A viewer's largest legal message (4 KiB) fits its byte burst."""
    relay = Relay()
    viewer = relay.viewer()
    viewer.send(
        text_frame({"type": "keyframe-request", "pad": "x" * (MAX_VIEWER_MESSAGE_BYTES - 60)})
    )
    assert not viewer.close_codes()


def test_a_viewer_keeping_to_its_rate_is_never_closed() -> None:
    """Keyframe requests and pongs well within the rate, for a long time, are fine."""
    relay = Relay()
    viewer = relay.viewer()
    for second in range(600):
        viewer.send(
            text_frame({"type": "keyframe-request"}) + client_frame(OP_PONG, b"%d" % second)
        )
        relay.tick(1.0, step=0.5)
    assert not viewer.close_codes()
    assert relay.context.over_budget == {}


def test_a_publisher_over_its_byte_rate_closes_with_1008_too_much_data() -> None:
    """Media faster than ``publisher_bytes_per_second`` (beyond the burst) is refused."""
    relay = Relay.with_options(
        publisher_bytes_per_second=100_000, max_message_bytes=50_000, max_fragments_per_message=4
    )
    publisher = relay.publisher()
    chunk = binary_frame(media(0, 1, 40_000))
    for _ in range(200):
        publisher.send(chunk)
        relay.clock.advance(0.1)  # 400 KB/s
        if publisher.close_codes():
            break
    assert closes(publisher) == [(1008, "too much data")]
    assert relay.clock.seconds() < 5


def test_a_realistic_publisher_is_never_closed() -> None:
    """60 fps of 100 KB media, a 1 MB keyframe every two seconds, meta every second and
    pongs, for two simulated minutes, stay within the default budget."""
    relay = Relay()
    publisher = relay.publisher()
    viewer = relay.viewer()
    delta = binary_frame(media(0, 7, 100_000))
    key = binary_frame(media(FLAG_KEY, 8, 1_000_000))
    meta = text_frame({"type": "meta", "codec": "h264", "width": 1920})
    publisher.send(binary_frame(media(FLAG_CONFIG, 0)) + key)
    for second in range(120):
        publisher.send(meta + client_frame(OP_PONG, b"%d" % second))
        for frame_index in range(60):
            # Reads carry one to three frames, as TCP coalesces them.
            if frame_index == 0 and second % 2 == 0:
                publisher.send(key)
            elif frame_index % 3 == 0:
                publisher.send(delta * 3)
            relay.clock.advance(1 / 60)
        relay.turns()
        assert viewer.protocol is not None
        viewer.transport.clear()
    assert not publisher.close_codes()
    assert not reading_paused(publisher)
    assert relay.context.over_budget == {}


# -- one read, many frames: a share per reactor turn ----------------------------------------


def test_one_read_of_10000_pongs_is_parsed_a_turn_at_a_time() -> None:
    """10,000 empty pongs in one read (within the budget): at most FRAMES_PER_TURN are
    parsed before reading pauses; each turn parses the next share and the last one
    resumes reading."""
    relay = Relay.with_options(publisher_frames_per_second=1e6)
    publisher = relay.publisher()
    seen: list[bytes] = []
    publisher.protocol.onPong = seen.append
    publisher.send(client_frame(OP_PONG) * 10_000)
    assert len(seen) == FRAMES_PER_TURN
    assert reading_paused(publisher)
    relay.turn()
    assert len(seen) == 2 * FRAMES_PER_TURN
    assert reading_paused(publisher)
    assert relay.turns() == -(-10_000 // FRAMES_PER_TURN) - 2
    assert len(seen) == 10_000
    assert not reading_paused(publisher)
    publisher.send(client_frame(OP_PONG) * 10_000)
    assert len(seen) == 10_000 + FRAMES_PER_TURN
    relay.clock.advance(0)
    assert len(seen) == 20_000
    assert not reading_paused(publisher)
    assert not publisher.close_codes()


def test_the_echo_endpoint_yields_too_and_keeps_order() -> None:
    """/echo has no budget but parses a share per turn as well; bytes that arrive while
    a share waits (TLS hands a read over in pieces) queue behind it, in order."""
    relay = Relay.with_options(echo=True)
    echo = relay.open("/echo", subprotocol=None)
    pings = [client_frame(OP_PING, struct.pack("!I", index)) for index in range(5000)]
    echo.send(b"".join(pings[:3000]))
    echo.send(b"".join(pings[3000:]))
    assert len(pongs(echo)) == FRAMES_PER_TURN
    relay.turns()
    assert pongs(echo) == [struct.pack("!I", index) for index in range(5000)]
    assert not reading_paused(echo)
    assert not echo.close_codes()


def test_a_few_frames_per_read_never_yield() -> None:
    """A read of fewer than FRAMES_PER_TURN frames is parsed at once: normal traffic
    never waits for a turn."""
    relay = Relay()
    publisher = relay.publisher()
    viewer = relay.viewer()
    batch = [media(FLAG_KEY, 1)] + [media(0, tag) for tag in range(2, FRAMES_PER_TURN)]
    publisher.send(b"".join(binary_frame(message) for message in batch))
    assert [m.payload for m in viewer.messages(("binary",))] == batch
    assert not reading_paused(publisher)
    assert not relay.clock.getDelayedCalls() or all(
        call.getTime() > relay.clock.seconds() for call in relay.clock.getDelayedCalls()
    )


def test_reading_pause_and_write_side_flow_control_stay_apart() -> None:
    """While a publisher's parsing waits for its turn, its write side draining does not
    resume reading; and the pause of reading does not pause what goes out to viewers."""
    relay = Relay.with_options(publisher_frames_per_second=1e6)
    publisher = relay.publisher()
    viewer = relay.viewer()
    publisher.send(binary_frame(media(FLAG_KEY, 1)))
    viewer.messages()
    publisher.send(client_frame(OP_PING) * 1000 + binary_frame(media(0, 2)))
    assert reading_paused(publisher)
    publisher.producer.pauseProducing()
    publisher.producer.resumeProducing()
    assert reading_paused(publisher)
    relay.turns()
    assert not reading_paused(publisher)
    assert [m.payload for m in viewer.messages(("binary",))] == [media(0, 2)]
    assert viewer.transport.producerState == "producing"


def test_connection_lost_while_a_turn_waits_cancels_it() -> None:
    """A peer that goes away while its next share waits leaves no timer behind."""
    relay = Relay.with_options(publisher_frames_per_second=1e6)
    publisher = relay.publisher()
    publisher.send(client_frame(OP_PONG) * 1000)
    assert reading_paused(publisher)
    publisher.lose()
    relay.turns()
    relay.disconnect_all()
    relay.assert_idle()


def test_a_close_behind_many_frames_is_honoured_on_a_later_turn() -> None:
    """The peer's close frame queued behind a long run of frames is answered once its
    turn comes, and the connection ends."""
    relay = Relay.with_options(publisher_frames_per_second=1e6)
    publisher = relay.publisher()
    publisher.send(client_frame(OP_PONG) * 500 + close_frame(1000))
    assert publisher.close_codes() == []
    relay.turns()
    assert publisher.close_codes() == [1000]
    assert publisher.closing


def test_frames_sent_with_the_handshake_are_budgeted_and_yield() -> None:
    """Frames in the same segment as the request head are parsed a share per turn and
    charged to the budget like any others."""
    relay = Relay()
    viewer = relay.connect()
    viewer.send(
        request_head("GET", "/watch/cam", upgrade_headers(host=HOST)) + client_frame(OP_PONG) * 5000
    )
    assert viewer.response().status == 101
    relay.turns()
    assert closes(viewer) == [(1008, "too many frames")]
    assert reading_paused(viewer)


def test_floods_from_many_connections_each_get_their_share() -> None:
    """Eight connections each flooding in one read: each turn parses one share from
    every one of them, so none waits for another's flood to be parsed whole."""
    relay = Relay.with_options(echo=True)
    floods = [relay.open("/echo", subprotocol=None) for _ in range(8)]
    for peer in floods:
        peer.send(client_frame(OP_PING) * 1000)
    assert [len(pongs(peer)) for peer in floods] == [FRAMES_PER_TURN] * 8
    relay.turn()
    assert [len(pongs(peer)) for peer in floods] == [2 * FRAMES_PER_TURN] * 8


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=60_000), max_size=8),
)
def test_yielding_never_loses_or_reorders_messages(sizes: list[int], cuts: list[int]) -> None:
    """Whatever the mix of frame sizes and however the bytes are split into reads, an
    echo of many frames comes back complete and in order."""
    relay = Relay.with_options(echo=True)
    echo = relay.open("/echo", subprotocol=None)
    payloads = [bytes([index % 256]) * size for index, size in enumerate(sizes * 5)]
    stream = b"".join(
        client_frame(OP_PING, payload[:125]) if index % 2 else binary_frame(payload)
        for index, payload in enumerate(payloads)
    )
    previous = 0
    for cut in sorted(set(cut % (len(stream) + 1) for cut in cuts)) + [len(stream)]:
        echo.send(stream[previous:cut])
        previous = cut
    relay.turns()
    frames, _rest = parse_frames(echo.written[echo.written.index(b"\r\n\r\n") + 4 :])
    expected = [
        (OP_PONG, payload[:125]) if index % 2 else (OP_BINARY, payload)
        for index, payload in enumerate(payloads)
    ]
    assert [(frame.opcode, frame.payload) for frame in frames] == expected


def test_limits_come_from_the_settings() -> None:
    """The factory of each endpoint holds its role's limits (None for /echo)."""
    relay = Relay.with_options(echo=True, viewer_frames_per_second=7.0)
    viewer = relay.viewer()
    publisher = relay.publisher()
    echo = relay.open("/echo", subprotocol=None)
    config = relay.config
    assert viewer.protocol.factory.inbound_limits == limits_for(
        Role.VIEWER, config, MAX_VIEWER_MESSAGE_BYTES
    )
    assert publisher.protocol.factory.inbound_limits == limits_for(
        Role.PUBLISHER, config, config.max_message_bytes
    )
    assert echo.protocol.factory.inbound_limits is None


def test_api_internals_counts_connections_over_budget() -> None:
    """/api/internals reports the connections closed over budget, by role and reason."""
    relay = Relay.with_options(api_internals=True)
    for _ in range(2):
        relay.viewer().send(client_frame(OP_PONG) * 100)
    relay.viewer().send(text_frame("x" * 1000) * 10)
    relay.publisher().send(client_frame(OP_PING) * (PUBLISHER_FRAME_BURST + 1))
    relay.turns()
    body = json.loads(relay.connect().request("GET", "/api/internals").body)
    assert body["over_budget"] == {
        "viewer": {"too many frames": 2, "too much data": 1},
        "publisher": {"too many frames": 1},
    }


def test_an_error_while_parsing_on_a_later_turn_is_logged_and_aborts(
    log: LogCapture,
) -> None:
    """An exception out of the parser on a continued turn is what the reactor makes of
    one out of dataReceived: logged, and the connection dropped."""
    relay = Relay.with_options(publisher_frames_per_second=1e6)
    publisher = relay.publisher()
    seen: list[bytes] = []

    def failing_pong(payload: bytes) -> None:
        seen.append(payload)
        if len(seen) > FRAMES_PER_TURN:
            raise RuntimeError("boom")

    publisher.protocol.onPong = failing_pong
    publisher.send(client_frame(OP_PONG) * 200)
    assert len(seen) == FRAMES_PER_TURN
    relay.turns()
    assert publisher.aborted
    assert len(seen) == FRAMES_PER_TURN + 1
    assert [event["log_failure"].type for event in log.failures] == [RuntimeError]
    log.events.clear()
