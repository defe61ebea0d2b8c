"""The fan-out's direct set on real loopback sockets: the relay's real Site,
RelayChannel and Autobahn protocols, each viewer on a ``tcp.Server`` of a poll reactor
that is never run (its write turns are made here, as in tests/test_fastwrite.py), the
client end a plain socket read here.  Members get media by the socket's own ``send``;
pings, text, closes, partial sends, a full socket and a reset peer all keep every byte
in order, and every count right."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.pollreactor import PollReactor
from twisted.python.failure import Failure

from streamrelay.fastwrite import DirectWriter
from streamrelay.streams import Stream
from streamrelay.wire import FLAG_AUDIO, FLAG_CONFIG, FLAG_KEY, encode_media
from tests.fakes import HOST, Peer, Relay
from tests.support.frames import OP_PONG, Message, assemble, client_frame, parse_frames, text_frame
from tests.support.http import parse_response, request_head, upgrade_headers

# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


def media(flags: int, tag: int, size: int = 2000) -> bytes:
    """A media message identified by its capture time ``tag``."""
    return encode_media(flags, tag, bytes([tag % 251]) * (size - 9))


class SocketViewer:
    """A viewer of the relay on a real TCP connection."""

    def __init__(
        self,
        relay: Relay,
        reactor: Any,
        target: str = "/watch/cam",
        sndbuf: int | None = None,
        rcvbuf: int | None = None,
    ) -> None:
        self.reactor = reactor
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.client = socket.socket()
        if rcvbuf is not None:
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.client.connect(listener.getsockname())
        accepted, address = listener.accept()
        listener.close()
        accepted.setblocking(False)
        if sndbuf is not None:
            accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.client.setblocking(False)
        self.channel: Any = relay.site.buildProtocol(IPv4Address("TCP", *address))
        # No listening port: tcp.Server only uses it for its repr.
        port: Any = None
        self.transport: Any = tcp.Server(accepted, self.channel, address, port, 1, reactor)
        self.channel.makeConnection(self.transport)
        self.received = bytearray()
        self.eof = False
        self.channel.dataReceived(
            request_head("GET", target, upgrade_headers("streamrelay.v1", host=HOST))
        )
        self.pump()
        response = parse_response(bytes(self.received), until_close=True)
        assert response is not None and response.status == 101, response
        self.opened_at = len(self.received) - len(response.rest)
        assert isinstance(self.protocol._write, DirectWriter)

    @property
    def protocol(self) -> Any:
        """The viewer's WebSocket protocol."""
        return self.channel.upgraded

    def read(self) -> None:
        """Everything the client can read now."""
        while not self.eof and self.client.fileno() >= 0:
            try:
                chunk = self.client.recv(1 << 20)
            except BlockingIOError:
                return
            except ConnectionResetError:
                self.eof = True
                return
            if not chunk:
                self.eof = True
                return
            self.received += chunk

    def buffered(self) -> int:
        """Bytes the relay's transport holds."""
        transport = self.transport
        return int(transport._tempDataLen + len(transport.dataBuffer) - transport.offset)

    def pump(self) -> None:
        """Reactor turns for this connection, reading as the client meanwhile: the
        transport writes what it holds, and reports itself lost as the reactor would."""
        for _ in range(100_000):
            self.read()
            self.reactor.runUntilCurrent()
            if not self.transport.connected or self.transport not in self.reactor.getWriters():
                break
            outcome = self.transport.doWrite()
            if outcome is not None:
                self.reactor.removeWriter(self.transport)
                self.reactor.removeReader(self.transport)
                self.transport.connectionLost(Failure(outcome))
        self.read()

    def messages(self) -> list[Message]:
        """Every WebSocket message received since the 101."""
        frames, tail = parse_frames(bytes(self.received[self.opened_at :]))
        assert tail == b""
        return assemble(frames)

    def media(self) -> list[bytes]:
        """The binary messages received, in order."""
        return [message.payload for message in self.messages() if message.kind == "binary"]

    def close(self) -> None:
        """Close the client end and the transport (if still open), without a reactor."""
        self.client.close()
        if self.transport.connected:
            self.transport.connectionLost(Failure(ConnectionError("test over")))


@pytest.fixture
def reactor() -> Iterator[Any]:
    """A poll reactor that is never run (nor installed)."""
    made = PollReactor()
    yield made
    made.removeAll()
    made.waker.connectionLost(None)


class Setup:
    """A relay, its publisher (a fake connection) and socket viewers."""

    def __init__(self, reactor: Any, **options: Any) -> None:
        options.setdefault("ping_interval", 1000.0)
        self.relay = Relay.with_options(**options)
        self.reactor = reactor
        self.publisher: Peer = self.relay.publisher()
        self.viewers: list[SocketViewer] = []

    def watch(self, target: str = "/watch/cam", **keywords: Any) -> SocketViewer:
        viewer = SocketViewer(self.relay, self.reactor, target, **keywords)
        self.viewers.append(viewer)
        return viewer

    @property
    def stream(self) -> Stream:
        return self.relay.context.registry.streams["cam"]

    def publish(self, *messages: bytes) -> None:
        for message in messages:
            self.publisher.send(client_frame(0x2, message))

    def pump(self) -> None:
        for viewer in self.viewers:
            viewer.pump()

    def close(self) -> None:
        for viewer in self.viewers:
            viewer.close()


@pytest.fixture
def setup(reactor: Any) -> Iterator[Setup]:
    """A relay with a publisher of ``cam``."""
    made = Setup(reactor)
    yield made
    made.close()


def start(setup: Setup, viewers: int = 3) -> list[bytes]:
    """Viewers join, then CONFIG, KEY and two deltas (the viewers are members after
    them); the messages sent."""
    for _ in range(viewers):
        setup.watch()
    sent = [media(FLAG_CONFIG, 1, 40), media(FLAG_KEY, 2), media(0, 3), media(0, 4)]
    setup.publish(*sent[:2])
    setup.pump()
    setup.publish(*sent[2:])
    assert setup.stream.video_out.members == viewers
    return sent


def test_members_get_every_message_from_the_socket_send(setup: Setup) -> None:
    """Members' media goes straight to their socket (the transport never holds it nor
    watches for writability), byte for byte and in order."""
    sent = start(setup)
    for tag in range(5, 40):
        message = media(0, tag, 20_000)
        setup.publish(message)
        sent.append(message)
        for viewer in setup.viewers:
            assert viewer.buffered() == 0
            assert viewer.transport not in setup.reactor.getWriters()
            viewer.read()
    assert setup.stream.video_out.members == 3
    for viewer in setup.viewers:
        assert viewer.media() == sent


def test_a_ping_takes_a_member_out_and_the_order_holds(reactor: Any) -> None:
    """Autobahn's ping goes through the transport: the viewer leaves the set before it
    is written, the next message goes behind it through the queue, and once the
    transport has drained the viewer is a member again; every message in order."""
    setup = Setup(reactor, ping_interval=10.0, ping_timeout=10.0, publisher_idle_timeout=1000.0)
    try:
        sent = start(setup, viewers=2)
        setup.relay.clock.advance(10.0)
        assert setup.stream.video_out.members == 0
        assert all(viewer.buffered() for viewer in setup.viewers)
        later = [media(0, tag) for tag in range(5, 8)]
        setup.publish(later[0])
        assert setup.stream.video_out.members == 0
        setup.pump()
        setup.publish(*later[1:])
        assert setup.stream.video_out.members == 2
        for viewer in setup.viewers:
            viewer.read()
            kinds = [message.kind for message in viewer.messages()]
            assert kinds == ["text"] + ["binary"] * 4 + ["ping"] + ["binary"] * 3
            assert viewer.media() == sent + later
            ping = [m for m in viewer.messages() if m.kind == "ping"][0]
            viewer.channel.dataReceived(client_frame(OP_PONG, ping.payload))
    finally:
        setup.close()


def test_text_to_members_keeps_them_and_the_order(setup: Setup) -> None:
    """A meta from the publisher goes to members through their queue's careful write:
    in order, and they stay members (their transport held nothing)."""
    sent = start(setup)
    setup.publisher.send(text_frame({"type": "meta", "codec": "h264"}))
    assert setup.stream.video_out.members == 3
    setup.publish(media(0, 5))
    for viewer in setup.viewers:
        viewer.read()
        kinds = [message.kind for message in viewer.messages()]
        assert kinds == ["text"] + ["binary"] * 4 + ["text", "binary"]
        assert viewer.media() == [*sent, media(0, 5)]


def test_a_partial_send_hands_the_rest_to_the_transport(setup: Setup) -> None:
    """A member whose socket takes part of a message: the rest goes to the transport
    (which watches for writability), the viewer leaves; later messages queue behind
    it; the client gets every byte once, in order."""
    sent = start(setup, viewers=0)
    viewer = setup.watch(sndbuf=4096, rcvbuf=4096)
    viewer.pump()
    setup.publish(media(FLAG_KEY, 10), media(0, 11))
    assert setup.stream.video_out.members == 1
    big = media(0, 12, 1 << 20)
    setup.publish(big)
    assert setup.stream.video_out.members == 0
    assert 0 < viewer.buffered() < len(big)
    assert viewer.transport in setup.reactor.getWriters()
    setup.publish(media(0, 13))
    viewer.pump()
    assert viewer.media() == [*sent, media(FLAG_KEY, 10), media(0, 11), big, media(0, 13)]


def test_a_full_socket_hands_everything_to_the_transport(setup: Setup) -> None:
    """EAGAIN on a member's socket: all of the message goes to the transport."""
    start(setup, viewers=0)
    viewer = setup.watch(sndbuf=4096, rcvbuf=4096)
    viewer.pump()
    setup.publish(media(FLAG_KEY, 10), media(0, 11))
    assert setup.stream.video_out.members == 1
    viewer.read()
    before = len(viewer.received)
    sock = viewer.transport.getHandle()
    filler = 0
    while True:
        try:
            filler += sock.send(b"\0" * 65536)
        except BlockingIOError:
            break
    message = media(0, 12)
    setup.publish(message)
    assert setup.stream.video_out.members == 0
    assert viewer.buffered() == len(message) + 4  # the frame header: 2 + 2 length bytes
    viewer.pump()
    rest = bytes(viewer.received[before:])
    assert rest[:filler] == b"\0" * filler
    frames, tail = parse_frames(rest[filler:])
    assert tail == b"" and [frame.payload for frame in frames] == [message]


def test_a_reset_peer_is_reported_lost_once(setup: Setup) -> None:
    """A member whose peer reset the connection: the send's error hands the message to
    the transport, whose own write turn reports the loss, exactly once; the viewer is
    gone from the stream and the set."""
    start(setup, viewers=2)
    viewer = setup.viewers[0]
    losses: list[Failure] = []
    forward = viewer.channel.connectionLost

    def lost(reason: Failure) -> None:
        losses.append(reason)
        forward(reason)

    viewer.channel.connectionLost = lost
    viewer.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    viewer.client.close()
    for tag in range(5, 10):
        setup.publish(media(0, tag))
    assert setup.stream.video_out.members == 1
    viewer.pump()
    setup.publish(media(0, 10))
    viewer.pump()
    assert len(losses) == 1
    assert len(setup.stream.viewers) == 1 and setup.stream.video_out.members == 1
    setup.viewers[1].read()
    assert setup.viewers[1].media()[-1] == media(0, 10)


def test_closing_and_aborting_take_members_out(setup: Setup) -> None:
    """A close frame (the relay closing) and an abort take members out before the
    transport changes; nothing follows the close frame, and the aborted viewer gets
    nothing more."""
    start(setup, viewers=3)
    closing, aborted, staying = setup.viewers
    closing.protocol.close_with(1001, "going away")
    assert setup.stream.video_out.members == 2
    aborted.read()
    received = len(aborted.received)
    aborted.protocol.abort()
    assert setup.stream.video_out.members == 1
    setup.publish(media(0, 5))
    closing.pump()
    aborted.pump()
    assert [m.kind for m in closing.messages()][-1] == "close"
    assert closing.media()[-1] == media(0, 4)
    assert len(aborted.received) == received
    assert not aborted.transport.connected
    staying.read()
    assert staying.media()[-1] == media(0, 5)
    assert len(setup.stream.viewers) == 2  # the closing one waits for its peer's reply


def test_counts_match_what_went_on_the_wire(reactor: Any) -> None:
    """After a mixed run (members, pings, text, partial sends), each viewer's message
    and byte counts are what it received, its connection's wire octet count is every
    byte after the 101, and the stream keeps those counts when it leaves."""
    setup = Setup(
        reactor,
        ping_interval=5.0,
        ping_timeout=100.0,
        viewer_stall_timeout=1000.0,
        publisher_idle_timeout=1000.0,
    )
    try:
        start(setup, viewers=2)
        small = setup.watch(sndbuf=4096, rcvbuf=4096)
        peak = 0
        for tag in range(5, 30):
            size = 300_000 if tag % 7 == 0 else 3000
            setup.publish(media(FLAG_KEY if tag % 10 == 0 else 0, tag, size))
            peak = max(peak, setup.stream.video_out.members)
            if tag % 3 == 0:
                setup.publisher.send(text_frame({"type": "meta", "n": tag}))
            if tag % 4 == 0:
                setup.relay.clock.advance(5.0)
            if tag % 5 == 0:
                setup.pump()
            small.read()
        setup.pump()
        assert peak == 3
        queues = [viewer.protocol._queue for viewer in setup.viewers]
        for viewer, queue in zip(setup.viewers, queues, strict=True):
            messages = [m for m in viewer.messages() if m.kind in ("text", "binary")]
            assert queue.sent_messages == len(messages)
            assert queue.bytes_sent == sum(len(m.payload) for m in messages)
            octets = viewer.protocol.trafficStats.outgoingOctetsWireLevel
            assert octets == len(viewer.received) - viewer.opened_at
        expected = sum(queue.sent_messages for queue in queues)
        expected_bytes = sum(queue.bytes_sent for queue in queues)
        for viewer in setup.viewers:
            viewer.close()
        assert setup.stream.messages_out == expected
        assert setup.stream.bytes_out == expected_bytes
    finally:
        setup.close()


def test_audio_members_are_audio_viewers(setup: Setup) -> None:
    """Audio goes straight only to the viewers that asked for it; the others get none."""
    start(setup, viewers=1)
    hearing = setup.watch("/watch/cam?audio=1")
    sent = []
    for step in range(1, 6):
        sound = media(FLAG_AUDIO, 4 + step * 20 - 10, 200)
        picture = media(0, 4 + step * 20)
        setup.publish(sound, picture)
        sent += [sound, picture]
        setup.pump()
    assert setup.stream.audio_out.members == 1
    assert setup.stream.video_out.members == 2
    assert setup.viewers[0].media()[4:] == sent[1::2]
    assert hearing.media()[-6:] == sent[-6:]
