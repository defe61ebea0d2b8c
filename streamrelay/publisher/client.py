"""The network side of a publisher: what goes to the relay over the connection, and when.

:class:`Publisher` connects to ``ws(s)://HOST:PORT/publish/{stream}`` offering the
``streamrelay.v1`` subprotocol, sends what it is given (meta, CONFIG, frames) and
reconnects with exponential backoff and full jitter whenever the relay goes away or
refuses (the lifecycle is :class:`~.connector.Connector`'s). After every (re)connect it
sends the latest meta and CONFIG again, then only frames from the next KEY on, and asks
the application for that KEY through ``on_keyframe_request``.

Backpressure uses public Twisted APIs only: the connection registers a push producer on
its transport, so Twisted says when its write buffer is over its bound. Messages then
wait in the :class:`~.outbox.Outbox`, which reports congestion and drops frames until the
next KEY rather than grow past its limit. Frames handed over from another thread pass
through a bounded :class:`~.handoff.FrameHandoff`.

All methods run in the reactor thread, except the ``*_threadsafe`` ones and
:attr:`Publisher.readiness`, which any thread may use.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from streamrelay.wire import (
    FLAG_AUDIO,
    FLAG_CONFIG,
    FLAG_KEY,
    MAX_META_BYTES,
    WireError,
    encode_media,
    encode_text,
    now_us,
    parse_text,
    thumbnail_message,
)
from streamrelay.wsclient.backoff import Backoff
from streamrelay.wsclient.connection import RelayConnection
from streamrelay.wsclient.endpoint import EndpointFactory, default_endpoint
from streamrelay.wsclient.target import RelayTarget

from .connector import Connector, SessionHooks
from .handoff import FrameHandoff
from .ondemand import Activity, OnDemand
from .outbox import Kind, Outbox, Outgoing, Verdict
from .settings import PublisherSettings
from .state import ConnectionState

_log = Logger()


class Readiness(enum.Enum):
    """Whether a new frame would go out now (see :attr:`Publisher.readiness`)."""

    READY = "ready"
    CONGESTED = "congested"
    OFFLINE = "offline"
    # On demand, nobody watches: do not capture or encode (see streamrelay.publisher.ondemand).
    IDLE = "idle"


@dataclass
class PublisherStats:
    """Counters since the publisher was created (reactor thread)."""

    connects: int = 0
    messages_sent: int = 0
    bytes_sent: int = 0
    frames_sent: int = 0
    keyframes_sent: int = 0
    configs_sent: int = 0
    frames_dropped: int = 0
    keyframe_requests: int = 0
    audio_sent: int = 0
    audio_dropped: int = 0


class Publisher:
    """Publishes one stream to a relay; see the module docstring for the behaviour.

    Callbacks, set as attributes, run in the reactor thread: ``on_viewers(count)`` when
    the relay reports the viewer count; ``on_keyframe_request()`` when the next frame
    should be a KEY (the relay asked, the connection (re)opened, or frames were dropped);
    ``on_state_change(state)`` on every :class:`ConnectionState` change;
    ``on_activity_change(activity)`` when an on-demand publisher goes idle or active.
    ``endpoint_factory`` replaces the TCP/TLS endpoint (tests use in-memory ones).
    """

    def __init__(
        self,
        settings: PublisherSettings | None = None,
        *,
        reactor: Any = None,
        backoff: Backoff | None = None,
        endpoint_factory: EndpointFactory | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.settings = settings = settings or PublisherSettings()
        self._reactor = reactor
        self.on_viewers: Callable[[int], None] | None = None
        self.on_keyframe_request: Callable[[], None] | None = None
        self.stats = PublisherStats()
        self.viewers: int | None = None
        self.on_activity_change: Callable[[Activity], None] | None = None
        # Read by the capture thread through readiness: a plain attribute, set here only.
        self._idle = False
        # Tell the relay idle/active (on demand, or driven from outside by set_activity).
        self._reports_activity = settings.on_demand
        self._on_demand = (
            OnDemand(reactor, settings.on_demand_grace, self.set_activity)
            if settings.on_demand
            else None
        )
        # The relay's latest summary of the viewers' reports (a ``viewer-report``).
        self.viewer_report: dict[str, Any] | None = None
        self.thumbnails_sent = 0
        self._meta: bytes | None = None
        self._config: bytes | None = None
        self._outbox = Outbox(
            self._write,
            high_water=settings.queue_high_water_bytes,
            low_water=settings.queue_low_water_bytes,
            limit=settings.queue_limit_bytes,
        )
        self._handoff = FrameHandoff(
            settings.max_pending_threadsafe_calls,
            on_overflow=lambda: self._reactor_call(self._request_keyframe),
        )
        # Audio packets waiting for the reactor: half a second of 20 ms packets.
        self._audio_handoff = FrameHandoff(25, on_overflow=lambda: None)
        hooks = SessionHooks(
            opened=self._session_opened,
            closed=self._session_closed,
            message=self._message_received,
            paused=self._outbox.pause,
            resumed=self._transport_resumed,
        )
        self._connector = Connector(
            settings,
            hooks,
            reactor=reactor,
            backoff=backoff or Backoff(),
            endpoint_factory=endpoint_factory or default_endpoint,
        )

    # -- state -----------------------------------------------------------------------------

    @property
    def target(self) -> RelayTarget:
        """The relay URL, parsed."""
        return self.settings.target

    @property
    def on_state_change(self) -> Callable[[ConnectionState], None] | None:
        """Called with the new :class:`ConnectionState` on every change."""
        return self._connector.on_state_change

    @on_state_change.setter
    def on_state_change(self, callback: Callable[[ConnectionState], None] | None) -> None:
        self._connector.on_state_change = callback

    @property
    def state(self) -> ConnectionState:
        """The current :class:`ConnectionState`."""
        return self._connector.state

    @property
    def connected(self) -> bool:
        """True while the WebSocket is open."""
        return self._connector.state is ConnectionState.LIVE

    @property
    def last_error(self) -> str | None:
        """Why the last attempt or connection failed (None once connected again)."""
        return self._connector.last_error

    @property
    def readiness(self) -> Readiness:
        """READY, CONGESTED, OFFLINE or IDLE: whether to encode the next frame. Any thread.

        An encoder should skip raw frames unless READY (and make the next one it encodes a
        KEY), rather than encode frames that cannot go out; while IDLE (on demand, nobody
        watches) it should not even capture them.
        """
        # Single attribute reads, atomic in CPython: no lock against the reactor thread.
        if self._idle:
            return Readiness.IDLE
        if self._connector.session is None:
            return Readiness.OFFLINE
        if self._outbox.congested or self._handoff.full:
            return Readiness.CONGESTED
        return Readiness.READY

    @property
    def activity(self) -> Activity:
        """ACTIVE, or IDLE while an on-demand publisher has nobody watching. Any thread."""
        return Activity.IDLE if self._idle else Activity.ACTIVE

    @property
    def on_demand(self) -> OnDemand | None:
        """The on-demand decision (its audience, idle time), None without ``on_demand``."""
        return self._on_demand

    @property
    def dropped(self) -> int:
        """Frames dropped because the network was behind (both threads' counts)."""
        return self.stats.frames_dropped + self._handoff.drops

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the outbox for the transport to drain."""
        return self._outbox.queued_bytes

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting (and keep reconnecting until :meth:`stop`)."""
        self._connector.start()
        if self._on_demand is not None:
            self._on_demand.start()

    def stop(self, reason: str = "publisher stopped") -> defer.Deferred[str]:
        """Close the connection cleanly and stop reconnecting.

        Returns a Deferred that fires (with the stop reason) once the connection is closed;
        an unresponsive relay is cut off after the close timeout.
        """
        if self._on_demand is not None:
            self._on_demand.stop()
        return self._connector.stop(reason)

    def when_stopped(self) -> defer.Deferred[str]:
        """A Deferred that fires with the reason once the publisher has stopped for good
        (after :meth:`stop`, or when a newer publisher replaced this one)."""
        return self._connector.when_stopped()

    # -- sending (reactor thread) ----------------------------------------------------------

    def send_meta(self, meta: Mapping[str, Any]) -> None:
        """Send a ``meta`` message now (if connected) and after every reconnect.

        ``meta`` should hold ``codec``, ``width``, ``height`` and ``fps``; ``type`` is set
        to ``"meta"``.
        """
        encoded = encode_text({"type": "meta", **{k: v for k, v in meta.items() if k != "type"}})
        if len(encoded) > MAX_META_BYTES:
            raise ValueError(f"meta is {len(encoded)} bytes; the limit is {MAX_META_BYTES}")
        self._meta = encoded
        if self._connector.session is not None:
            self._outbox.put(Outgoing(encoded, Kind.TEXT))

    def send_config(self, payload: bytes, capture_time_us: int | None = None) -> None:
        """Send a CONFIG (for H.264: Annex-B SPS+PPS) now and after every reconnect."""
        self._config = bytes(payload)
        # Idle on demand: kept, and sent when it turns active (before the KEY).
        if self._connector.session is not None and not self._idle:
            self._send_config(now_us() if capture_time_us is None else capture_time_us)

    def send_frame(self, payload: bytes, *, key: bool, capture_time_us: int | None = None) -> bool:
        """Send one frame (for H.264: an Annex-B access unit); True if it was sent or queued.

        False when it cannot go out: not connected, waiting for a KEY after a (re)connect
        or a drop (only a KEY resumes), or the outbox is full (the frame is dropped and a
        keyframe is requested once the network has caught up). Raises
        :class:`~streamrelay.wire.WireError` for a capture time outside 64 unsigned bits.
        """
        if self._connector.session is None or self._idle:
            # Idle on demand: the relay was told so, and no media may follow until active.
            return False
        stamp = now_us() if capture_time_us is None else capture_time_us
        message = Outgoing(
            encode_media(FLAG_KEY if key else 0, stamp, payload), Kind.KEY if key else Kind.DELTA
        )
        verdict = self._outbox.offer_frame(message)
        if verdict is Verdict.DROPPED:
            self.stats.frames_dropped += 1
        return verdict is Verdict.SENT

    def send_thumbnail(self, jpeg: bytes) -> bool:
        """Send a JPEG of the picture as a ``thumbnail`` message; True if it went out.
        Disposable: dropped while not connected or while the network is behind."""
        if self._connector.session is None or self._outbox.backlogged:
            return False
        self._outbox.put(Outgoing(encode_text(thumbnail_message(jpeg)), Kind.TEXT))
        self.thumbnails_sent += 1
        return True

    def send_audio(self, payload: bytes, capture_time_us: int) -> bool:
        """Send one audio packet (an Opus packet); True if it was sent or queued.  It is
        dropped alone when not connected or when the outbox is full."""
        if self._connector.session is None:
            return False
        message = Outgoing(encode_media(FLAG_AUDIO, capture_time_us, payload), Kind.AUDIO)
        if self._outbox.offer_audio(message):
            return True
        self.stats.audio_dropped += 1
        return False

    # -- sending (any thread) --------------------------------------------------------------

    def send_thumbnail_threadsafe(self, jpeg: bytes) -> None:
        """:meth:`send_thumbnail` from any thread."""
        self._reactor_call(self.send_thumbnail, bytes(jpeg))

    def send_meta_threadsafe(self, meta: Mapping[str, Any]) -> None:
        """:meth:`send_meta` from any thread."""
        self._reactor_call(self.send_meta, dict(meta))

    def send_config_threadsafe(self, payload: bytes, capture_time_us: int | None = None) -> None:
        """:meth:`send_config` from any thread (the capture time defaults to the call's)."""
        stamp = now_us() if capture_time_us is None else capture_time_us
        self._reactor_call(self.send_config, bytes(payload), stamp)

    def send_frame_threadsafe(
        self, payload: bytes, *, key: bool, capture_time_us: int | None = None
    ) -> bool:
        """:meth:`send_frame` from one producer thread; False if dropped at the handoff.

        At most ``max_pending_threadsafe_calls`` frames wait for the reactor thread; past
        that a frame is dropped here, and so is every frame after it until a KEY, so the
        stream stays decodable; a keyframe is then requested through
        ``on_keyframe_request``. Check :attr:`readiness` before encoding to drop raw frames
        instead of encoded ones.
        """
        stamp = now_us() if capture_time_us is None else capture_time_us
        if not self._handoff.reserve(key):
            return False
        self._reactor_call(self._deliver_frame, bytes(payload), key, stamp)
        return True

    def send_audio_threadsafe(self, payload: bytes, capture_time_us: int) -> bool:
        """:meth:`send_audio` from one producer thread; False if dropped at its handoff
        (at most 25 packets wait for the reactor thread)."""
        if not self._audio_handoff.reserve(True):
            self.stats.audio_dropped += 1
            return False
        self._reactor_call(self._deliver_audio, bytes(payload), capture_time_us)
        return True

    def _deliver_audio(self, payload: bytes, capture_time_us: int) -> None:
        self._audio_handoff.release()
        self.send_audio(payload, capture_time_us)

    def stop_threadsafe(self, reason: str = "publisher stopped") -> None:
        """:meth:`stop` from any thread."""
        self._reactor_call(self.stop, reason)

    # -- the session (hooks called by the connector) ---------------------------------------

    def _session_opened(self, session: RelayConnection) -> None:
        self.stats.connects += 1
        self._outbox.reset()
        if self._meta is not None:
            self._outbox.put(Outgoing(self._meta, Kind.TEXT))
        if self._config is not None:
            self._send_config(now_us())
        if self._reports_activity:
            self._send_activity()
        # A new connection starts at a KEY: ask for one now rather than wait a whole GOP.
        self._request_keyframe()

    def _session_closed(self) -> None:
        self.viewers = None
        self.viewer_report = None
        self._outbox.reset()
        if self._on_demand is not None:
            self._on_demand.update(None)

    def _message_received(self, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            _log.debug("ignoring a binary message from the relay")
            return
        try:
            message = parse_text(payload)
        except WireError as error:
            _log.warn("ignoring a bad message from the relay: {error}", error=error)
            return
        kind = message.get("type")
        if kind == "viewers":
            count = message.get("count")
            if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                self.viewers = count
                if self._on_demand is not None:
                    self._on_demand.update(count)
                if self.on_viewers is not None:
                    self.on_viewers(count)
        elif kind == "keyframe-request":
            self.stats.keyframe_requests += 1
            self._request_keyframe()
        elif kind == "viewer-report":
            self.viewer_report = message

    def _transport_resumed(self) -> None:
        if self._outbox.resume():
            self._request_keyframe()

    def set_activity(self, activity: Activity) -> None:
        """Go idle or active: what ``on_demand`` decides by itself, or what a caller
        decides that publishes several connections and sums their audience (it then
        leaves ``on_demand`` off and drives one :class:`OnDemand` for all of them)."""
        self._reports_activity = True
        if (activity is Activity.IDLE) == self._idle:
            return
        self._idle = activity is Activity.IDLE
        why = "nobody watches" if self._idle else "a viewer came"
        _log.info("on demand: {activity} ({why})", activity=activity.value, why=why)
        if self._connector.session is not None:
            self._send_activity()
            if not self._idle and self._config is not None:
                # Viewers of the idle stream wait for CONFIG and KEY: both come first.
                self._send_config(now_us())
        if not self._idle:
            # Also wakes a capture thread waiting for this (CapturePipeline.request_keyframe).
            self._request_keyframe()
        if self.on_activity_change is not None:
            self.on_activity_change(activity)

    def _send_activity(self) -> None:
        state = "idle" if self._idle else "active"
        message = encode_text({"type": "publisher-state", "state": state})
        self._outbox.put(Outgoing(message, Kind.TEXT))

    # -- internals -------------------------------------------------------------------------

    def _send_config(self, capture_time_us: int) -> None:
        assert self._config is not None
        self._outbox.put(
            Outgoing(encode_media(FLAG_CONFIG, capture_time_us, self._config), Kind.CONFIG)
        )

    def _request_keyframe(self) -> None:
        self._outbox.keyframe_owed = False
        if self.on_keyframe_request is not None:
            self.on_keyframe_request()

    def _write(self, message: Outgoing) -> None:
        session = self._connector.session
        assert session is not None, "the outbox writes only while a session is open"
        if not session.writable:
            # The relay started closing (1001 on its shutdown, 4409 on a takeover) and the
            # loss is not reported yet: the next session starts again from CONFIG and KEY.
            return
        session.sendMessage(message.data, isBinary=message.is_binary)
        stats = self.stats
        stats.messages_sent += 1
        stats.bytes_sent += len(message.data)
        if message.kind is Kind.CONFIG:
            stats.configs_sent += 1
        elif message.kind is Kind.AUDIO:
            stats.audio_sent += 1
        elif message.kind is not Kind.TEXT:
            stats.frames_sent += 1
            if message.kind is Kind.KEY:
                stats.keyframes_sent += 1

    def _deliver_frame(self, payload: bytes, key: bool, capture_time_us: int) -> None:
        self._handoff.release()
        self.send_frame(payload, key=key, capture_time_us=capture_time_us)

    def _reactor_call(self, function: Callable[..., object], *args: object) -> None:
        reactor: Any = self._reactor
        reactor.callFromThread(function, *args)


__all__ = ["Activity", "ConnectionState", "Publisher", "PublisherStats", "Readiness"]
