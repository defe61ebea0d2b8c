"""Property-based fuzzing of the wire parser and of the publisher and viewer protocols.

Example counts come from the hypothesis profile (registered in ``tests/conftest.py``),
chosen with ``HYPOTHESIS_PROFILE``: ``ci`` (the default: 400 per test, a few thousand in
all, well under a minute), ``dev`` (quick) or ``thorough`` (10,000 per test; lift
pytest's timeout for it)::

    HYPOTHESIS_PROFILE=thorough pytest tests/test_fuzz.py tests/test_viewer_queue.py --timeout=0

"""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from streamrelay.wire import (
    FLAG_AUDIO,
    FLAG_CONFIG,
    FLAG_KEY,
    HEADER_SIZE,
    WireError,
    encode_media,
    parse_media,
    parse_text,
)
from tests.fakes import Peer, Relay, captured_log
from tests.support.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    assemble,
    client_frame,
    parse_frames,
)

# Close codes a peer may see from the relay after sending garbage: its own close
# answered (1000), protocol error, unsupported data, bad payload, policy, too big.
PROPER_CLOSE_CODES = {1000, 1002, 1003, 1007, 1008, 1009}


# -- the wire parser ------------------------------------------------------------------------


@given(st.binary(max_size=64))
def test_parse_media_raises_only_wire_errors(data: bytes) -> None:
    """Any bytes either parse into a message that keeps them whole or raise WireError."""
    try:
        message = parse_media(data)
    except WireError as error:
        assert str(error)
        return
    assert message.data == data
    assert len(data) >= HEADER_SIZE
    assert not (message.is_key and message.is_config)
    # One kind per message: a frame, a KEY, a CONFIG or an audio packet.
    assert message.flags in (0, FLAG_KEY, FLAG_CONFIG, FLAG_AUDIO)


@given(st.integers(0, 3), st.integers(0, 2**64 - 1), st.binary(max_size=32))
def test_encode_then_parse_round_trips(flags: int, capture: int, payload: bytes) -> None:
    """What the publisher library encodes, the relay parses back identically."""
    if flags == FLAG_KEY | FLAG_CONFIG:
        return
    message = parse_media(encode_media(flags, capture, payload))
    assert (message.flags, message.capture_time_us, message.data[HEADER_SIZE:]) == (
        flags,
        capture,
        payload,
    )


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

_texts = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.text(alphabet='{}[]":,0123456789.eE+-tfnrual\\ ', max_size=200).map(str.encode),
)


@given(_texts)
def test_parse_text_raises_only_wire_errors(payload: bytes) -> None:
    """Any text payload is either a JSON object or a WireError."""
    try:
        value = parse_text(payload)
    except WireError:
        return
    assert isinstance(value, dict)


_non_standard = st.sampled_from(["NaN", "Infinity", "-Infinity"])
_standard_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(_standard_json_values, _non_standard, st.randoms(use_true_random=False))
def test_parse_text_refuses_nan_and_infinity_anywhere(
    value: Any, constant: str, random: Any
) -> None:
    """A JSON object with NaN or an infinity put at any place a value can go is refused
    (browsers' JSON.parse refuses it); the same object with null there parses."""
    marker = "__non_standard__"
    document = {"type": "meta", "v": value}
    # Pick one value slot of the document (a dict member or list item) to replace.
    slots: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in list(items):
            slots.append((node, key))
            if isinstance(child, (dict, list)):
                walk(child)

    walk(document)
    slots.remove((document, "type"))
    container, key = random.choice(slots)
    container[key] = marker
    encoded = json.dumps(document)
    assert parse_text(encoded.replace(json.dumps(marker), "null").encode())["type"] == "meta"
    try:
        parse_text(encoded.replace(json.dumps(marker), constant).encode())
    except WireError as error:
        assert constant in str(error)
    else:
        raise AssertionError(f"{constant} accepted in {encoded}")


@given(st.integers(0, 4000), st.sampled_from(["[", '{"a":', '[{"b":']))
def test_parse_text_survives_deep_nesting(depth: int, opener: str) -> None:
    """Nesting depth is not a way to crash the parser."""
    try:
        parse_text((opener * depth).encode())
    except WireError:
        pass


# -- frames into the protocols -----------------------------------------------------------

_payloads = st.one_of(
    st.binary(max_size=40),
    st.builds(
        # Unchecked on purpose: the protocols must refuse flags the codec would not build.
        lambda flags, capture, payload: struct.pack("!BQ", flags, capture) + payload,
        st.sampled_from([0, FLAG_KEY, FLAG_CONFIG, 3, 0x80]),
        st.integers(0, 2**64 - 1),
        st.binary(max_size=30),
    ),
    st.sampled_from(
        [
            b'{"type":"meta","codec":"h264"}',
            b'{"type":"keyframe-request"}',
            b"[]",
            b"\xff\xfe",
            struct.pack("!H", 1000),
            struct.pack("!H", 1005),
            struct.pack("!H", 4409) + b"bye",
            struct.pack("!H", 999),
            b"\x03",
        ]
    ),
)


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    """One client frame, mostly well formed, sometimes not (bad opcodes, RSV bits,
    unmasked, lying lengths)."""
    opcode = draw(
        st.sampled_from(
            [OP_BINARY, OP_BINARY, OP_TEXT, OP_CONTINUATION, OP_CLOSE, OP_PING, OP_PONG, 3, 11]
        )
    )
    payload = draw(_payloads)
    fin = draw(st.booleans()) if opcode < 8 else draw(st.sampled_from([True, True, False]))
    rsv = draw(st.sampled_from([0, 0, 0, 0, 1, 4]))
    masked = draw(st.sampled_from([True] * 9 + [False]))
    claimed = draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, 2**63 - 1)))
    return client_frame(opcode, payload, fin=fin, rsv=rsv, masked=masked, claimed_length=claimed)


_streams = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.lists(_frames(), min_size=1, max_size=12).map(b"".join),
)

_actions = st.lists(
    st.one_of(
        st.tuples(st.just("data"), _streams),
        st.tuples(st.just("advance"), st.sampled_from([0.1, 1.0, 5.0, 12.0])),
        st.tuples(st.just("pause"), st.none()),
        st.tuples(st.just("resume"), st.none()),
    ),
    min_size=1,
    max_size=8,
)


def _chunks(data: bytes, cut: int) -> list[bytes]:
    """Split ``data`` into reads of at most ``cut`` bytes."""
    return [data[index : index + cut] for index in range(0, len(data), cut)] or [b""]


def _check_peer_outcome(peer: Peer) -> None:
    """The peer sees well-formed frames, ending open, with one proper close code, or
    aborted; never an internal error."""
    frames, _tail = parse_frames(peer.written[peer._frame_offset :])
    messages = assemble(frames)
    codes = [m.close_code for m in messages if m.kind == "close"]
    assert len(codes) <= 1, codes
    assert all(code in PROPER_CLOSE_CODES for code in codes), codes
    closes = [index for index, m in enumerate(messages) if m.kind == "close"]
    if closes:
        # Nothing but control frames after the close frame.
        assert all(m.kind in ("ping", "pong") for m in messages[closes[0] + 1 :]), messages
    for message in messages:
        if message.kind == "text":
            assert isinstance(message.json, dict)


def _run_actions(relay: Relay, target: Peer, actions: list[tuple[str, Any]], cut: int) -> None:
    for action, value in actions:
        if action == "data":
            for chunk in _chunks(value, cut):
                target.send(chunk)
        elif action == "advance":
            relay.tick(value, step=0.5)
        elif target.transport.producer is not None and not target.lost:
            if action == "pause":
                target.transport.producer.pauseProducing()
            else:
                target.transport.producer.resumeProducing()
        relay.settle()


def _finish(relay: Relay) -> None:
    relay.settle()
    relay.disconnect_all()
    relay.tick(30, step=1.0)
    relay.assert_idle()


@given(actions=_actions, cut=st.sampled_from([1, 7, 4096]))
def test_garbage_into_a_publisher(actions: list[tuple[str, Any]], cut: int) -> None:
    """Random bytes and random frames into an upgraded publisher (a viewer watching):
    no unhandled error is logged, each connection ends open, closed with a proper code,
    or aborted, the viewer only ever gets well-formed v1 messages, and everything
    returns to idle afterwards."""
    with captured_log() as log:
        relay = Relay.with_options(
            max_message_bytes=4096, max_fragments_per_message=32, ping_interval=10,
            ping_timeout=5, publisher_idle_timeout=20, close_timeout=2,
            viewer_queue_bytes=2048,
        )
        viewer = relay.viewer()
        publisher = relay.publisher()
        _run_actions(relay, publisher, actions, cut)
        _check_peer_outcome(publisher)
        _check_peer_outcome(viewer)
        for message in viewer.all_messages():
            if message.kind == "binary":
                parse_media(message.payload)
        _finish(relay)
    assert not log.failures, log.describe_failures()


@given(actions=_actions, cut=st.sampled_from([1, 7, 4096]))
def test_garbage_into_a_viewer(actions: list[tuple[str, Any]], cut: int) -> None:
    """Random bytes and random frames into an upgraded viewer of a live stream: no
    unhandled error is logged, the viewer ends open, closed with a proper code, or
    aborted; the publisher is unaffected; everything returns to idle."""
    with captured_log() as log:
        relay = Relay.with_options(
            ping_interval=10, ping_timeout=5, close_timeout=2, viewer_stall_timeout=8,
            viewer_queue_bytes=2048, publisher_idle_timeout=1000,
        )
        publisher = relay.publisher()
        publisher.send(client_frame(OP_BINARY, encode_media(FLAG_KEY, 1, b"k" * 50)))
        viewer = relay.viewer()
        _run_actions(relay, viewer, actions, cut)
        publisher.send(client_frame(OP_BINARY, encode_media(0, 2, b"d" * 50)))
        _check_peer_outcome(viewer)
        # The publisher may have been aborted for not answering pings, nothing else.
        assert publisher.close_codes() == []
        _finish(relay)
    assert not log.failures, log.describe_failures()


@given(data=st.binary(max_size=400), cut=st.sampled_from([1, 13, 4096]))
def test_garbage_in_the_http_head(data: bytes, cut: int) -> None:
    """Random bytes before any upgrade: an HTTP answer or a closed connection, never an
    unhandled error, and nothing left behind after the handshake deadline."""
    with captured_log() as log:
        relay = Relay.with_options(handshake_timeout=2, close_timeout=1)
        peer = relay.connect()
        for prefix in (b"", b"GET /watch/cam HTTP/1.1\r\n"):
            if prefix:
                peer = relay.connect()
            for chunk in _chunks(prefix + data, cut):
                peer.send(chunk)
        relay.tick(3, step=0.5)
        relay.settle()
        for peer in relay.peers:
            assert peer.closing or peer.protocol is not None or peer.written.startswith(
                b"HTTP/1.1 "
            )
        _finish(relay)
    assert not log.failures, log.describe_failures()
