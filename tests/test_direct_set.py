"""The fan-out's direct set (streamrelay.fanout) in the network-free core: members get
each message from one builtin call, and whatever happens -- transports that fill up,
pings, text, drops, audio, leaving -- every viewer gets exactly the bytes, in exactly
the order, and is counted exactly as its queue's own path would have.

The connections here model the transport as the direct port sees it (a socket that
takes up to ``room`` bytes, a transport buffer behind it that pauses its producer past
64 KiB); the real sockets are in tests/test_direct_sockets.py.  The property test
runs the same events against connections with and without a direct port and asks for
identical results.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from streamrelay.config import RelayConfig
from streamrelay.streams import PublisherSession, Stream, StreamRegistry, ViewerSession
from streamrelay.viewer_queue import ViewerQueue
from streamrelay.wire import (
    FLAG_AUDIO,
    FLAG_CONFIG,
    FLAG_KEY,
    MediaMessage,
    encode_media,
    encode_text,
    parse_media,
)
from tests.test_streams import FakePublisher

HIGH_WATER = 64 * 1024


def wire_frame(payload: bytes, is_binary: bool) -> tuple[bool, bytes]:
    """Frames as the model's wire carries them: a length, the kind, the payload."""
    return (is_binary, struct.pack("!IB", len(payload), is_binary) + payload)


# The kinds on the model's wire besides text (0) and binary (1).
CLOSE = 8
PING = 9


def parse_wire(data: bytes) -> list[tuple[int, bytes]]:
    """The messages (kind, payload) in what a connection received, which must end on a
    message boundary."""
    messages = []
    offset = 0
    while offset < len(data):
        length, kind = struct.unpack_from("!IB", data, offset)
        offset += 5
        messages.append((kind, data[offset : offset + length]))
        offset += length
    assert offset == len(data)
    return messages


def tags(connection: ModelConnection) -> list[int]:
    """The capture times of the media a connection received, in order."""
    return [parse_media(p).capture_time_us for k, p in parse_wire(bytes(connection.wire)) if k == 1]


class ModelConnection:
    """A viewer connection: what the queue (ViewerSink) and the direct set (DirectPort)
    see of it.  Its socket takes up to ``room`` bytes; what it cannot take waits in the
    transport, which pauses the queue past 64 KiB and resumes it once empty.  With
    ``direct`` False it has no direct port: the queue's own path only."""

    def __init__(self, direct: bool) -> None:
        self.direct = direct
        self.wire = bytearray()
        self.held: list[bytes] = []
        self.room = 1 << 40
        self.producer_paused = False
        self.octets = 0
        self.sends = 0
        self.hook: Callable[[], None] | None = None
        self.queue: ViewerQueue | None = None
        self.closing = False
        # Runs at each send, before the socket takes anything (what else happens then).
        self.on_send: Callable[[], None] | None = None

    # -- the socket and the transport --------------------------------------------------

    def _socket_send(self, data: bytes) -> int:
        self.sends += 1
        if self.on_send is not None:
            self.on_send()
        if self.room == 0:
            raise BlockingIOError
        taken = min(self.room, len(data))
        self.wire += data[:taken]
        self.room -= taken
        return taken

    def transport_write(self, data: bytes) -> None:
        """``transport.write``: the watcher first, then buffered."""
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        if self.closing:
            return
        self.held.append(data)
        if sum(map(len, self.held)) > HIGH_WATER and not self.producer_paused:
            self.producer_paused = True
            assert self.queue is not None
            self.queue.pause_producing()

    def careful_write(self, data: bytes) -> bool:
        """DirectWriter.write: straight to the socket only while nothing is held."""
        if self.held or self.producer_paused or self.closing:
            self.transport_write(data)
            return False
        try:
            sent = self._socket_send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.transport_write(data[sent:])
            return False
        return True

    def drain(self, room: int = 1 << 40) -> None:
        """The client reads: the socket takes up to ``room`` more; the transport writes
        what it holds, and resumes its producer once empty."""
        self.room = room
        while self.held and self.room:
            data = self.held.pop(0)
            taken = min(self.room, len(data))
            self.wire += data[:taken]
            self.room -= taken
            if taken < len(data):
                self.held.insert(0, data[taken:])
        if not self.held and self.producer_paused:
            self.producer_paused = False
            assert self.queue is not None
            self.queue.resume_producing()

    def ping(self) -> None:
        """Autobahn's sendData (a ping): through the transport, counted on the wire."""
        data = struct.pack("!IB", 0, PING)
        self.octets += len(data)
        self.transport_write(data)

    # -- ViewerSink ---------------------------------------------------------------------

    def write_frame(self, frame: tuple[bool, bytes]) -> bool | None:
        if self.closing:
            return None
        self.octets += len(frame[1])
        return self.careful_write(frame[1])

    def stalled(self) -> None:
        pass

    def attached(self, queue: ViewerQueue) -> None:
        self.queue = queue
        if self.producer_paused:
            queue.pause_producing()

    def direct_port(self) -> ModelConnection | None:
        if self.direct and not self.held and not self.producer_paused and not self.closing:
            return self
        return None

    # -- DirectPort -----------------------------------------------------------------------

    @property
    def send(self) -> Callable[[bytes], int]:
        return self._socket_send

    def payload(self, frame: tuple[bool, bytes]) -> bytes:
        return frame[1]

    def hand_over(self, data: bytes) -> None:
        self.transport_write(data)

    def watch(self, hook: Callable[[], None] | None) -> None:
        self.hook = hook

    def sent_directly(self, octets: int) -> None:
        self.octets += octets

    def close(self) -> None:
        """The WebSocket starts closing (a close frame goes through the transport)."""
        self.transport_write(struct.pack("!IB", 0, CLOSE))
        self.closing = True


def media(flags: int, tag: int, size: int = 100) -> MediaMessage:
    """A media message identified by its capture time ``tag``."""
    return parse_media(encode_media(flags, tag, bytes([tag % 251]) * (size - 9)))


class Core:
    """A registry on a Clock with model connections (``direct``: with direct ports)."""

    def __init__(self, direct: bool, **overrides: Any) -> None:
        self.direct = direct
        self.clock = Clock()
        self.registry = StreamRegistry(RelayConfig(**overrides), self.clock, wire_frame)
        link = FakePublisher(clock=self.clock)
        session = self.registry.publish("cam", link)
        assert isinstance(session, PublisherSession)
        self.publisher = session
        self.connections: list[ModelConnection] = []
        self.sessions: list[ViewerSession] = []

    @property
    def stream(self) -> Stream:
        return self.registry.streams["cam"]

    def watch(self, audio: bool = False) -> ModelConnection:
        connection = ModelConnection(self.direct)
        session = self.registry.watch("cam", connection, audio=audio)
        assert isinstance(session, ViewerSession)
        self.connections.append(connection)
        self.sessions.append(session)
        return connection

    def queue(self, index: int) -> ViewerQueue:
        return self.sessions[index].queue


# -- the members' loop ---------------------------------------------------------------------


def test_a_member_costs_one_builtin_call_per_message() -> None:
    """Once its viewers are members, a message reaches each of them through one call of
    its socket's send and nothing else (the calls seen by a profile hook)."""
    core = Core(direct=True)
    connections = [core.watch() for _ in range(5)]
    for connection in connections:
        # The socket's own send is a builtin: here, len (it "takes" every byte).
        connection._socket_send = len  # type: ignore[method-assign,assignment]
    core.publisher.media(media(FLAG_KEY, 1))
    core.publisher.media(media(0, 2))
    assert core.stream.video_out.members == 5
    calls: list[str] = []

    def hook(frame: Any, event: str, argument: Any) -> None:
        if event == "call":
            calls.append(frame.f_code.co_name)
        elif event == "c_call":
            calls.append(f"builtin {argument.__name__}")

    message = media(0, 3)
    stream = core.stream
    sys.setprofile(hook)
    try:
        stream.publish_media(message)
    finally:
        sys.setprofile(None)
    loop = calls[calls.index("_send_direct") + 1 :]
    assert loop[:2] == ["payload", "builtin len"]  # the wire bytes, and their length
    assert loop[2:7] == ["builtin len"] * 5
    assert "missed" not in loop and "send_media" not in loop and "write_frame" not in loop
    assert core.queue(0).sent_messages == 4  # the status, the KEY and two deltas


def test_viewers_join_after_a_whole_write_and_leave_on_any_transport_write() -> None:
    """A viewer becomes a member after a message went out whole on its queue's fast
    path; a ping (any write through the transport) takes it out before it is
    written; the next message goes through its queue, the one after again direct; the
    viewer gets everything in order."""
    core = Core(direct=True)
    connection = core.watch()
    core.publisher.media(media(FLAG_KEY, 1))
    assert core.stream.video_out.members == 0  # the KEY resumed the queue
    core.publisher.media(media(0, 2))
    assert core.stream.video_out.members == 1
    sends = connection.sends
    core.publisher.media(media(0, 3))
    assert connection.sends == sends + 1
    connection.ping()
    assert core.stream.video_out.members == 0 and connection.hook is None
    core.publisher.media(media(0, 4))  # behind the ping, in the transport
    assert core.stream.video_out.members == 0
    connection.drain()
    core.publisher.media(media(0, 5))
    assert core.stream.video_out.members == 1
    core.publisher.media(media(0, 6))
    assert tags(connection) == [1, 2, 3, 4, 5, 6]
    kinds = [kind for kind, _payload in parse_wire(bytes(connection.wire))]
    assert kinds == [0, 1, 1, 1, PING, 1, 1, 1]


def test_a_partial_send_hands_the_rest_to_the_transport_and_leaves() -> None:
    """The socket takes part of a message: the rest goes to the transport, the viewer
    leaves the set; the next message queues behind it; the bytes arrive whole and in
    order, and each message is counted once."""
    core = Core(direct=True)
    connection = core.watch()
    for tag in (1, 2):
        core.publisher.media(media(FLAG_KEY if tag == 1 else 0, tag))
    assert core.stream.video_out.members == 1
    connection.room = 50
    core.publisher.media(media(0, 3, 1000))
    assert core.stream.video_out.members == 0
    assert connection.held and sum(map(len, connection.held)) == 1005 - 50
    core.publisher.media(media(0, 4))
    connection.drain()
    received = parse_wire(bytes(connection.wire))
    assert tags(connection) == [1, 2, 3, 4]
    queue = core.queue(0)
    assert queue.sent_messages == 5  # the status too
    assert queue.bytes_sent == sum(len(p) for _b, p in received)
    assert connection.octets == len(connection.wire)


def test_a_full_socket_hands_everything_to_the_transport() -> None:
    """EAGAIN from a member's socket: all of the message goes to the transport."""
    core = Core(direct=True)
    connection = core.watch()
    for tag in (1, 2):
        core.publisher.media(media(FLAG_KEY if tag == 1 else 0, tag))
    connection.room = 0
    core.publisher.media(media(0, 3))
    assert core.stream.video_out.members == 0
    assert connection.held == [wire_frame(media(0, 3).data, True)[1]]
    connection.drain()
    core.publisher.media(media(0, 4))
    assert core.stream.video_out.members == 1
    assert tags(connection) == [1, 2, 3, 4]


def test_a_viewer_shed_during_the_loop_before_its_turn_gets_its_queues_verdict() -> None:
    """A member leaves during the members' loop before its turn (another viewer's send
    made it skip, as a shed by the budget would): its queue decides about the message
    (skipping: dropped and counted), and it is not counted as sent."""
    core = Core(direct=True)
    core.watch()
    core.watch()
    for tag in (1, 2):
        core.publisher.media(media(FLAG_KEY if tag == 1 else 0, tag))
    entries = core.stream.video_out._entries
    early = entries[0][1].port
    late_queue = entries[1][1].queue
    late = entries[1][1].port
    assert isinstance(early, ModelConnection) and isinstance(late, ModelConnection)
    sent_before = late_queue.sent_messages
    dropped_before = late_queue.dropped_total

    early.on_send = late_queue.shed
    core.publisher.media(media(0, 3))
    assert late_queue.skipping
    assert late_queue.sent_messages == sent_before
    assert late_queue.dropped_total == dropped_before + 1
    assert tags(early) == [1, 2, 3]
    assert tags(late) == [1, 2]
    assert core.stream.video_out.members == 1


def test_a_viewer_that_leaves_after_its_turn_is_counted_once() -> None:
    """A member taken out during the members' loop after it had the message whole
    (another viewer's write shed it) is counted for that message exactly once."""
    core = Core(direct=True)
    core.watch()
    core.watch()
    for tag in (1, 2):
        core.publisher.media(media(FLAG_KEY if tag == 1 else 0, tag))
    entries = core.stream.video_out._entries
    first_queue, last_connection = entries[0][1].queue, entries[1][1].port
    assert isinstance(last_connection, ModelConnection)
    sent_before = first_queue.sent_messages
    bytes_before = first_queue.bytes_sent

    last_connection.on_send = first_queue.shed
    message = media(0, 3)
    core.publisher.media(message)
    assert first_queue.sent_messages == sent_before + 1
    assert first_queue.bytes_sent == bytes_before + message.size
    assert core.stream.video_out.members == 1


def test_audio_goes_only_to_viewers_that_asked_for_it() -> None:
    """Audio members are audio viewers: a viewer without audio gets none, direct or not;
    an audio viewer gets audio and video interleaved as published."""
    core = Core(direct=True)
    plain, hearing = core.watch(), core.watch(audio=True)
    publish = core.publisher.media
    publish(media(FLAG_KEY, 1000))
    for step in range(1, 6):
        publish(media(FLAG_AUDIO, 1000 + step * 20 - 10, 60))
        publish(media(0, 1000 + step * 20))
    assert core.stream.audio_out.members == 1 and core.stream.video_out.members == 2
    assert tags(plain) == [1000, 1020, 1040, 1060, 1080, 1100]
    assert tags(hearing) == [1000, 1010, 1020, 1030, 1040, 1050, 1060, 1070, 1080, 1090, 1100]
    queue = core.queue(1)
    assert queue.audio_last_us == 1090


def test_older_audio_is_dropped_for_members_that_had_newer() -> None:
    """Audio older than what a member had (a publisher clock going back) is not sent
    to it: the queues decide, as without the direct set."""
    core = Core(direct=True)
    hearing = core.watch(audio=True)
    publish = core.publisher.media
    publish(media(FLAG_KEY, 1000))
    for capture in (1010, 1030, 1050):
        publish(media(FLAG_AUDIO, capture, 60))
    assert core.stream.audio_out.members == 1
    publish(media(FLAG_AUDIO, 1040, 60))
    publish(media(FLAG_AUDIO, 1070, 60))
    assert tags(hearing) == [1000, 1010, 1030, 1050, 1070]


def test_a_new_publisher_with_an_earlier_clock_gets_the_direct_loop_again() -> None:
    """A publisher replaced by one whose capture clock is far behind: once its KEY is
    in, the audio viewers are members again and its audio goes by the members' loop."""
    core = Core(direct=True)
    hearing = core.watch(audio=True)
    publish = core.publisher.media
    publish(media(FLAG_KEY, 5_000_000))
    for capture in (5_000_010, 5_000_030, 5_000_050):
        publish(media(FLAG_AUDIO, capture, 60))
    assert core.stream.audio_out.members == 1
    replacement = core.registry.publish("cam", FakePublisher(clock=core.clock))
    assert isinstance(replacement, PublisherSession)
    assert core.stream.audio_out.members == 0
    replacement.media(media(FLAG_KEY, 1000))
    replacement.media(media(FLAG_AUDIO, 1010, 60))
    assert core.stream.audio_out.members == 1
    looped = core.stream.audio_out.messages
    replacement.media(media(FLAG_AUDIO, 1030, 60))
    assert core.stream.audio_out.messages == looped + 1
    assert tags(hearing)[-4:] == [5_000_050, 1000, 1010, 1030]


def test_a_switch_after_direct_audio_announces_the_same_gap() -> None:
    """A member's queue keeps the capture times of the last two audio messages (a
    rendition switch measures its gap with them): settled from the set's loop, they
    give the same ``dropped`` notice as the queue's own path would."""
    wires = []
    for direct in (True, False):
        core = Core(direct=direct)
        hearing = core.watch(audio=True)
        publish = core.publisher.media
        publish(media(FLAG_KEY, 1000))
        for capture in range(1010, 1200, 20):
            publish(media(FLAG_AUDIO, capture, 60))
        assert core.stream.audio_out.members == (1 if direct else 0)
        queue = core.stream.release_viewer(hearing)
        assert queue is not None
        # Another rendition's KEY and audio, as streamrelay.adaptive hands them over.
        key, later = media(FLAG_KEY, 1300), media(FLAG_AUDIO, 1330, 60)
        queue.switch_source(
            None,
            key.info(),
            wire_frame(key.data, True),
            [(later.info(), wire_frame(later.data, True))],
        )
        wires.append(bytes(hearing.wire))
    assert wires[0] == wires[1]
    texts = [payload for kind, payload in parse_wire(wires[0]) if kind == 0]
    assert texts[-1] == encode_text({"type": "dropped", "audio": 6})


def test_leaving_the_stream_or_closing_takes_a_viewer_out() -> None:
    """A detach (the connection closed) and a close frame take members out; nothing is
    sent to them afterwards, and the counters the stream keeps for viewers that left
    are what they were sent."""
    core = Core(direct=True)
    first, second, third = core.watch(), core.watch(), core.watch()
    for tag in (1, 2, 3):
        core.publisher.media(media(FLAG_KEY if tag == 1 else 0, tag))
    assert core.stream.video_out.members == 3
    second.close()
    second.drain()
    assert core.stream.video_out.members == 2
    sent = core.queue(2).sent_messages
    core.sessions[2].close()
    assert core.stream.video_out.members == 1
    assert core.stream.messages_out == sent
    core.publisher.media(media(0, 4))
    assert tags(first) == [1, 2, 3, 4]
    assert tags(second) == [1, 2, 3]
    assert parse_wire(bytes(second.wire))[-1] == (CLOSE, b"")
    assert tags(third) == [1, 2, 3]
    assert list(core.stream.video_out.rest) == [core.queue(1)]


# -- the same run with and without direct ports ------------------------------------------------

_EVENT = st.one_of(
    st.tuples(
        st.sampled_from(["delta", "delta", "delta", "key", "config"]), st.integers(9, 40_000)
    ),
    st.tuples(st.just("audio"), st.integers(20, 400)),
    st.tuples(
        st.sampled_from(["ping", "choke", "drain", "text", "shed", "leave"]), st.integers(0, 7)
    ),
    st.tuples(st.sampled_from(["meta", "old-audio", "new-source", "join"]), st.just(0)),
)


def _run(direct: bool, events: list[tuple[str, int]]) -> tuple[Core, list[Any]]:
    core = Core(direct=direct, viewer_queue_bytes=200_000, max_buffered_bytes=1_000_000)
    for index in range(4):
        core.watch(audio=index % 2 == 1)
    capture = 1000
    members = 0
    # From a KEY and two deltas on, the viewers that keep up are members: the events
    # then mostly hit the members' loop.
    for kind, value in [("key", 500), ("delta", 500), ("delta", 500), *events]:
        capture += 10
        live = [
            index
            for index, session in enumerate(core.sessions)
            if not session.closed and not core.connections[index].closing
        ]
        target = live[value % len(live)] if live else None
        if kind in ("delta", "key", "config"):
            flags = {"delta": 0, "key": FLAG_KEY, "config": FLAG_CONFIG}[kind]
            core.publisher.media(media(flags, capture, value))
        elif kind == "audio":
            core.publisher.media(media(FLAG_AUDIO, capture, value))
        elif kind == "old-audio":
            core.publisher.media(media(FLAG_AUDIO, capture - 25, 60))
        elif kind == "meta":
            core.publisher.meta(encode_text({"type": "meta", "n": capture}))
        elif kind == "new-source":
            publisher = core.registry.publish("cam", FakePublisher(clock=core.clock))
            assert isinstance(publisher, PublisherSession)
            core.publisher = publisher
        elif kind == "join":
            core.watch(audio=capture % 20 == 0)
        elif target is None:
            continue
        elif kind == "ping":
            core.connections[target].ping()
        elif kind == "choke":
            core.connections[target].drain(room=value * 7_000)
        elif kind == "drain":
            core.connections[target].drain()
        elif kind == "text":
            core.sessions[target].send_text(encode_text({"type": "time", "n": capture}))
        elif kind == "shed":
            core.queue(target).shed()
        elif kind == "leave":
            if value % 2:
                core.connections[target].close()
            else:
                core.sessions[target].close()
        members += core.stream.video_out.members + core.stream.audio_out.members
    for connection in core.connections:
        if not connection.closing:
            connection.drain()
    outcome: list[Any] = []
    for connection, viewer in zip(core.connections, core.sessions, strict=True):
        queue = viewer.queue
        outcome.append(
            (
                bytes(connection.wire),
                queue.sent_messages,
                queue.bytes_sent,
                connection.octets,
                queue.dropped_total,
                queue.audio_dropped_total,
                queue.skipping,
                queue.backlog_bytes,
            )
        )
    outcome.append((core.stream.messages_out, core.stream.bytes_out, core.stream.dropped))
    outcome.append(members > 0 if direct else None)
    return core, outcome


@settings(deadline=None)
@given(events=st.lists(_EVENT, max_size=60))
def test_direct_sets_change_nothing_a_viewer_or_a_counter_sees(
    events: list[tuple[str, int]],
) -> None:
    """Whatever happens, each viewer receives the same bytes in the same order, and
    every counter (messages and bytes sent, wire octets, drops, backlog, the stream's
    totals) is the same as when every message goes through the queues."""
    _core, with_direct = _run(True, events)
    _core, without = _run(False, events)
    assert with_direct[:-1] == without[:-1]
    for connection in _core.connections:
        if not connection.closing:  # a closing one is never drained here
            parse_wire(bytes(connection.wire))


def test_the_property_run_uses_the_direct_set() -> None:
    """The property test's runs do put viewers in the direct set (it would prove
    nothing otherwise)."""
    events = [("key", 500), ("delta", 500), ("delta", 500), ("audio", 60), ("audio", 60)]
    core, outcome = _run(True, events)
    assert outcome[-1] is True
    assert core.stream.video_out.members == 4
    assert core.stream.audio_out.members == 2


def _two_members() -> tuple[Core, ModelConnection, ModelConnection]:
    """A stream with two viewers that are both members of its video set."""
    core = Core(direct=True)
    core.watch()
    core.watch()
    for tag in (1, 2):
        core.publisher.media(media(FLAG_KEY if tag == 1 else 0, tag))
    entries = core.stream.video_out._entries
    assert core.stream.video_out.members == 2
    first, second = entries[0][1].port, entries[1][1].port
    assert isinstance(first, ModelConnection) and isinstance(second, ModelConnection)
    return core, first, second


def test_a_member_released_before_its_turn_does_not_get_the_old_streams_message() -> None:
    """A member that leaves the stream during the members' loop, before its turn (a
    rendition switch releases it), does not get the message of the stream it left."""
    core, first, second = _two_members()
    stream = core.stream

    def release() -> None:
        stream.release_viewer(second)

    first.on_send = release
    core.publisher.media(media(0, 3))
    assert second not in stream.viewers
    assert tags(second) == [1, 2]
    assert tags(first) == [1, 2, 3]
