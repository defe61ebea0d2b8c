"""Thin Autobahn protocol classes: they translate WebSocket events into calls on the
network-free core (:mod:`streamrelay.streams`) and back.  Wire protocol v1 is documented
once, in ``docs/protocol.md``.

Each endpoint has one :class:`RelayFactory`; a protocol reads the shared
:class:`~streamrelay.context.RelayContext` from its factory (``self.factory.context``).
Every timer runs on the injected reactor (``RelayContext.clock``) so tests drive them
with ``Clock.advance``; Autobahn's own txaio timers are all switched off by
:class:`RelayFactory`.  Each close goes through ``sendCloseFrame`` so that every close
code (1001, 1003, 1007, 1008, 1009, 4409) reaches the peer, and each close, whoever starts
it, is bounded by ``close_timeout`` after which the TCP connection is aborted.

What a peer sends is bounded too (:mod:`streamrelay.inbound`): every frame is charged to
the connection's inbound budget, and a peer over it is closed with 1008 and no longer
read; and at most :data:`~streamrelay.inbound.FRAMES_PER_TURN` frames of one read are
parsed before the connection pauses reading and yields the reactor until its next turn.

Over 400 lines on purpose: the base class and the three small role classes that fill
in its hooks (publisher, viewer, echo) read best side by side, and the inbound bounds
hook into Autobahn's parser here, next to the other Autobahn overrides.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from types import FunctionType
from typing import Any, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from streamrelay import logs, wire
from streamrelay.adaptive import watch_adaptive
from streamrelay.context import RelayContext
from streamrelay.fastwrite import DirectWriter, FrameWriter, writer_for
from streamrelay.inbound import (
    FRAMES_PER_TURN,
    InboundBudget,
    InboundLimits,
    frame_size,
    limits_for,
)
from streamrelay.liveness import Liveness
from streamrelay.peers import peer_host
from streamrelay.reports import InvalidReport, ViewerInputGate, parse_report, parse_time_request
from streamrelay.roles import Role
from streamrelay.streams import PublisherSession, ViewerSession
from streamrelay.thumbnails import ThumbnailTooBig
from streamrelay.viewer_queue import ViewerQueue
from streamrelay.wire import WireError

# Through the relay's rate limit (streamrelay.logs): a storm of bad peers cannot fill a disk.
_log = Logger(observer=logs.limited)

_STATE_OPEN = WebSocketServerProtocol.STATE_OPEN

try:
    import fcntl
except ImportError:  # not POSIX: the kernel's send queue is not read
    fcntl = None  # type: ignore[assignment]

# Linux's ioctl for the bytes a socket holds and has not sent yet (linux/sockios.h).
_SIOCOUTQNSD = 0x894B


def kernel_unsent_bytes(transport: Any) -> int:
    """Bytes the kernel holds for the peer and has not sent yet (0 where unknown: not
    Linux, not a socket).  A TLS transport is read through the TCP transport it wraps."""
    if fcntl is None or not sys.platform.startswith("linux"):
        # The number means something else elsewhere (or nothing): not asked.
        return 0
    for candidate in (transport, getattr(transport, "transport", None)):
        if candidate is None:
            continue
        try:
            fileno = candidate.getHandle().fileno()
            raw = fcntl.ioctl(fileno, _SIOCOUTQNSD, b"\0\0\0\0")
        except Exception:  # noqa: BLE001 - no socket to ask: try the next, or none
            continue
        return max(0, int(struct.unpack("i", raw)[0]))
    return 0

# What Autobahn's server handshake stores on the protocol and never reads after it.
_HANDSHAKE_LEFTOVERS = (
    "http_request_data",
    "http_response_data",
    "http_headers",
    "http_status_line",
    "http_request_params",
    "websocket_extensions",
    "_wskey",
)


def format_peer(address: object) -> str:
    """``ip:port`` for TCP peers (``[ip]:port`` for IPv6), the path for unix sockets."""
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        return f"unix:{name.decode() if isinstance(name, bytes) else name or ''}"
    return str(address)


@implementer(IPushProducer)
class _TransportProducer:
    """Registered on every relay connection's transport: it tells the protocol when the
    transport's write buffer is full or drained.  It never pauses reading (on IOCP,
    pausing reads can reorder data: Twisted #11365)."""

    __slots__ = ("_protocol", "paused")

    def __init__(self, protocol: RelayProtocol) -> None:
        self._protocol = protocol
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self._protocol.transport_paused()

    def resumeProducing(self) -> None:
        self.paused = False
        self._protocol.transport_resumed()

    def stopProducing(self) -> None:
        pass


class RelayProtocol(WebSocketServerProtocol):
    """Behaviour shared by every relay endpoint: liveness pings, bounded closes, error
    containment and teardown."""

    role: Role
    factory: RelayFactory
    transport: Any

    def __init__(self) -> None:
        super().__init__()
        self.stream_name = ""
        # The client's address as the web gate judged it (X-Forwarded-For hops with
        # --trust-proxy); empty: the TCP peer's.
        self.client_host = ""
        # A viewer that asked for audio (``?audio=1``, set by the web gate).
        self.wants_audio = False
        self._last_heard = 0.0
        self._liveness: Liveness | None = None
        self._close_deadline: IDelayedCall | None = None
        self._gone = False
        self._fragments = 0
        self._producer: _TransportProducer | None = None
        self._pending_pong: bytes | None = None
        # Inbound bounds: the budget (None: unlimited), the frames parsed since the
        # last read or turn, the call that continues parsing on the next turn, whether
        # reading is paused by us (never by the write side), and whether the peer went
        # over its budget (then nothing more is read or parsed).
        self._inbound: InboundBudget | None = None
        self._turn_frames = 0
        self._next_turn: IDelayedCall | None = None
        self._reading_paused = False
        self._over_budget = False

    # -- plumbing ---------------------------------------------------------------------

    @property
    def context(self) -> RelayContext:
        """The shared context, from the factory that built this protocol."""
        return self.factory.context

    @property
    def _clock(self) -> IReactorTime:
        return self.factory.context.clock

    def _connectionMade(self) -> None:
        """Autobahn's set-up, then its send queue (a 64-slot deque, ~0.6 KB a
        connection) swapped for an empty tuple: it only serves ``sync`` or chopped sends,
        which the relay never makes.  Autobahn's ``sendData`` reads it as empty, and an
        append would fail loudly rather than reorder."""
        super()._connectionMade()
        self.send_queue = cast(Any, ())

    def connectionMade(self) -> None:
        """Turn on TCP keepalive: a dead peer's socket is eventually reported."""
        super().connectionMade()
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpKeepAlive(True)
        self._last_heard = self._clock.seconds()
        limits = self.factory.inbound_limits
        if limits is not None:
            self._inbound = InboundBudget(self._clock, limits)

    def dataReceived(self, data: bytes) -> None:
        """Any byte from the peer proves it is alive.  Nothing is read once the peer
        went over its budget; bytes that arrive while earlier ones wait for the next turn
        (TLS hands one read over in several pieces) queue behind them."""
        if self._over_budget:
            return
        self._last_heard = self._clock.seconds()
        if self._next_turn is not None:
            self.data += data
            return
        self._turn_frames = 0
        # Straight to Autobahn's parser: its Twisted adapter's dataReceived only adds a
        # debug line whose arguments it formats on every read, debug logging on or off.
        self._dataReceived(data)

    # -- inbound bounds ----------------------------------------------------------------

    def processData(self) -> bool:
        """Autobahn's parsing step, which it repeats while the buffer holds more: stop
        for good once the peer is over budget, and between two frames yield the reactor
        once this read or turn had its :data:`FRAMES_PER_TURN`."""
        if self._over_budget:
            return False
        if self._turn_frames >= FRAMES_PER_TURN and self.current_frame is None:
            self._yield_turn()
            return False
        return bool(super().processData())

    def onFrameBegin(self) -> None:
        """Charge every frame to the budget: control frames, empty frames and fragments
        alike, each with its header.  Autobahn's own checks (1002, 1009) run first, so a
        frame that breaks them gets their close code."""
        super().onFrameBegin()
        self._turn_frames += 1
        frame = self.current_frame
        # A connection Autobahn has just dropped (a second protocol error) is over.
        if (
            self._inbound is not None
            and frame is not None
            and self.state != WebSocketServerProtocol.STATE_CLOSED
        ):
            exceeded = self._inbound.frame(frame_size(frame.length))
            if exceeded is not None:
                self._went_over_budget(exceeded)

    def _went_over_budget(self, reason: str) -> None:
        self._over_budget = True
        # Drop the rest of the buffer and any partial message, and read nothing more:
        # the close deadline then ends the connection (the peer's close reply is not
        # awaited from a peer that is not read).
        self.data = b""
        self.message_data = []
        self.frame_data = []
        self._cancel_next_turn()
        self._pause_reading()
        counts = self.context.over_budget.setdefault(self.role.label, {})
        counts[reason] = counts.get(reason, 0) + 1
        _log.info(
            "{role} {peer} over its inbound budget ({reason}): closing",
            role=self.role.label,
            peer=format_peer(self.transport.getPeer()),
            stream=self.stream_name,
            reason=reason,
        )
        self.close_with(wire.CLOSE_POLICY_VIOLATION, reason)

    def _yield_turn(self) -> None:
        # Reading pauses so that the buffer does not grow meanwhile (TLS may still hand
        # over the rest of the current read: dataReceived queues it).
        if self._next_turn is None:
            self._pause_reading()
            self._next_turn = self._clock.callLater(0, self._continue_parsing)

    def _continue_parsing(self) -> None:
        self._next_turn = None
        self._turn_frames = 0
        try:
            self.consumeData()
        except Exception:
            # What the reactor does when dataReceived raises: log and disconnect.
            _log.failure("Error parsing frames from {role}", role=self.role.label)
            self.abort()
            return
        if self._next_turn is None and not self._over_budget and not self._gone:
            self._resume_reading()

    def _cancel_next_turn(self) -> None:
        if self._next_turn is not None and self._next_turn.active():
            self._next_turn.cancel()
        self._next_turn = None

    def _pause_reading(self) -> None:
        # The transport's own pause/resume is the read side; the write side is the
        # producer registered in onOpen, and neither touches the other.
        transport = self.transport
        if (
            not self._reading_paused
            and transport is not None
            and not getattr(transport, "disconnecting", False)
        ):
            self._reading_paused = True
            transport.pauseProducing()

    def _resume_reading(self) -> None:
        # A closing transport stays as it is (StringTransport even refuses a resume).
        transport = self.transport
        if (
            self._reading_paused
            and transport is not None
            and self.state != WebSocketServerProtocol.STATE_CLOSED
            and not getattr(transport, "disconnecting", False)
        ):
            self._reading_paused = False
            transport.resumeProducing()

    # -- Autobahn callbacks, guarded -------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> str | None:
        """Select ``streamrelay.v1`` when offered; no subprotocol also means v1."""
        if wire.SUBPROTOCOL in request.protocols:
            return wire.SUBPROTOCOL
        return None

    def onOpen(self) -> None:
        """Watch the transport's write buffer, start liveness pings, then the role's own
        opening."""
        self._forget_handshake()
        self._producer = _TransportProducer(self)
        self.transport.registerProducer(self._producer, True)
        self._schedule_ping()
        self._guarded("open", self.opened)

    def _forget_handshake(self) -> None:
        # Autobahn keeps the opening handshake (the request head, its parsed headers,
        # the response, ~1.3 KB) for the connection's life; nothing reads it once open.
        for name in _HANDSHAKE_LEFTOVERS:
            if name in self.__dict__:
                setattr(self, name, None)

    def transport_paused(self) -> None:
        """The transport's write buffer is full (role hook)."""

    def transport_resumed(self) -> None:
        """The transport drained: that is write progress, so the peer is alive; a pong
        held back meanwhile goes out now."""
        self.heard_from_peer()
        pong, self._pending_pong = self._pending_pong, None
        if pong is not None and self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendPong(pong)

    def onPing(self, payload: bytes) -> None:
        """Answer pings, but while the peer is not reading what we send, keep only the
        latest one (RFC 6455 5.5.3): a ping flood cannot grow our write buffer."""
        if self._producer is not None and self._producer.paused:
            self._pending_pong = payload
            return
        super().onPing(payload)

    def onMessageEnd(self) -> None:
        """Autobahn's end of a message, without its observer signal when nobody
        observes: Autobahn fires a ``message`` event after every message (a Deferred
        gathered over no listeners, and an errback added to it), a few percent of a
        publisher's read path at 30 messages a second per stream.  With a listener or a
        parent observable, Autobahn's own method runs.  (``b"".join`` of a message of
        one frame returns that frame's bytes without a copy.)"""
        listeners = self._listeners
        if self._parent is not None or (listeners and listeners.get("message")):
            super().onMessageEnd()
            return
        if not self.failedByMe:
            if self.trackedTimings:
                self.trackedTimings.track("onMessage")
            self._onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None  # type: ignore[assignment]  # as Autobahn does

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Hand the message to the role, containing any error; nothing is relayed once
        a close has started."""
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        self._guarded("message", self.message_received, payload, isBinary)

    def _guarded(self, event: str, handler: Callable[..., None], *arguments: Any) -> None:
        try:
            handler(*arguments)
        except Exception:
            _log.failure(
                "Unhandled error on {event} ({role} {stream})",
                event=event,
                role=self.role.label,
                stream=self.stream_name,
            )
            self.close_with(wire.CLOSE_INTERNAL_ERROR, "internal error")

    def opened(self) -> None:
        """The WebSocket is open (role hook)."""

    def message_received(self, payload: bytes, is_binary: bool) -> None:
        """A whole message arrived (role hook)."""

    def closed(self) -> None:
        """The connection is gone (role hook); called exactly once."""

    # -- closing ---------------------------------------------------------------------

    def close_with(self, code: int, reason: str) -> None:
        """Start a closing handshake with any code, bounded by the close timeout."""
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendCloseFrame(code, reason.encode("utf-8")[:123], isReply=False)
        elif self.state != WebSocketServerProtocol.STATE_CLOSED:
            self._arm_close_deadline()

    def sendCloseFrame(
        self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False
    ) -> None:
        """Send a close frame (Autobahn's path, used for every close) and bound the wait."""
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)
        if self.failedByMe:
            # Autobahn stops buffering a failed message but keeps what it had (up to the
            # size limit) until the protocol object is collected: let it go now.
            self.message_data = []
            self.frame_data = []
        self._arm_close_deadline()

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> bool | None:
        """A close the peer starts arms no Autobahn timer: bound it ourselves."""
        result = super().onCloseFrame(code, reasonRaw)
        self._arm_close_deadline()
        return result

    def _arm_close_deadline(self) -> None:
        if self._close_deadline is None and not self._gone:
            self._close_deadline = self._clock.callLater(
                self.context.config.close_timeout, self.abort
            )

    def abort(self) -> None:
        """Drop the TCP connection now, without a closing handshake."""
        if not self._gone and self.transport is not None:
            self.transport.abortConnection()

    def onMessageBegin(self, isBinary: bool) -> None:
        """Count fragments: Autobahn bounds a message's bytes, not its fragments."""
        self._fragments = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length: int) -> None:
        """Refuse a message split into more fragments than allowed (1009)."""
        self._fragments += 1
        if self._fragments > self.context.config.max_fragments_per_message:
            self._fail_with(wire.CLOSE_MESSAGE_TOO_BIG, "too many fragments in one message")
            return
        super().onMessageFrameBegin(length)

    def _fail_with(self, code: int, reason: str) -> None:
        # Autobahn's failure path: it stops buffering the message being received.
        self._fail_connection(code, reason)

    # -- liveness --------------------------------------------------------------------

    def heard_from_peer(self) -> None:
        """Record proof that the peer is alive (data or write progress)."""
        self._last_heard = self._clock.seconds()

    def _schedule_ping(self) -> None:
        if self._gone:
            return
        config = self.context.config
        self._liveness = Liveness(
            self._clock,
            config.ping_interval,
            config.ping_timeout,
            lambda: self._last_heard,
            self._send_ping,
            self._silent,
        )
        self._liveness.start()

    def _send_ping(self) -> bool:
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return False
        self.sendPing()
        return True

    def _silent(self) -> None:
        self.context.metrics.ping_timeout(self.role.label)
        _log.info(
            "{role} {peer} silent after ping: aborting",
            role=self.role.label,
            peer=format_peer(self.transport.getPeer()),
        )
        self.abort()

    # -- teardown --------------------------------------------------------------------

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Cancel every timer and let the role detach; exactly once."""
        self._gone = True
        self._cancel_next_turn()
        if self._liveness is not None:
            self._liveness.stop()
        if self._close_deadline is not None and self._close_deadline.active():
            self._close_deadline.cancel()
        self._liveness = None
        self._close_deadline = None
        try:
            super().connectionLost(reason)
        finally:
            # Autobahn keeps the protocol in a reference cycle (its is_closed Deferred),
            # so buffers would live until the cyclic collector runs: release them now.
            self.message_data = []
            self.frame_data = []
            self.data = b""
            self._producer = None
            try:
                self.closed()
            except Exception:
                _log.failure("Error while detaching {role}", role=self.role.label)


class PublisherProtocol(RelayProtocol):
    """``/publish/{stream}``: media and metadata in; viewer counts and keyframe requests out."""

    role = Role.PUBLISHER

    def __init__(self) -> None:
        super().__init__()
        self.session: PublisherSession | None = None
        self._last_media = 0.0
        self._idle_call: IDelayedCall | None = None
        self.peer_address = ""

    def opened(self) -> None:
        """Attach to the stream, replacing any current publisher."""
        self.peer_address = format_peer(self.transport.getPeer())
        result = self.context.registry.publish(self.stream_name, self)
        if not isinstance(result, PublisherSession):
            self.close_with(wire.CLOSE_TRY_AGAIN_LATER, result.reason)
            return
        self.session = result
        self._log_event("live on")
        self._last_media = self._clock.seconds()
        self._arm_idle_check(self.context.config.publisher_idle_timeout)

    def _log_event(self, what: str) -> None:
        _log.info(
            "Publisher {peer} {what} {stream}",
            peer=self.peer_address,
            what=what,
            stream=self.stream_name,
        )

    def _arm_idle_check(self, delay: float) -> None:
        if delay > 0 and not self._gone:
            self._idle_call = self._clock.callLater(delay, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_call = None
        timeout = self.context.config.publisher_idle_timeout
        idle_for = self._clock.seconds() - self._last_media
        if self.session is not None and self.session.idle:
            # Idle on demand: no media is the point. Pings still prove it alive, and it
            # holds no more than a live publisher (its stream slot); it gets the whole
            # timeout again from when it turns active.
            self._arm_idle_check(timeout)
        elif idle_for >= timeout:
            self.close_with(wire.CLOSE_POLICY_VIOLATION, "publisher idle")
        else:
            self._arm_idle_check(timeout - idle_for)

    def message_received(self, payload: bytes, is_binary: bool) -> None:
        """Relay media; keep and forward ``meta``; refuse what breaks v1."""
        if self.session is None or not self.session.current:
            return
        if is_binary:
            try:
                message = wire.parse_media(payload)
            except WireError as error:
                self.close_with(wire.CLOSE_INVALID_PAYLOAD, str(error))
                return
            self._last_media = self._clock.seconds()
            self.session.media(message)
            return
        if len(payload) > wire.MAX_META_BYTES:
            self.close_with(wire.CLOSE_MESSAGE_TOO_BIG, "text message over 64 KiB")
            return
        try:
            parsed = wire.parse_text(payload)
        except WireError as error:
            self.close_with(wire.CLOSE_INVALID_PAYLOAD, str(error))
            return
        kind = parsed.get("type")
        if kind == "meta":
            self.session.meta(payload)
        elif kind == "publisher-state" and parsed.get("state") in ("idle", "active"):
            # Other states are a later version's: ignored, like unknown types.
            self._last_media = self._clock.seconds()
            self.session.publisher_state(parsed["state"] == "idle")
        elif kind == "thumbnail":
            self._thumbnail(parsed)

    def _thumbnail(self, parsed: dict[str, Any]) -> None:
        assert self.session is not None
        try:
            self.session.thumbnail(parsed)
        except ThumbnailTooBig as error:
            self.close_with(wire.CLOSE_MESSAGE_TOO_BIG, str(error))
        except WireError as error:
            self.close_with(wire.CLOSE_INVALID_PAYLOAD, str(error))

    def send_viewer_count(self, count: int) -> None:
        """Tell the publisher how many viewers watch."""
        self._send_json({"type": "viewers", "count": count})

    def send_keyframe_request(self) -> None:
        """Ask the publisher for a keyframe."""
        self._send_json({"type": "keyframe-request"})

    def send_viewer_report(self, summary: dict[str, Any]) -> None:
        """Tell the publisher what its viewers report (the last minute's summary)."""
        self._send_json({"type": "viewer-report", **summary})

    def _send_json(self, message: dict[str, Any]) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(wire.encode_text(message), isBinary=False)

    def replaced(self) -> None:
        """A newer publisher took the stream: close with 4409."""
        self._log_event("replaced on")
        self.close_with(wire.CLOSE_PUBLISHER_REPLACED, "replaced by a newer publisher")

    def closed(self) -> None:
        """Leave the stream (viewers see ``offline`` unless a newer publisher took over)."""
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self.session is not None:
            if self.session.current:
                self._log_event("left")
            self.session.close()
            self.session = None


class ViewerProtocol(RelayProtocol):
    """``/watch/{stream}``: status, meta and media out; keyframe requests in."""

    role = Role.VIEWER
    # ``?abr=1`` (set by the web gate): adaptive delivery (streamrelay.adaptive).
    abr = False

    # What write_frame reads for every message, kept beside the object's header rather
    # than in its (large) attribute dict; ``state`` is Autobahn's, whose assignments
    # land here unchanged.
    __slots__ = ("_write", "state")

    def __init__(self) -> None:
        super().__init__()
        self.session: ViewerSession | None = None
        self._queue: ViewerQueue | None = None
        # How prepared frames reach the transport (streamrelay.fastwrite), once open;
        # None: Autobahn's own path (compression negotiated, or not open yet).
        self._write: FrameWriter | None = None
        # Reports and time requests allowed (made at the first of them).
        self._gate: ViewerInputGate | None = None

    def attached(self, queue: ViewerQueue) -> None:
        """Route the transport's pause and resume to the new queue, before it sends."""
        self._queue = queue
        if self._producer is not None and self._producer.paused:
            queue.pause_producing()

    def opened(self) -> None:
        """Join the stream: status, meta, CONFIG and the cached GOP go out at once."""
        if self._perMessageCompress is None:
            self._write = writer_for(self.transport)
        registry = self.context.registry
        address = self.client_host or peer_host(self.transport.getPeer())
        if self.abr:
            result = watch_adaptive(
                registry, self.stream_name, self, address, audio=self.wants_audio
            )
        else:
            result = registry.watch(self.stream_name, self, address, audio=self.wants_audio)
        if not isinstance(result, ViewerSession):
            self.close_with(wire.CLOSE_TRY_AGAIN_LATER, result.reason)
            return
        self.session = result

    def transport_paused(self) -> None:
        """The viewer's transport is full: its queue holds messages from now on."""
        if self._queue is not None:
            self._queue.pause_producing()

    def transport_resumed(self) -> None:
        """The viewer's transport drained: its queue writes what waits."""
        super().transport_resumed()
        if self._queue is not None:
            self._queue.resume_producing()

    def write_frame(self, frame: Any) -> bool | None:
        """Write one prepared message; never after the WebSocket left the open state.

        The frame's bytes go to the writer chosen at opening: what Autobahn's
        ``sendPreparedMessage`` does for an uncompressed connection, minus its debug
        formatting; the wire-level byte count is kept (the connection's close line
        reports it).
        Autobahn's own send queue, which a write must not overtake, is only used for
        ``sync`` or chopped sends, which the relay never asks for (and
        ``autoFragmentSize`` is 0).  True when the kernel took the whole frame."""
        if self.state == _STATE_OPEN:
            writer = self._write
            if writer is not None:
                payload = frame.payloadHybi
                self.trafficStats.outgoingOctetsWireLevel += len(payload)
                return writer.write(payload)
            self.sendPreparedMessage(frame)
        return None

    def direct_port(self) -> DirectWriter | None:
        """The socket's direct port for the stream's fan-out (:mod:`streamrelay.fanout`)
        when the WebSocket is open, uncompressed, on a plain TCP transport that holds
        nothing now; else None.  The port leaves the fan-out's direct set before
        anything else writes to the transport (Autobahn's own frames included)."""
        writer = self._write
        if self.state == _STATE_OPEN and type(writer) is DirectWriter and writer.ready():
            # Set here, not at opening: an idle viewer keeps no bound method for it.
            writer.sent_directly = self._sent_directly
            return writer
        return None

    def _sent_directly(self, octets: int) -> None:
        # The fan-out's members' loop sent these: the close line's byte count has them.
        self.trafficStats.outgoingOctetsWireLevel += octets

    def unsent_bytes(self) -> int:
        """What the kernel holds for this viewer unsent (read by adaptive sessions only,
        a few times a second)."""
        return kernel_unsent_bytes(self.transport) if self.transport is not None else 0

    def stalled(self) -> None:
        """No write progress for the stall timeout: close with 1008."""
        self.context.metrics.viewer_stalled()
        _log.info(
            "Viewer {peer} of {stream} stalled: closing",
            peer=format_peer(self.transport.getPeer()),
            stream=self.stream_name,
        )
        self.close_with(wire.CLOSE_POLICY_VIOLATION, "viewer stalled")

    def message_received(self, payload: bytes, is_binary: bool) -> None:
        """Honour ``keyframe-request``; ignore other text; refuse binary (1003)."""
        if is_binary:
            self.close_with(wire.CLOSE_UNSUPPORTED_DATA, "viewers may not send binary messages")
            return
        try:
            parsed = wire.parse_text(payload)
        except WireError:
            return
        kind = parsed.get("type")
        if kind == "keyframe-request" and self.session is not None:
            self.session.request_keyframe()
        elif kind == "time" or kind == "report":
            self._viewer_input(kind, parsed)

    def _viewer_input(self, kind: str, parsed: dict[str, Any]) -> None:
        """A clock request (answered within its rate) or a playback report (counted
        within its rate when valid); everything else about them is ignored."""
        if self.session is None:
            return
        if self._gate is None:
            self._gate = ViewerInputGate(self._clock)
        if kind == "time":
            t0 = parse_time_request(parsed)
            if t0 is not None and self._gate.allow_time() and self.state == _STATE_OPEN:
                server_us = int(self._clock.seconds() * 1_000_000)
                # A text message like status: queued in order, never dropped.
                self.session.send_text(wire.encode_text(wire.time_answer(t0, server_us)))
            return
        try:
            report = parse_report(parsed)
        except InvalidReport:
            self.session.stream.reports.invalid += 1
            return
        if self._gate.allow_report():
            self.session.report(report)

    def closed(self) -> None:
        """Leave the stream and give back every queued byte."""
        self._queue = None
        self._write = None
        if self.session is not None:
            self.session.close()
            self.session = None


class EchoProtocol(RelayProtocol):
    """``/echo`` (only with ``--echo``): echoes every message, for the conformance suite."""

    role = Role.ECHO

    def message_received(self, payload: bytes, is_binary: bool) -> None:
        """Send the message back as it came."""
        self.sendMessage(payload, is_binary)


def _accept_deflate(offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


def _configured(protocol: type[RelayProtocol], factory: WebSocketServerFactory) -> type[Any]:
    """``protocol`` with ``factory``'s Autobahn options as class attributes.

    Autobahn copies its ~30 server options from the factory into every protocol
    instance (~1 KB of instance dict each) and formats them all for a debug log on every
    connection (~0.1 ms, even with debug logging off).  Options held by the class are
    not copied (Autobahn copies only what the protocol lacks), and with nothing listed
    in ``CONFIG_ATTRS`` there is nothing to format.  Options must be set before this
    runs: a later ``setProtocolOptions`` on the factory does not reach the class."""
    options: dict[str, Any] = {"CONFIG_ATTRS": (), "__module__": protocol.__module__}
    for name in protocol.CONFIG_ATTRS:
        value = getattr(factory, name)
        # A function as a class attribute would become a method: keep it a function.
        options[name] = staticmethod(value) if isinstance(value, FunctionType) else value
    options["__qualname__"] = protocol.__qualname__
    return type(protocol.__name__, (protocol,), options)


class RelayFactory(WebSocketServerFactory):
    """Builds one endpoint's protocols and holds what they share: the relay's context
    and Autobahn's options, with Autobahn's own timers off (ours run on the injected
    reactor), close frames on protocol errors, the endpoint's size bound, and origins
    left to the web gate."""

    def __init__(
        self,
        context: RelayContext,
        protocol: type[RelayProtocol],
        max_message_bytes: int,
        compression: bool = False,
    ) -> None:
        super().__init__()
        self.context = context
        # Every connection of this endpoint gets a budget with these limits (None:
        # unlimited, the echo endpoint).
        self.inbound_limits: InboundLimits | None = limits_for(
            protocol.role, context.config, max_message_bytes
        )
        self.setProtocolOptions(
            maxFramePayloadSize=max_message_bytes,
            maxMessagePayloadSize=max_message_bytes,
            failByDrop=False,
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            autoPingInterval=0,
            autoPingTimeout=0,
            autoFragmentSize=0,
            echoCloseCodeReason=False,
            webStatus=False,
            perMessageCompressionAccept=(
                _accept_deflate if compression else (lambda offers: None)
            ),
            # The web gate has already checked the origin: Autobahn must not re-decide,
            # and each setProtocolOptions call resets allowNullOrigin, so it goes last.
            allowedOrigins=["*"],
            allowNullOrigin=True,
        )
        self.protocol = _configured(protocol, self)

    def build(self, address: Any, stream_name: str) -> RelayProtocol:
        """A protocol for a connection from ``address`` to ``stream_name`` (empty for
        endpoints without a stream), tracked for leak accounting."""
        protocol = self.buildProtocol(address)
        assert isinstance(protocol, RelayProtocol)
        protocol.stream_name = stream_name
        self.context.track(protocol)
        return protocol
