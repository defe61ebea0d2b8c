"""Named streams, their publisher and their viewers: the relay's network-free core.

Protocol adapters talk to this module through two small handles:
:class:`PublisherSession` (media and metadata in) and :class:`ViewerSession` (a
:class:`~streamrelay.viewer_queue.ViewerQueue` out).  Connections appear here only through
the :class:`PublisherLink` and :class:`~streamrelay.viewer_queue.ViewerSink` interfaces,
so every rule can be tested with a ``Clock`` and no sockets.

Relay to relay (docs/cluster.md): an edge pulling a stream from here attaches as a viewer
with its own queue bound and reports how many viewers it serves (``relay_counts``); on
an edge, a pull from the upstream attaches as the stream's publisher (``pulled``), and the
registry tells its :class:`Puller` when a stream needs one and when it no longer does.

(Over 400 lines: the stream, its two session handles and the registry share one
lifecycle -- create, attach, detach, forget -- and its admission rules, which read best
together, relay-to-relay hooks included; the rate window and the throttle live in
:mod:`streamrelay.rates`.)
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from streamrelay.abr import Rendition, parse_renditions
from streamrelay.budget import BufferBudget
from streamrelay.config import RelayConfig
from streamrelay.fanout import DirectSet
from streamrelay.gop import GopCache
from streamrelay.limits import Refusal, WaitingStreams
from streamrelay.logs import relay_logger
from streamrelay.names import base_name
from streamrelay.rates import RateWindow, Throttle
from streamrelay.reports import ReportWindow, ViewerReport
from streamrelay.thumbnails import ThumbnailSlot
from streamrelay.viewer_queue import FrameFactory, ViewerQueue, ViewerSink
from streamrelay.wire import (
    FLAG_AUDIO,
    MediaInfo,
    MediaMessage,
    WireError,
    encode_text,
    parse_text,
    thumbnail_message,
)

_log = relay_logger(__name__)

VIEWER_COUNT_MIN_GAP = 0.25

# While an adaptive viewer waits to switch to a stream, its latest audio messages (half
# a second of 20 ms packets, each no larger than a 20 ms Opus packet can be, ~1.3 KB,
# with room: at most 100 KiB) are kept: they go to the viewer after the KEY when its old
# rendition had not delivered them yet (streamrelay.adaptive; renditions' audio reaches
# the relay on separate connections, not in step).
SWITCH_AUDIO_MESSAGES = 25
SWITCH_AUDIO_MAX_BYTES = 4 * 1024
# How often a publisher gets the summary of its viewers' reports while there are any.
VIEWER_REPORT_INTERVAL = 5.0
# A publisher's idle/active flips take effect at most once per this many seconds (each
# sheds the GOP and sends every viewer a status): later ones wait, the latest wins.
PUBLISHER_STATE_MIN_GAP = 1.0


class PublisherLink(Protocol):
    """What the core needs from a publisher connection."""

    @property
    def peer_address(self) -> str:
        """The publisher's address as ``ip:port`` (or a unix socket path)."""
        ...

    def send_viewer_count(self, count: int) -> None:
        """Tell the publisher how many viewers watch."""

    def send_keyframe_request(self) -> None:
        """Ask the publisher for a keyframe."""

    def replaced(self) -> None:
        """A newer publisher took the stream over: close with 4409."""


class Puller(Protocol):
    """What the registry asks of the upstream pull manager (:mod:`streamrelay.upstream`);
    the core itself never connects anywhere."""

    def check(self, name: str) -> Refusal | None:
        """Why a viewer of ``name``, which would need a pull, must be refused now."""

    def want(self, name: str) -> None:
        """``name`` has local viewers and no local publisher: pull it (again), or keep
        the pull that serves it."""

    def release(self, name: str) -> None:
        """``name`` lost its last local viewer: end its pull after the grace period."""

    def stop(self, name: str) -> None:
        """A local publisher took ``name``: end its pull now."""

    def describe(self, name: str) -> dict[str, Any] | None:
        """The pull of ``name`` for ``/api/streams``, or None when there is none."""


class Origins(Protocol):
    """What the registry tells the cluster directory (:mod:`streamrelay.cluster`) and asks
    it, from its cached view only (the handshake never waits for the network)."""

    def published(self, name: str) -> None:
        """A local publisher has ``name``: this node is its origin."""

    def unpublished(self, name: str) -> None:
        """The local publisher of ``name`` left."""

    def check_publisher(self, name: str) -> Refusal | None:
        """Why a publisher of ``name`` must be refused cluster-wide (``--no-takeover``)."""


# A rendition switch waiting for a stream's next KEY (streamrelay.adaptive): called
# with the stream, the KEY and its prepared frame.
SwitchAtKey = Callable[["Stream", MediaInfo, Any], None]


def renditions_of(raw: bytes, base: str) -> tuple[Rendition, ...] | None:
    """The rendition set announced by a ``meta`` of base stream ``base``, or None (no
    set, or a malformed one: ignored, the stream stays a plain v1 stream)."""
    try:
        return parse_renditions(parse_text(raw), base)
    except WireError:
        return None


class Stream:
    """One named stream: at most one publisher, any number of viewers, a GOP cache."""

    def __init__(self, registry: StreamRegistry, name: str) -> None:
        self.name = name
        self._registry = registry
        clock = registry.clock
        config = registry.config
        self.publisher: PublisherLink | None = None
        self.publisher_since: float | None = None
        self.viewers: dict[ViewerSink, ViewerQueue] = {}
        # The viewers (edges included) that take audio: audio goes to them alone, so a
        # viewer without audio costs nothing per audio message.
        self.audio_viewers: dict[ViewerSink, ViewerQueue] = {}
        # The same viewers for the fan-out (streamrelay.fanout): those that keep up get
        # each message straight to their socket.
        self.video_out = DirectSet()
        self.audio_out = DirectSet(audio=True)
        self.audio_in = 0
        # The publisher is a pull from the upstream, not a local connection.
        self.pulled = False
        # Edges pulling this stream from here, with the viewers each reports.
        self.relay_counts: dict[ViewerSink, int] = {}
        self.gop: GopCache[Any] = GopCache(
            config.gop_cache_bytes, registry.budget.adjust, config.gop_cache_messages
        )
        registry.budget.add_cache(self.gop)
        self.meta: tuple[Any, int] | None = None
        # A base stream's rendition set, from its meta (docs/protocol.md "Renditions"),
        # and the adaptive viewers waiting for this stream's next KEY to switch to it.
        self.renditions: tuple[Rendition, ...] | None = None
        self.switchers: dict[ViewerSink, SwitchAtKey] = {}
        self.switch_audio: deque[tuple[MediaInfo, Any]] = deque(maxlen=SWITCH_AUDIO_MESSAGES)
        # The viewers that are adaptive (of this stream's base), for /api/streams.
        self.adaptive_viewers: set[ViewerSink] = set()
        # Adaptive viewers idle until this base stream announces a set (called once).
        self.set_listeners: dict[ViewerSink, Callable[[], None]] = {}
        # The capture time of the latest media message (a switch never goes back in time).
        self.latest_capture_us = 0
        self.messages_in = 0
        self.bytes_in = 0
        self.keyframes = 0
        self.dropped = 0
        self.keyframe_requests = 0
        # What the viewers that left were sent (those still here keep it in their queue).
        self.messages_out = 0
        self.bytes_out = 0
        self.rate = RateWindow(clock)
        self._keyframe_requests = Throttle(
            clock, config.keyframe_request_interval, self._send_keyframe_request
        )
        self._viewer_count_updates = Throttle(clock, VIEWER_COUNT_MIN_GAP, self._send_viewer_count)
        self._last_viewer_count_sent: int | None = None
        # The publisher said it is idle (on demand, nobody watches): the stream is
        # "available" rather than live, and sends no media until it turns active.
        self.publisher_idle = False
        # The publisher's latest thumbnail and the viewers' reports (docs/protocol.md).
        self.thumbnail = ThumbnailSlot(clock, registry.budget.adjust)
        self.reports = ReportWindow(clock)
        self._report_call: Any = None

    @property
    def state(self) -> str:
        """``live``, ``available`` (a connected publisher idle on demand) or ``offline``."""
        if self.publisher is None:
            return "offline"
        return "available" if self.publisher_idle else "live"

    @property
    def live(self) -> bool:
        """True while a publisher is connected."""
        return self.publisher is not None

    @property
    def local_publisher(self) -> bool:
        """True while a publisher connected to this relay feeds the stream."""
        return self.publisher is not None and not self.pulled

    @property
    def audience(self) -> int:
        """Who watches through this relay: its viewers, edges not counted as such, plus
        the viewers every edge reports."""
        return len(self.viewers) - len(self.relay_counts) + sum(self.relay_counts.values())

    @property
    def idle(self) -> bool:
        """True when nothing holds the stream: it is then removed."""
        return self.publisher is None and not self.viewers and not self.switchers

    # -- publisher side ---------------------------------------------------------------

    def attach_publisher(
        self, link: PublisherLink, *, pulled: bool = False, idle: bool = False
    ) -> None:
        previous = self.publisher
        origins = self._registry.origins
        if origins is not None and not pulled:
            origins.published(self.name)
        # live_streams counts local publishers only: pulls have their own cap.
        self._registry.live_streams += (0 if pulled else 1) - int(self.local_publisher)
        self.pulled = pulled
        self.publisher = link
        self.publisher_since = self._registry.clock.seconds()
        self.publisher_idle = idle
        # A switch waiting here must not replay the previous publisher's audio.
        self.switch_audio.clear()
        self.gop.clear()
        self.thumbnail.clear()
        self.reports.clear()
        # An edge passes its viewers' reports on to the upstream it pulls from.
        self.reports.forwarding = pulled
        self._keyframe_requests.reset()
        self._viewer_count_updates.reset()
        self._last_viewer_count_sent = None
        if previous is not None:
            _log.info("Stream {stream}: publisher replaced", stream=self.name)
            self.meta = None
            self.renditions = None
            for queue in self.viewers.values():
                queue.expect_new_source()
            previous.replaced()
        else:
            self._broadcast_status("live")
        self._viewer_count_updates.request()
        if self.switchers or any(queue.waiting_for_key for queue in self.viewers.values()):
            self.need_keyframe()

    def detach_publisher(self, link: PublisherLink) -> None:
        if self.publisher is not link:
            return
        origins = self._registry.origins
        if origins is not None and self.local_publisher:
            origins.unpublished(self.name)
        self._registry.live_streams -= int(self.local_publisher)
        self.pulled = False
        self.publisher = None
        self.publisher_since = None
        self.switch_audio.clear()
        self.publisher_idle = False
        self.gop.clear()
        self.thumbnail.clear()
        self.reports.forwarding = False
        self.meta = None
        self.renditions = None
        self._keyframe_requests.reset()
        self._viewer_count_updates.reset()
        for queue in self.viewers.values():
            queue.expect_new_source()
        self._broadcast_status("offline")

    def publish_media(self, message: MediaMessage) -> None:
        if message.flags & FLAG_AUDIO:
            self._publish_audio(message)
            return
        if self.publisher_idle and not message.is_config:
            # A frame from a publisher that said idle: it is evidently active again.
            self.set_publisher_idle(False)
        self.latest_capture_us = message.capture_time_us
        self.messages_in += 1
        self.bytes_in += message.size
        if message.is_key:
            self.keyframes += 1
        self.rate.add(message.size, 0 if message.is_config else 1)
        frame = self._registry.frame_factory(message.data, True)
        info = message.info()
        self.gop.add(info, frame)
        if info.is_config:
            # Rare, and each queue keeps it for its next KEY: every viewer's own path.
            for queue in list(self.viewers.values()):
                queue.send_media(info, frame)
        else:
            self.video_out.deliver(info, frame)
        if self.switchers and info.is_key:
            # After the viewers: a switcher moves into them and sends this KEY itself.
            for switch in list(self.switchers.values()):
                switch(self, info, frame)

    def _publish_audio(self, message: MediaMessage) -> None:
        self.messages_in += 1
        self.bytes_in += message.size
        self.audio_in += 1
        self.rate.add(message.size, 0)
        frame = self._registry.frame_factory(message.data, True)
        info = message.info()
        self.gop.add(info, frame)
        if self.switchers and info.size <= SWITCH_AUDIO_MAX_BYTES:
            self.switch_audio.append((info, frame))
        self.audio_out.deliver(info, frame)

    def upstream_audio_gap(self, count: int) -> None:
        """The upstream dropped ``count`` audio messages on their way here: every audio
        viewer's next audio is preceded by a ``dropped`` notice counting them."""
        for queue in list(self.audio_viewers.values()):
            queue.audio_gap(count)

    def publish_meta(self, raw: bytes) -> None:
        frame = self._registry.frame_factory(raw, False)
        self.meta = (frame, len(raw))
        if base_name(self.name) == self.name:
            self.renditions = renditions_of(raw, self.name)
            if self.renditions is not None and self.set_listeners:
                listeners, self.set_listeners = self.set_listeners, {}
                for listener in listeners.values():
                    listener()
        for queue in list(self.viewers.values()):
            queue.send_text(frame, len(raw), "meta")

    def set_publisher_idle(self, idle: bool) -> None:
        """The publisher went idle (on demand, nobody watches) or active again.

        Idle: the cached GOP is let go (a joining viewer must not get minutes-old
        pictures), the CONFIG kept. Viewers hear of it in their status message.
        """
        if idle == self.publisher_idle or self.publisher is None:
            return
        self.publisher_idle = idle
        state = "idle" if idle else "active"
        _log.info("Stream {stream}: publisher {state}", stream=self.name, state=state)
        if idle:
            self.gop.shed(counted=False)
        self._broadcast_status("live")

    def _send_keyframe_request(self) -> None:
        if self.publisher is not None:
            self.keyframe_requests += 1
            self.publisher.send_keyframe_request()

    def need_keyframe(self) -> None:
        """A viewer needs a KEY the cache cannot give; rate-limited, never lost."""
        if self.publisher is not None:
            self._keyframe_requests.request()

    def upstream_gap(self, count: int) -> None:
        """The upstream dropped ``count`` messages on their way here: the cached GOP has
        a hole, and every viewer sees the gap as a drop episode (``dropped``, then the
        CONFIG if it changed, then a KEY)."""
        self.gop.shed()
        for queue in list(self.viewers.values()):
            queue.skip_for_gap(count)

    def report_relay_viewers(self, sink: ViewerSink, count: int) -> None:
        """An edge pulling from here serves ``count`` viewers."""
        if sink in self.relay_counts and self.relay_counts[sink] != count:
            self.relay_counts[sink] = count
            self._request_viewer_count()

    def thumbnail_to_edges(self, sink: ViewerSink | None = None) -> None:
        """Pass the current thumbnail on to the edges pulling the stream (``sink``: that
        one only, which just attached), so that they serve it too.  Disposable, as from
        the publisher: an edge whose transport is full skips it and gets a later one."""
        thumb = self.thumbnail.current
        sinks = list(self.relay_counts) if sink is None else [sink]
        if thumb is None or not sinks:
            return
        raw = encode_text(thumbnail_message(thumb.jpeg))
        frame = self._registry.frame_factory(raw, False)
        for edge in sinks:
            queue = self.viewers.get(edge)
            if queue is not None and not queue.paused:
                queue.send_text(frame, len(raw), "thumbnail")

    def viewer_report(self, report: ViewerReport) -> None:
        """A viewer reported its playback; the publisher hears the summary within
        :data:`VIEWER_REPORT_INTERVAL`."""
        self.reports.add(report)
        if self._report_call is None:
            self._report_call = self._registry.clock.callLater(
                VIEWER_REPORT_INTERVAL, self._send_viewer_report
            )

    def _send_viewer_report(self) -> None:
        # Every interval while the window holds reports, and once more when it empties
        # (the publisher then shows none); no timer runs for a stream nobody reports on.
        self._report_call = None
        summary = self.reports.summary()
        if self.pulled:
            # On an edge: the reports themselves go upstream, to the publisher's relay.
            rows = self.reports.take_new()
            forward = getattr(self.publisher, "forward_viewer_reports", None)
            if rows and forward is not None:
                forward(rows)
        else:
            send = getattr(self.publisher, "send_viewer_report", None)
            if send is not None:
                send(summary)
        if summary["reports"]:
            self._report_call = self._registry.clock.callLater(
                VIEWER_REPORT_INTERVAL, self._send_viewer_report
            )

    def _send_viewer_count(self) -> None:
        count = self.audience
        if self.publisher is not None and count != self._last_viewer_count_sent:
            self._last_viewer_count_sent = count
            self.publisher.send_viewer_count(count)

    # -- viewer side ------------------------------------------------------------------

    def attach_viewer(
        self,
        sink: ViewerSink,
        *,
        relay: bool = False,
        intro: tuple[Any, int] | None = None,
        audio: bool = False,
    ) -> ViewerQueue:
        config = self._registry.config
        if relay:
            self.relay_counts[sink] = 0
        queue = ViewerQueue(
            sink,
            self._registry.clock,
            self._registry.frame_factory,
            limit=config.relay_queue_bytes if relay else config.viewer_queue_bytes,
            stall_timeout=config.viewer_stall_timeout,
            on_backlog_change=self._registry.budget.adjust,
            on_dropped=self._count_dropped,
            on_need_keyframe=self.need_keyframe,
        )
        self.viewers[sink] = queue
        self.video_out.add(queue)
        # An edge always takes audio: it may serve viewers that do.
        audio = audio or relay
        if audio:
            self.audio_viewers[sink] = queue
            self.audio_out.add(queue)
        self._registry.budget.add_viewer(queue)
        sink.attached(queue)
        frame, size = self._status_frame("live" if self.live else "offline")
        queue.send_text(frame, size, "status")
        if intro is not None:
            queue.send_text(intro[0], intro[1], "rendition")
        if self.meta is not None:
            queue.send_text(self.meta[0], self.meta[1], "meta")
        queue.start(self.gop.start_sequence(audio), self.gop.config)
        if relay:
            self.thumbnail_to_edges(sink)
        if queue.waiting_for_key:
            self.need_keyframe()
        self._request_viewer_count()
        return queue

    def detach_viewer(self, sink: ViewerSink) -> None:
        queue = self.viewers.pop(sink, None)
        self.relay_counts.pop(sink, None)
        self.audio_viewers.pop(sink, None)
        self.adaptive_viewers.discard(sink)
        if queue is None:
            return
        self.video_out.remove(queue)
        self.audio_out.remove(queue)
        queue.close()
        self.messages_out += queue.sent_messages
        self.bytes_out += queue.bytes_sent
        self._registry.budget.remove(queue)
        self._viewer_count_updates.request()

    def _request_viewer_count(self) -> None:
        if self.publisher_idle and not self._last_viewer_count_sent and self.audience:
            # The count an idle publisher waits for to resume (0 -> N): no coalescing delay.
            self._viewer_count_updates.reset()
        self._viewer_count_updates.request()

    def _status_frame(self, state: str) -> tuple[Any, int]:
        return self._registry.status_frame(state, idle=state == "live" and self.publisher_idle)

    def release_viewer(self, sink: ViewerSink) -> ViewerQueue | None:
        """Let a viewer go without closing its queue (it moves to another rendition)."""
        queue = self.viewers.pop(sink, None)
        self.audio_viewers.pop(sink, None)
        self.adaptive_viewers.discard(sink)
        if queue is not None:
            self.video_out.remove(queue)
            self.audio_out.remove(queue)
            self._viewer_count_updates.request()
        return queue

    def adopt_viewer(self, sink: ViewerSink, queue: ViewerQueue, audio: bool = False) -> None:
        """Take over an adaptive viewer's queue from another rendition: it counts here
        from now (and takes this rendition's audio when ``audio``: every rendition
        carries it)."""
        queue.rebind(self._count_dropped, self.need_keyframe)
        self.viewers[sink] = queue
        self.video_out.add(queue)
        self.adaptive_viewers.add(sink)
        if audio:
            self.audio_viewers[sink] = queue
            self.audio_out.add(queue)
        self._request_viewer_count()

    def _count_dropped(self, count: int) -> None:
        self.dropped += count

    def _broadcast_status(self, state: str) -> None:
        frame, size = self._status_frame(state)
        for queue in list(self.viewers.values()):
            queue.send_text(frame, size, "status")

    def close(self) -> None:
        """Release timers and cached bytes; the stream is leaving the registry."""
        self._keyframe_requests.cancel()
        self._viewer_count_updates.cancel()
        self.gop.clear()
        self._registry.budget.remove(self.gop)
        self.thumbnail.clear()
        if self._report_call is not None and self._report_call.active():
            self._report_call.cancel()
        self._report_call = None

    def describe(self, show_peer: bool) -> dict[str, Any]:
        """The stream's entry in ``/api/streams``; a relay with ``--upstream`` adds the
        stream's ``source`` and its ``upstream`` pull, one with ``--relay-secret-file``
        the edges pulling it (``relays``) and its whole ``audience``."""
        bitrate, fps = self.rate.rates()
        publisher = None
        if self.local_publisher and self.publisher_since is not None:
            assert self.publisher is not None
            since = datetime.datetime.fromtimestamp(self.publisher_since, datetime.timezone.utc)
            publisher = {
                "peer": self.publisher.peer_address if show_peer else None,
                "since": since.isoformat(timespec="seconds").replace("+00:00", "Z"),
            }
        entry = {
            "name": self.name,
            "live": self.live,
            "state": self.state,
            "viewers": len(self.viewers) - len(self.relay_counts),
            "publisher": publisher,
            "messages_in": self.messages_in,
            "bytes_in": self.bytes_in,
            "keyframes": self.keyframes,
            "dropped": self.dropped,
            "bitrate_bps": bitrate,
            "fps": fps,
            "thumbnail": (
                {"etag": thumb.etag, "bytes": len(thumb.jpeg)}
                if (thumb := self.thumbnail.current) is not None
                else None
            ),
            "viewer_reports": self.reports.summary(),
            # Renditions (docs/protocol.md): a base stream's announced set, and how many
            # of the viewers are adaptive ones that the relay moves between renditions.
            "renditions": (
                [rendition.listing() for rendition in self.renditions] if self.renditions else None
            ),
            "adaptive_viewers": len(self.adaptive_viewers),
        }
        config = self._registry.config
        if config.upstream:
            source = "upstream" if self.pulled else "publisher" if self.live else None
            puller = self._registry.puller
            entry["source"] = source
            entry["upstream"] = puller.describe(self.name) if puller is not None else None
        if config.relay_secret is not None:
            entry["relays"] = len(self.relay_counts)
            entry["audience"] = self.audience
        return entry


@dataclass
class StreamTotals:
    """Counts summed over streams, for metrics that never go down: streams that are gone
    are added here when the registry forgets them."""

    messages_in: int = 0
    bytes_in: int = 0
    keyframes: int = 0
    dropped: int = 0
    keyframe_requests: int = 0
    cache_discarded: int = 0
    messages_out: int = 0
    bytes_out: int = 0

    def add(self, stream: Stream) -> None:
        """Add ``stream``'s counts, its viewers' included."""
        self.messages_in += stream.messages_in
        self.bytes_in += stream.bytes_in
        self.keyframes += stream.keyframes
        self.dropped += stream.dropped
        self.keyframe_requests += stream.keyframe_requests
        self.cache_discarded += stream.gop.discarded
        self.messages_out += stream.messages_out
        self.bytes_out += stream.bytes_out
        for queue in stream.viewers.values():
            self.messages_out += queue.sent_messages
            self.bytes_out += queue.bytes_sent


class PublisherSession:
    """A publisher's handle on its stream (``pulled``: a pull from the upstream)."""

    def __init__(
        self, registry: StreamRegistry, stream: Stream, link: PublisherLink, pulled: bool = False
    ) -> None:
        self._registry = registry
        self.stream = stream
        self._link = link
        self.pulled = pulled
        self.closed = False
        # ``publisher-state`` flips, bounded (docs/protocol.md "Publishing on demand"):
        # the state last asked for, applied at most once per PUBLISHER_STATE_MIN_GAP.
        self._wanted_idle: bool | None = None
        self._state_updates = Throttle(
            registry.clock, PUBLISHER_STATE_MIN_GAP, self._apply_publisher_state
        )
        self.state_messages = 0
        self.state_changes = 0

    @property
    def current(self) -> bool:
        """False once a newer publisher replaced this one."""
        return not self.closed and self.stream.publisher is self._link

    def media(self, message: MediaMessage) -> None:
        """Relay one media message to the stream's viewers and cache."""
        if self.current:
            if self._wanted_idle and not message.is_config and not message.flags & FLAG_AUDIO:
                # A frame after an ``idle`` still waiting its turn: the frame is newer.
                self._wanted_idle = False
            self.stream.publish_media(message)

    def meta(self, raw: bytes) -> None:
        """Keep and forward stream metadata (a JSON object of type ``meta``)."""
        if self.current:
            self.stream.publish_meta(raw)

    def publisher_state(self, idle: bool) -> None:
        """The publisher reported itself idle (on demand) or active.  Flips take effect
        at most once per :data:`PUBLISHER_STATE_MIN_GAP` (each costs a status message to
        every viewer): one inside the gap waits for its end, and the latest state asked
        for then wins, so the stream always ends in the publisher's last word."""
        if not self.current:
            return
        self.state_messages += 1
        if self._wanted_idle is None and idle == self.stream.publisher_idle:
            return  # no change and none waiting (the state a publisher sends on connect)
        self._wanted_idle = idle
        self._state_updates.request()

    def _apply_publisher_state(self) -> None:
        wanted, self._wanted_idle = self._wanted_idle, None
        if wanted is not None and self.current and wanted != self.stream.publisher_idle:
            self.state_changes += 1
            self.stream.set_publisher_idle(wanted)

    @property
    def idle(self) -> bool:
        """True while the publisher is idle on demand (it sends no media then)."""
        return self.current and self.stream.publisher_idle

    def thumbnail(self, message: dict[str, Any]) -> bool:
        """Keep the stream's thumbnail (a ``thumbnail`` text message); False when
        ignored by the rate limit.  Raises :class:`~streamrelay.wire.WireError`."""
        accepted = self.current and self.stream.thumbnail.offer(message)
        if accepted:
            self.stream.thumbnail_to_edges()
        return accepted

    def gap(self, count: int) -> None:
        """The upstream dropped ``count`` messages towards this relay (pulls only)."""
        if self.current:
            self.stream.upstream_gap(count)

    def audio_gap(self, count: int) -> None:
        """The upstream dropped ``count`` audio messages towards this relay (pulls only)."""
        if self.current:
            self.stream.upstream_audio_gap(count)

    def close(self) -> None:
        """The publisher connection is gone."""
        if self.closed:
            return
        self.closed = True
        self._state_updates.cancel()
        self.stream.detach_publisher(self._link)
        self._registry._forget_if_idle(self.stream)
        if not self.pulled:
            # Viewers left without a local publisher: the upstream may serve them.
            self._registry._want_pull(self.stream)


class ViewerSession:
    """A viewer's handle on its stream; ``queue`` is its outbound queue."""

    # One per viewer, for the connection's life: no per-instance dict.
    __slots__ = ("_address", "_registry", "_sink", "closed", "queue", "stream")

    def __init__(
        self,
        registry: StreamRegistry,
        stream: Stream,
        sink: ViewerSink,
        address: str | None,
        relay: bool = False,
        intro: tuple[Any, int] | None = None,
        audio: bool = False,
    ) -> None:
        self._registry = registry
        self.stream = stream
        self._sink = sink
        self._address = address
        if registry.waiting.is_waiting(stream.name):
            registry.waiting.hold(stream.name, address)
        self.queue = stream.attach_viewer(sink, relay=relay, intro=intro, audio=audio)
        self.closed = False

    def report_viewers(self, count: int) -> None:
        """The edge on the other end serves ``count`` viewers (relay sessions only)."""
        if not self.closed:
            self.stream.report_relay_viewers(self._sink, count)

    def send_text(self, raw: bytes) -> None:
        """Send the viewer a text message of its own (an answer), in order with media."""
        if not self.closed:
            self.queue.send_text(self._registry.frame_factory(raw, False), len(raw), "answer")

    def report(self, report: ViewerReport) -> None:
        """The viewer reported its playback (validated and rate-limited already)."""
        if not self.closed:
            self.stream.viewer_report(report)

    def request_keyframe(self) -> None:
        """The viewer asked for a keyframe."""
        if not self.closed:
            self.queue.request_keyframe()

    def close(self) -> None:
        """The viewer connection is gone."""
        if self.closed:
            return
        self.closed = True
        self._registry.waiting.release(self.stream.name, self._address)
        self.stream.detach_viewer(self._sink)
        self._registry._forget_if_idle(self.stream)
        puller = self._registry.puller
        if puller is not None and not self.stream.viewers:
            puller.release(self.stream.name)


class StreamRegistry:
    """All streams by name; creates them on demand and forgets them when idle.

    ``--max-streams`` bounds the streams that have a publisher: only a publisher is
    refused by it, and viewers never count towards it.  Names that only viewers hold,
    waiting for a first publisher, have their own bounds (:class:`WaitingStreams`).
    """

    def __init__(
        self, config: RelayConfig, clock: IReactorTime, frame_factory: FrameFactory
    ) -> None:
        self.config = config
        self.clock = clock
        self.frame_factory = frame_factory
        self.budget = BufferBudget(config.max_buffered_bytes)
        self.streams: dict[str, Stream] = {}
        self.waiting = WaitingStreams(
            config.max_waiting_streams, config.max_waiting_streams_per_ip
        )
        self.live_streams = 0
        # Set on a relay with --upstream (streamrelay.upstream) or --cluster.
        self.puller: Puller | None = None
        # Set on a relay with --cluster (streamrelay.cluster).
        self.origins: Origins | None = None
        # The counts of the streams already forgotten.
        self.retired = StreamTotals()
        # Adaptive viewers' rendition changes by reason (start, down, up, offline) and
        # the switches not made by why (viewer_limit, no_key): streamrelay.adaptive.
        self.rendition_switches: dict[str, int] = {}
        self.rendition_switches_refused: dict[str, int] = {}
        # The status messages, framed once: every join sends one.
        self._status_frames: dict[tuple[str, bool], tuple[Any, int]] = {}

    def status_frame(self, state: str, idle: bool = False) -> tuple[Any, int]:
        """The prepared ``status`` message for ``state`` and its size; ``idle`` adds
        ``"publisher": "idle"`` (a live stream whose publisher idles on demand)."""
        found = self._status_frames.get((state, idle))
        if found is None:
            message = {"type": "status", "state": state}
            if idle:
                message["publisher"] = "idle"
            raw = encode_text(message)
            found = self._status_frames[state, idle] = (self.frame_factory(raw, False), len(raw))
        return found

    # -- admission (answered in the HTTP handshake) -----------------------------------

    def check_publisher(self, name: str, address: str | None = None) -> Refusal | None:
        """Why a publisher for ``name`` would be refused now, or None.  Viewers never
        make a publisher wait: only streams with a publisher count.  (``address`` is
        accepted for symmetry with :meth:`check_viewer`; publishers have no per-address
        stream bound.)"""
        stream = self.streams.get(name)
        # A pull from the upstream is no publisher here: a local one always replaces it.
        if stream is not None and stream.local_publisher:
            if not self.config.takeover:
                return Refusal(409, "stream already has a publisher")
            return None
        if self.origins is not None and (stream is None or not stream.local_publisher):
            refusal = self.origins.check_publisher(name)
            if refusal is not None:
                return refusal
        if self.live_streams >= self.config.max_streams:
            return Refusal(503, "stream limit reached", retry_after=10)
        return None

    def check_viewer(self, name: str, address: str | None = None) -> Refusal | None:
        """Why a viewer of ``name`` from ``address`` (the key of the per-address limits;
        None skips the per-address bound) would be refused now, or None."""
        stream = self.streams.get(name)
        if stream is None or self.waiting.is_waiting(name):
            refusal = self.waiting.check(name, address)
            if refusal is not None:
                return refusal
        if self.puller is not None and (stream is None or not stream.local_publisher):
            refusal = self.puller.check(name)
            if refusal is not None:
                return refusal
        if stream is None:
            return None
        limit = self.config.max_viewers_per_stream
        if limit and len(stream.viewers) >= limit:
            return Refusal(503, "stream viewer limit reached", retry_after=10)
        return None

    # -- sessions ---------------------------------------------------------------------

    def _stream(self, name: str) -> Stream:
        stream = self.streams.get(name)
        if stream is None:
            stream = self.streams[name] = Stream(self, name)
        return stream

    def publish(self, name: str, link: PublisherLink) -> PublisherSession | Refusal:
        """Attach a publisher to ``name``, replacing a current one."""
        refusal = self.check_publisher(name)
        if refusal is not None:
            return refusal
        stream = self._stream(name)
        # Its viewers no longer wait for a name that may never come: it is a stream.
        self.waiting.forget(name)
        stream.attach_publisher(link)
        if self.puller is not None:
            self.puller.stop(name)
        return PublisherSession(self, stream, link)

    def watch(
        self,
        name: str,
        sink: ViewerSink,
        address: str | None = None,
        session_type: Callable[..., ViewerSession] = ViewerSession,
        audio: bool = False,
    ) -> ViewerSession | Refusal:
        """Attach a viewer from ``address`` (see :meth:`check_viewer`) to ``name``; it
        gets status, meta, CONFIG and the cached GOP (with its audio when it takes
        ``audio``).  A name nobody publishes yet waits for its publisher, within the
        waiting-stream bounds.  ``session_type`` builds the session (an adaptive one:
        :mod:`streamrelay.adaptive`)."""
        refusal = self.check_viewer(name, address)
        if refusal is not None:
            return refusal
        if name not in self.streams:
            self.waiting.add(name)
        session = session_type(self, self._stream(name), sink, address, audio=audio)
        return self._pull_for(session)

    # -- relay to relay ---------------------------------------------------------------

    def check_relay(self, name: str, address: str | None = None) -> Refusal | None:
        """Why an edge pulling ``name`` would be refused now, or None: as a viewer, but
        without the per-address bound on waiting names (one edge pulls many)."""
        return self.check_viewer(name, None)

    def relay(self, name: str, sink: ViewerSink) -> ViewerSession | Refusal:
        """Attach an edge relay pulling ``name``: a viewer with the relay queue bound
        whose reported viewers count towards the stream's audience."""
        refusal = self.check_relay(name)
        if refusal is not None:
            return refusal
        if name not in self.streams:
            self.waiting.add(name)
        session = ViewerSession(self, self._stream(name), sink, None, relay=True)
        return self._pull_for(session)

    def pull_source(
        self, name: str, link: PublisherLink, *, idle: bool = False
    ) -> PublisherSession | None:
        """Attach a live pull from the upstream as ``name``'s publisher (``idle``: its
        publisher idles on demand upstream); None when a local publisher holds the
        stream (it wins)."""
        stream = self.streams.get(name)
        if stream is not None and stream.local_publisher:
            return None
        stream = self._stream(name)
        self.waiting.forget(name)
        stream.attach_publisher(link, pulled=True, idle=idle)
        return PublisherSession(self, stream, link, pulled=True)

    def give_up(self, name: str) -> None:
        """Another node became ``name``'s origin (a newer epoch): close the local
        publisher with 4409; its viewers stay and are served by a pull from there."""
        stream = self.streams.get(name)
        if stream is None or not stream.local_publisher or stream.publisher is None:
            return
        link = stream.publisher
        stream.detach_publisher(link)
        link.replaced()
        self._want_pull(stream)
        self._forget_if_idle(stream)

    def _pull_for(self, session: ViewerSession) -> ViewerSession | Refusal:
        try:
            self._want_pull(session.stream)
        except Exception:
            # A failing puller must not leave the viewer attached for good.
            _log.failure("Cannot pull {stream}", stream=session.stream.name)
            session.close()
            return Refusal(503, "cannot pull the stream now", retry_after=10)
        return session

    def _want_pull(self, stream: Stream) -> None:
        if (
            self.puller is not None
            and (stream.viewers or stream.switchers)
            and not stream.local_publisher
        ):
            self.puller.want(stream.name)

    def _forget_if_idle(self, stream: Stream) -> None:
        if stream.idle and self.streams.get(stream.name) is stream:
            del self.streams[stream.name]
            self.waiting.forget(stream.name)
            stream.close()
            self.retired.add(stream)

    # -- reporting --------------------------------------------------------------------

    def describe(self, show_peers: bool) -> list[dict[str, Any]]:
        """Every stream that has a publisher or a viewer, by name."""
        return [
            self.streams[name].describe(show_peers)
            for name in sorted(self.streams)
            if not self.streams[name].idle
        ]

    def totals(self) -> StreamTotals:
        """Every stream's counts since the relay started: live and forgotten ones."""
        totals = StreamTotals(**vars(self.retired))
        for stream in list(self.streams.values()):
            totals.add(stream)
        return totals

    @property
    def available_count(self) -> int:
        """Streams whose publisher is connected but idle on demand."""
        return sum(1 for stream in self.streams.values() if stream.publisher_idle)

    @property
    def publisher_count(self) -> int:
        """Connected publishers (one per live stream)."""
        return self.live_streams

    @property
    def viewer_count(self) -> int:
        """Connected viewers."""
        return sum(len(stream.viewers) for stream in self.streams.values())
