"""The direct-write seam: hand a prepared frame straight to the socket when the
connection's transport holds nothing, and the rest (or everything, anywhere else) to
``transport.write``; and the connection's *direct port* for the fan-out's members' loop
(:mod:`streamrelay.fanout`), which calls the socket's ``send`` and nothing else.

Why: Twisted's ``FileDescriptor.write`` only buffers; it asks the reactor to watch the
socket for writability (one ``epoll_ctl``), writes on the next reactor turn, then stops
watching (a second ``epoll_ctl``), and a message over its 64 KiB ``bufferSize`` also
pauses and resumes the connection's producer.  For a relay that writes the same
100 KB message to hundreds of viewers, that is most of the cost of a delivered
message.  When nothing is buffered, one ``send`` from here is what ``doWrite`` would
have done on the next turn, only sooner; the transport is never asked to watch.

Where: only a plain TCP server connection of Twisted's POSIX reactors (``epoll``,
``poll``, ``select``): exactly :class:`twisted.internet.tcp.Server`, not TLS (neither
``ssl:`` endpoints, whose transport is a TLS wrapper, nor ``startTLS``), not IOCP,
not the asyncio reactor, not a test transport.  Everywhere else the writer is the
transport's own ``write`` and there is no direct port (no direct set at all).

How the transport's state is read: ``FileDescriptor`` keeps what it has not sent in
``dataBuffer`` (from ``offset``) and ``_tempDataBuffer`` (``_tempDataLen`` bytes);
both empty means a write now cannot overtake anything.  These names are not public
API: :func:`writer_for` checks that they (and the flags below) exist with the expected
types and falls back to ``transport.write`` if not.  A direct write is skipped, and the
data handed to the transport, whenever the transport holds data, is not connected, is
closing (``loseConnection``, ``abortConnection``, half-close), has switched to TLS, or
has paused its producer.

What ``send`` may do: all of it sent -- done; part of it (the socket buffer filled) --
the rest goes to ``transport.write``, which buffers it, watches for writability and
pauses the producer as usual; nothing (``EAGAIN``/``EINTR``) -- all of it goes to
``transport.write``; any other error (``EPIPE``, ``ECONNRESET``, ...) -- all of it goes
to ``transport.write`` too, whose own ``send`` on the next turn meets the same error and
reports the connection lost the usual way, so the protocol sees exactly one
``connectionLost``.  ``write`` returns True only when the kernel took everything: the
viewer queue then knows nothing waits in the transport (its estimate of the transport's
buffer counts only the writes the transport kept).  The members' loop treats the
outcomes of its bare ``send`` the same way (:class:`streamrelay.fanout.Seat`).

The members' loop checks nothing per message: a connection is a member only while the
checks above would pass, and leaves first when anything may change that.  So
:class:`DirectWriter` turns the transport into a :class:`_WatchedServer` (the same
class with ``write``, ``writeSequence``, ``loseConnection``, ``loseWriteConnection``,
``abortConnection``, ``startTLS`` and ``connectionLost`` calling a watcher first; an
assignment of ``__class__``, legal between classes of one layout), and
:meth:`DirectWriter.watch` sets the watcher while the connection is a member: whoever
writes to or closes the transport (Autobahn's pings, pongs and close frames, a text
message, the rest of a partial send, the HTTP channel's shutdown, the reactor's loss
report) takes the viewer out of the set before the transport changes.  What the
transport does by itself only makes it fitter (a drained buffer, a resumed producer).

Segments: Autobahn turns ``TCP_NODELAY`` on for every connection, so a direct ``send``
goes out as ``doWrite``'s would.  What differs is batching: Twisted joins the writes of
one reactor turn into one ``send``, while direct writes make one ``send`` per message.
For the relay's traffic, one message per viewer per turn, that is the same number of
sends; and a joining viewer's burst (status, meta, the cached GOP) still goes out
joined, behind the 101 response that is then still in the transport's buffer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import tcp
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger

_log = Logger()

# The reactors whose TCP transports are FileDescriptors written with send() in doWrite.
_POSIX_REACTORS = (
    ("twisted.internet.epollreactor", "EPollReactor"),
    ("twisted.internet.pollreactor", "PollReactor"),
    ("twisted.internet.selectreactor", "SelectReactor"),
)

# The non-public FileDescriptor/tcp.Connection attributes a direct write reads, with
# the types they must have.
_TRANSPORT_STATE: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("dataBuffer", bytes),
    ("_tempDataLen", int),
    ("connected", (int, bool)),
    ("disconnecting", (int, bool)),
    ("_aborting", (int, bool)),
    ("_writeDisconnecting", (int, bool)),
    ("producerPaused", (int, bool)),
    ("TLS", (int, bool)),
)


def _posix_reactor_types() -> tuple[type, ...]:
    found = []
    for module_name, class_name in _POSIX_REACTORS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # e.g. no epoll off Linux, no poll on Windows
            continue
        kind = getattr(module, class_name, None)
        if isinstance(kind, type):
            found.append(kind)
    return tuple(found)


_POSIX_REACTOR_TYPES = _posix_reactor_types()


def supports_direct_writes(transport: Any) -> bool:
    """True when ``transport`` is a plain TCP server connection of a POSIX reactor whose
    buffer state can be read: direct writes are safe on it."""
    if type(transport) not in (tcp.Server, _WatchedServer):
        return False
    if not isinstance(getattr(transport, "reactor", None), _POSIX_REACTOR_TYPES):
        return False
    if ISSLTransport.providedBy(transport):
        return False
    for name, kind in _TRANSPORT_STATE:
        if not isinstance(getattr(transport, name, None), kind):
            return False
    try:
        handle = transport.getHandle()
    except Exception:
        return False
    return callable(getattr(handle, "send", None))


class FrameWriter(Protocol):
    """Something that writes bytes to one connection, in order."""

    def write(self, data: bytes) -> bool | None:
        """Write ``data`` after everything written before; True when the kernel took all
        of it (nothing waits in the transport), else a false value."""


class TransportWriter:
    """The public path: the transport's own ``write``."""

    __slots__ = ("write",)

    def __init__(self, transport: Any) -> None:
        self.write: Callable[[bytes], None] = transport.write


def _count_nothing(octets: int) -> None:
    pass


class _WatchedServer(tcp.Server):
    """A :class:`~twisted.internet.tcp.Server` that calls its watcher (once) before
    anything writes to it, closes it, switches it to TLS or reports it lost: the
    connection is then no longer fit for the fan-out's members' loop."""

    # None: not watched (the class attribute: nothing stored per connection until then).
    _streamrelay_watcher: Callable[[], None] | None = None

    def _changing(self) -> None:
        watcher = self._streamrelay_watcher
        if watcher is not None:
            self._streamrelay_watcher = None
            try:
                watcher()
            except Exception:
                # Whatever the watcher met, the write, close or loss it announced must
                # still happen: a teardown skipped here would leak the socket.
                _log.failure("Error while a viewer left the direct set")

    def write(self, data: bytes) -> None:
        self._changing()
        super().write(data)

    def writeSequence(self, iovec: Any) -> None:
        self._changing()
        super().writeSequence(iovec)

    def loseConnection(self, *args: Any, **kwargs: Any) -> None:
        self._changing()
        super().loseConnection(*args, **kwargs)

    def loseWriteConnection(self) -> None:
        self._changing()
        super().loseWriteConnection()

    def abortConnection(self) -> None:
        self._changing()
        super().abortConnection()

    def startTLS(self, *args: Any, **kwargs: Any) -> None:
        self._changing()
        super().startTLS(*args, **kwargs)

    def connectionLost(self, reason: Any) -> None:
        self._changing()
        super().connectionLost(reason)


class DirectWriter:
    """Writes to a :class:`~twisted.internet.tcp.Server`'s socket while its transport
    holds nothing; see the module docstring for every case.  Also the connection's
    direct port for the fan-out's members' loop (:class:`streamrelay.fanout.DirectPort`)."""

    # The socket itself, not its bound send: one object fewer to fetch per write.
    __slots__ = ("_socket", "_transport", "sent_directly")

    def __init__(
        self, transport: tcp.Server, sent_directly: Callable[[int], None] = _count_nothing
    ) -> None:
        if type(transport) is tcp.Server:
            # Same layout, four methods more: what watch() needs, and nothing stored.
            transport.__class__ = _WatchedServer
        self._transport = transport
        self._socket = transport.getHandle()
        # Counts the wire octets the members' loop sent (the connection's byte count).
        self.sent_directly = sent_directly

    def ready(self) -> bool:
        """True when a send now cannot overtake or outlive anything: the transport holds
        nothing, is connected and open, not TLS, and has not paused its producer."""
        transport: Any = self._transport
        return not (
            transport._tempDataLen
            or transport.dataBuffer
            or not transport.connected
            or transport.disconnecting
            or transport._aborting
            or transport._writeDisconnecting
            or transport.producerPaused
            or transport.TLS
        )

    def write(self, data: bytes) -> bool:
        """Send ``data`` now as far as the socket takes it; the transport gets the rest.
        True when the socket took all of it."""
        transport: Any = self._transport
        if not self.ready():
            transport.write(data)
            return False
        try:
            sent = self._socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # The transport's own send meets the error on its next turn and reports
            # the loss as it always does.
            transport.write(data)
            return False
        if sent < len(data):
            transport.write(data[sent:])
            return False
        return True

    @property
    def send(self) -> Callable[[bytes], int]:
        """The socket's own ``send``: all that the members' loop calls per message."""
        send: Callable[[bytes], int] = self._socket.send
        return send

    @staticmethod
    def payload(frame: Any) -> bytes:
        """The wire bytes of a prepared message (Autobahn's ``PreparedMessage``, as
        :func:`streamrelay.context.prepare_frame` makes them; never compressed here)."""
        data: bytes = frame.payloadHybi
        return data

    def hand_over(self, data: bytes) -> None:
        """Give ``data`` to the transport (after everything sent before it)."""
        self._transport.write(data)

    def watch(self, hook: Callable[[], None] | None) -> None:
        """Call ``hook`` (once) before anything writes to the transport, closes it,
        switches it to TLS or reports it lost; None: stop watching."""
        transport: Any = self._transport
        if hook is not None:
            transport._streamrelay_watcher = hook
        elif "_streamrelay_watcher" in vars(transport):
            del transport._streamrelay_watcher


def writer_for(
    transport: Any, sent_directly: Callable[[int], None] = _count_nothing
) -> FrameWriter:
    """The writer for ``transport``: a :class:`DirectWriter` where
    :func:`supports_direct_writes` (``sent_directly`` counts the wire octets the
    fan-out's members' loop sends), else a :class:`TransportWriter`."""
    if supports_direct_writes(transport):
        return DirectWriter(transport, sent_directly)
    return TransportWriter(transport)
