"""The direct-write seam (streamrelay.fastwrite), on real TCP sockets and real (never
run, never installed) reactor instances: which transports get direct writes, and every
case of a direct write -- empty transport, data already buffered, partial send, a full
socket, a reset peer, a closing or aborted transport -- ending in the same bytes, in
the same order, as the transport's own write would give; and the watch that takes a
viewer out of the fan-out's direct set before anything changes its transport."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from twisted.internet import abstract, error, tcp
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.pollreactor import PollReactor
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import directlyProvides

from streamrelay.fastwrite import (
    DirectWriter,
    TransportWriter,
    supports_direct_writes,
    writer_for,
)

ReactorFactory = Callable[[], Any]


def _epoll_reactor() -> Any:
    from twisted.internet.epollreactor import EPollReactor

    return EPollReactor()


POSIX_REACTORS: list[Any] = [
    pytest.param(SelectReactor, id="select"),
    pytest.param(PollReactor, id="poll"),
]
if hasattr(__import__("select"), "epoll"):
    POSIX_REACTORS.append(pytest.param(_epoll_reactor, id="epoll"))


def _dispose(reactor: Any) -> None:
    reactor.removeAll()
    waker = getattr(reactor, "waker", None)
    if waker is not None:
        waker.connectionLost(None)
    poller = getattr(reactor, "_poller", None)
    if poller is not None and hasattr(poller, "close"):
        poller.close()


class Recorder(Protocol):
    """Records what the transport reports."""

    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


class Pair:
    """A server-side ``tcp.Server`` on ``reactor`` and the client socket it talks to."""

    def __init__(self, reactor: Any, sndbuf: int | None = None, rcvbuf: int | None = None):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.peer = socket.socket()
        if rcvbuf is not None:
            self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.peer.connect(listener.getsockname())
        accepted, address = listener.accept()
        listener.close()
        if sndbuf is not None:
            accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.protocol = Recorder()
        # No listening port: tcp.Server only uses it for its repr.
        port: Any = None
        self.transport = tcp.Server(accepted, self.protocol, address, port, 1, reactor)
        self.protocol.makeConnection(self.transport)
        self.peer.setblocking(False)

    def read_available(self) -> bytes:
        """Everything the peer can read now."""
        chunks = []
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def buffered(self) -> int:
        """Bytes the transport holds."""
        transport: Any = self.transport
        return int(transport._tempDataLen + len(transport.dataBuffer) - transport.offset)

    def drain(self) -> bytes:
        """Run the transport's write turns, reading as the peer, until it holds nothing."""
        received = [self.read_available()]
        for _ in range(10_000):
            if not self.buffered():
                break
            self.transport.doWrite()
            received.append(self.read_available())
        assert not self.buffered()
        received.append(self.read_available())
        return b"".join(received)

    def close(self) -> None:
        """Close both ends without running the reactor."""
        self.peer.close()
        if self.transport.connected:
            self.transport.connectionLost(Failure(error.ConnectionDone()))


@pytest.fixture(params=POSIX_REACTORS)
def reactor(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh instance of each POSIX reactor: never installed, never run."""
    made = request.param()
    yield made
    _dispose(made)


@pytest.fixture
def pair(reactor: Any) -> Iterator[Pair]:
    """A connected transport on ``reactor``."""
    made = Pair(reactor)
    yield made
    made.close()


# -- which transports ---------------------------------------------------------------------


def test_plain_tcp_server_on_posix_reactors_writes_directly(pair: Pair) -> None:
    """A plain tcp.Server of the epoll, poll or select reactor gets a DirectWriter."""
    assert supports_direct_writes(pair.transport)
    assert isinstance(writer_for(pair.transport), DirectWriter)


def test_string_transport_uses_the_public_path() -> None:
    """A test transport (anything but tcp.Server) keeps transport.write."""
    transport = StringTransport()
    writer = writer_for(transport)
    assert isinstance(writer, TransportWriter)
    writer.write(b"abc")
    assert transport.value() == b"abc"


def test_tls_transports_use_the_public_path(pair: Pair) -> None:
    """startTLS (TLS flag, ISSLTransport) means bytes must go through TLS: no direct
    writes; a writer made before it falls back per write."""
    writer = writer_for(pair.transport)
    directlyProvides(pair.transport, ISSLTransport)
    assert not supports_direct_writes(pair.transport)
    assert isinstance(writer_for(pair.transport), TransportWriter)
    transport: Any = pair.transport
    # After startTLS the transport's protocol is the TLS layer, which gets every write.
    through_tls: list[bytes] = []
    protocol: Any = pair.protocol
    protocol.write = through_tls.append
    transport.TLS = True
    try:
        # The flag alone routes the write to the transport, hence to TLS.
        assert writer.write(b"x") is False
    finally:
        transport.TLS = False
    assert through_tls == [b"x"]
    assert pair.read_available() == b""


def test_asyncio_reactor_uses_the_public_path() -> None:
    """The asyncio reactor's TCP transports are tcp.Server too, but only the epoll, poll
    and select reactors get direct writes."""
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    loop = asyncio.new_event_loop()
    try:
        made = AsyncioSelectorReactor(loop)
        pair = Pair(made)
        try:
            assert not supports_direct_writes(pair.transport)
            assert isinstance(writer_for(pair.transport), TransportWriter)
        finally:
            pair.close()
            made.removeAll()
    finally:
        loop.close()


def test_subclasses_of_tcp_server_use_the_public_path(reactor: Any) -> None:
    """Only tcp.Server itself: a subclass (unix.Server, a TLS or test variant) may write
    differently."""

    class Custom(tcp.Server):
        pass

    pair = Pair(reactor)
    try:
        pair.transport.__class__ = Custom
        assert not supports_direct_writes(pair.transport)
    finally:
        pair.transport.__class__ = tcp.Server
        pair.close()


def test_missing_buffer_state_falls_back(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffer attributes are not public API: if a Twisted release renames them, the
    writer is transport.write."""
    transport: Any = pair.transport
    monkeypatch.delattr(transport, "_tempDataLen")
    assert not supports_direct_writes(transport)
    assert isinstance(writer_for(transport), TransportWriter)
    monkeypatch.undo()
    assert supports_direct_writes(transport)
    monkeypatch.delattr(abstract.FileDescriptor, "dataBuffer")
    if "dataBuffer" in vars(transport):
        monkeypatch.delattr(transport, "dataBuffer")
    assert not supports_direct_writes(transport)
    monkeypatch.undo()
    monkeypatch.setattr(transport, "_tempDataLen", "0")
    assert not supports_direct_writes(transport)


# -- what a direct write does ---------------------------------------------------------


def test_empty_transport_sends_now_and_never_watches(pair: Pair, reactor: Any) -> None:
    """With nothing buffered, the bytes are in the kernel before write returns and the
    reactor is not asked to watch for writability."""
    writer = writer_for(pair.transport)
    assert writer.write(b"hello") is True
    assert pair.buffered() == 0
    assert pair.transport not in reactor.getWriters()
    assert pair.read_available() == b"hello"


def test_buffered_data_is_never_overtaken(pair: Pair) -> None:
    """What the transport holds goes first; later writes queue behind it until it has
    drained, then go direct again."""
    writer = writer_for(pair.transport)
    pair.transport.write(b"first,")
    assert writer.write(b"second,") is False
    assert writer.write(b"third,") is False
    assert pair.drain() == b"first,second,third,"
    assert writer.write(b"fourth") is True
    assert pair.read_available() == b"fourth"


def test_partial_send_hands_the_rest_to_the_transport(reactor: Any) -> None:
    """A socket that takes part of the bytes: the rest is buffered by the transport (and
    the reactor watches for writability); the peer gets every byte once, in order."""
    pair = Pair(reactor, sndbuf=4096, rcvbuf=4096)
    try:
        payload = bytes(range(256)) * 4096  # 1 MiB, larger than both socket buffers
        writer = writer_for(pair.transport)
        assert writer.write(payload) is False
        held = pair.buffered()
        assert 0 < held < len(payload)
        assert pair.transport in reactor.getWriters()
        tail = b"-tail"
        assert writer.write(tail) is False
        # A write turn while the peer reads nothing: the transport's list is joined
        # into its byte buffer, which it has only partly sent.
        pair.transport.doWrite()
        transport: Any = pair.transport
        assert transport._tempDataLen == 0 and len(transport.dataBuffer) > transport.offset
        assert writer.write(b"-more") is False
        assert pair.drain() == payload + tail + b"-more"
        assert pair.transport not in reactor.getWriters()
    finally:
        pair.close()


def test_a_full_socket_hands_everything_to_the_transport(reactor: Any) -> None:
    """EAGAIN on the first byte: all of it is buffered by the transport."""
    pair = Pair(reactor, sndbuf=4096, rcvbuf=4096)
    try:
        sock: Any = pair.transport.getHandle()
        filler = bytearray()
        while True:
            try:
                filler += b"f" * sock.send(b"f" * 65536)
            except BlockingIOError:
                break
        writer = writer_for(pair.transport)
        assert writer.write(b"after") is False
        assert pair.buffered() == len(b"after")
        assert pair.drain() == bytes(filler) + b"after"
    finally:
        pair.close()


def test_a_reset_peer_is_reported_by_the_transport(reactor: Any) -> None:
    """ECONNRESET/EPIPE from a direct send: the bytes go to the transport, whose own
    write turn meets the error and reports the connection lost as it always does."""
    pair = Pair(reactor)
    try:
        pair.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pair.peer.close()
        writer = writer_for(pair.transport)
        results = [writer.write(b"x" * 1000) for _ in range(3)]
        # The reset may only be seen by the second send; from then on the transport
        # holds the bytes.
        assert results[-1] is False
        assert pair.buffered() > 0
        assert isinstance(pair.transport.doWrite(), error.ConnectionLost)
    finally:
        if pair.transport.connected:
            pair.transport.connectionLost(Failure(error.ConnectionLost()))


def test_a_closing_transport_gets_the_bytes(pair: Pair) -> None:
    """After loseConnection the transport decides (it flushes what it has, then closes):
    a write is handed to it, not sent past it."""
    writer = writer_for(pair.transport)
    pair.transport.loseConnection()
    assert writer.write(b"late") is False
    assert pair.buffered() == len(b"late")


def test_an_aborted_transport_sends_nothing_more(pair: Pair) -> None:
    """After abortConnection nothing more reaches the peer, as with transport.write."""
    writer = writer_for(pair.transport)
    pair.transport.abortConnection()
    assert writer.write(b"never") is False
    assert pair.read_available() == b""


def test_a_half_closed_transport_is_left_to_itself(pair: Pair) -> None:
    """After loseWriteConnection the transport owns the write side."""
    writer = writer_for(pair.transport)
    pair.transport.loseWriteConnection()
    assert writer.write(b"late") is False
    assert pair.read_available() == b""


class SendSpy:
    """Stands in for a writer's socket: records what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)


def test_a_lost_connection_writes_nothing(pair: Pair) -> None:
    """Once the connection is gone the write is the transport's (which drops it); the
    socket is not even tried."""
    writer = writer_for(pair.transport)
    assert isinstance(writer, DirectWriter)
    spy = SendSpy()
    cast(Any, writer)._socket = spy
    pair.transport.connectionLost(Failure(error.ConnectionDone()))
    assert writer.write(b"gone") is False
    assert spy.sent == []
    assert pair.protocol.lost


def test_a_paused_producer_keeps_the_public_path(pair: Pair) -> None:
    """While the transport has its producer paused, bytes go through the transport."""
    transport: Any = pair.transport
    writer = writer_for(transport)
    transport.producerPaused = True
    try:
        assert writer.write(b"held") is False
        assert pair.buffered() == len(b"held")
    finally:
        transport.producerPaused = False
    assert pair.drain() == b"held"


# -- the watch for the fan-out's direct set -------------------------------------------


def _write(transport: Any) -> None:
    transport.write(b"x")


def _write_sequence(transport: Any) -> None:
    transport.writeSequence([b"x", b"y"])


def _lose(transport: Any) -> None:
    transport.loseConnection()


def _half_close(transport: Any) -> None:
    transport.loseWriteConnection()


def _abort(transport: Any) -> None:
    transport.abortConnection()


def _lost(transport: Any) -> None:
    transport.connectionLost(Failure(error.ConnectionDone()))


def _stop(transport: Any) -> None:
    transport.stopProducing()


@pytest.mark.parametrize(
    "change", [_write, _write_sequence, _lose, _half_close, _abort, _lost, _stop]
)
def test_the_watcher_hears_of_every_change_before_it_happens(
    pair: Pair, change: Callable[[Any], None]
) -> None:
    """A watched transport calls its watcher once, before a write, a close of any kind
    or the loss is carried out (the transport is still fit for direct sends then); an
    unwatched one calls nothing."""
    writer = writer_for(pair.transport)
    assert isinstance(writer, DirectWriter)
    seen: list[bool] = []
    writer.watch(lambda: seen.append(writer.ready()))
    change(pair.transport)
    assert seen == [True]
    assert not writer.ready()
    # Once: the watcher is forgotten as it is called.
    if pair.transport.connected:
        pair.transport.write(b"z")
    assert seen == [True]


@pytest.mark.parametrize("change", [_write, _lose, _abort, _lost])
def test_a_failing_watcher_is_logged_and_the_change_still_happens(
    pair: Pair, change: Callable[[Any], None]
) -> None:
    """An error in the watcher is logged and contained: the write, close or loss it
    announced is still carried out (a skipped teardown would leak the socket)."""
    from tests.fakes import captured_log

    writer = writer_for(pair.transport)
    assert isinstance(writer, DirectWriter)

    def broken() -> None:
        raise ValueError("broken watcher")

    writer.watch(broken)
    with captured_log() as capture:
        change(pair.transport)
    assert [event.get("log_format") for event in capture.failures] == [
        "Error while a viewer left the direct set"
    ]
    if change is _write:
        assert pair.transport.dataBuffer or pair.transport._tempDataLen
    elif change is _lost:
        assert not pair.transport.connected
    else:
        assert pair.transport.disconnecting or pair.transport._aborting


def test_a_watched_transport_is_still_a_plain_tcp_server(pair: Pair) -> None:
    """The watch changes the transport's class to a subclass of tcp.Server with the
    same layout: still direct-writable, still TCP, not TLS, and the watcher is stored
    only while set."""
    writer = writer_for(pair.transport)
    assert isinstance(pair.transport, tcp.Server)
    assert supports_direct_writes(pair.transport)
    assert "_streamrelay_watcher" not in vars(pair.transport)
    assert isinstance(writer, DirectWriter)
    writer.watch(lambda: None)
    assert "_streamrelay_watcher" in vars(pair.transport)
    writer.watch(None)
    assert "_streamrelay_watcher" not in vars(pair.transport)
    assert writer.write(b"direct") is True
    assert pair.read_available() == b"direct"
