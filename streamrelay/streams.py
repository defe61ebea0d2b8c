"""Named streams, their publisher and their viewers: the relay's network-free core.

Protocol adapters talk to this module through two small handles:
:class:`PublisherSession` (media and metadata in) and :class:`ViewerSession` (a
:class:`~streamrelay.viewer_queue.ViewerQueue` out).  Connections appear here only through
the :class:`PublisherLink` and :class:`~streamrelay.viewer_queue.ViewerSink` interfaces,
so every rule can be tested with a ``Clock`` and no sockets.

(Over 400 lines: the stream, its two session handles and the registry share one
lifecycle -- create, attach, detach, forget -- and its admission rules, which read best
together; the rate window and the throttle could move to a module of their own.)
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from streamrelay.budget import BufferBudget
from streamrelay.config import RelayConfig
from streamrelay.gop import GopCache
from streamrelay.limits import Refusal, WaitingStreams
from streamrelay.viewer_queue import FrameFactory, ViewerQueue, ViewerSink
from streamrelay.wire import MediaMessage, encode_text

_log = Logger()

VIEWER_COUNT_MIN_GAP = 0.25
RATE_WINDOW_SECONDS = 5.0


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


class _Throttle:
    """Runs ``action`` at most once per ``interval``; a need inside the interval runs at
    its end, never lost."""

    def __init__(self, clock: IReactorTime, interval: float, action: Callable[[], None]) -> None:
        self._clock = clock
        self.interval = interval
        self._action = action
        self._last_run: float | None = None
        self._pending: IDelayedCall | None = None

    def request(self) -> None:
        """Run now if the interval allows it, else once the interval ends."""
        if self._pending is not None:
            return
        now = self._clock.seconds()
        if self._last_run is None or now - self._last_run >= self.interval:
            self._run()
        else:
            delay = self._last_run + self.interval - now
            self._pending = self._clock.callLater(delay, self._run)

    def _run(self) -> None:
        self._pending = None
        self._last_run = self._clock.seconds()
        self._action()

    def reset(self) -> None:
        """Forget history and any pending run."""
        self.cancel()
        self._last_run = None

    def cancel(self) -> None:
        """Drop a pending run."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None


class RateWindow:
    """Bytes and frames over the last few seconds, in fixed buckets (bounded memory)."""

    def __init__(self, clock: IReactorTime, span: float = RATE_WINDOW_SECONDS, buckets: int = 10):
        self._clock = clock
        self._span = span
        self._bucket_width = span / buckets
        self._slots = buckets
        self._buckets: dict[int, list[int]] = {}
        self._started = clock.seconds()

    def add(self, size: int, frames: int) -> None:
        """Count one message of ``size`` bytes carrying ``frames`` frames."""
        index = int(self._clock.seconds() / self._bucket_width)
        bucket = self._buckets.get(index)
        if bucket is None:
            self._prune(index)
            bucket = self._buckets[index] = [0, 0]
        bucket[0] += size
        bucket[1] += frames

    def _prune(self, current: int) -> None:
        first_kept = current - self._slots + 1
        for index in [i for i in self._buckets if i < first_kept]:
            del self._buckets[index]

    def rates(self) -> tuple[int, float]:
        """``(bits per second, frames per second)`` over the window."""
        now = self._clock.seconds()
        current = int(now / self._bucket_width)
        self._prune(current)
        # The window is the last N bucket slots, the current partial one included, so it
        # covers a little less than the span: divide by what it really covers.
        window_start = (current - self._slots + 1) * self._bucket_width
        elapsed = max(now - max(self._started, window_start), self._bucket_width)
        total_bytes = sum(bucket[0] for bucket in self._buckets.values())
        total_frames = sum(bucket[1] for bucket in self._buckets.values())
        return int(total_bytes * 8 / elapsed), round(total_frames / elapsed, 2)


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
        self.gop: GopCache[Any] = GopCache(
            config.gop_cache_bytes, registry.budget.adjust, config.gop_cache_messages
        )
        registry.budget.add_cache(self.gop)
        self.meta: tuple[Any, int] | None = None
        self.messages_in = 0
        self.bytes_in = 0
        self.keyframes = 0
        self.dropped = 0
        self.rate = RateWindow(clock)
        self._keyframe_requests = _Throttle(
            clock, config.keyframe_request_interval, self._send_keyframe_request
        )
        self._viewer_count_updates = _Throttle(clock, VIEWER_COUNT_MIN_GAP, self._send_viewer_count)
        self._last_viewer_count_sent: int | None = None

    @property
    def live(self) -> bool:
        """True while a publisher is connected."""
        return self.publisher is not None

    @property
    def idle(self) -> bool:
        """True when nothing holds the stream: it is then removed."""
        return self.publisher is None and not self.viewers

    # -- publisher side ---------------------------------------------------------------

    def attach_publisher(self, link: PublisherLink) -> None:
        previous = self.publisher
        if previous is None:
            self._registry.live_streams += 1
        self.publisher = link
        self.publisher_since = self._registry.clock.seconds()
        self.gop.clear()
        self._keyframe_requests.reset()
        self._viewer_count_updates.reset()
        self._last_viewer_count_sent = None
        if previous is not None:
            _log.info("Stream {stream}: publisher replaced", stream=self.name)
            self.meta = None
            for queue in self.viewers.values():
                queue.expect_new_source()
            previous.replaced()
        else:
            self._broadcast_status("live")
        self._viewer_count_updates.request()
        if any(queue.waiting_for_key for queue in self.viewers.values()):
            self.need_keyframe()

    def detach_publisher(self, link: PublisherLink) -> None:
        if self.publisher is not link:
            return
        self._registry.live_streams -= 1
        self.publisher = None
        self.publisher_since = None
        self.gop.clear()
        self.meta = None
        self._keyframe_requests.reset()
        self._viewer_count_updates.reset()
        for queue in self.viewers.values():
            queue.expect_new_source()
        self._broadcast_status("offline")

    def publish_media(self, message: MediaMessage) -> None:
        self.messages_in += 1
        self.bytes_in += message.size
        if message.is_key:
            self.keyframes += 1
        self.rate.add(message.size, 0 if message.is_config else 1)
        frame = self._registry.frame_factory(message.data, True)
        info = message.info()
        self.gop.add(info, frame)
        for queue in list(self.viewers.values()):
            queue.send_media(info, frame)

    def publish_meta(self, raw: bytes) -> None:
        frame = self._registry.frame_factory(raw, False)
        self.meta = (frame, len(raw))
        for queue in list(self.viewers.values()):
            queue.send_text(frame, len(raw), "meta")

    def _send_keyframe_request(self) -> None:
        if self.publisher is not None:
            self.publisher.send_keyframe_request()

    def need_keyframe(self) -> None:
        """A viewer needs a KEY the cache cannot give; rate-limited, never lost."""
        if self.publisher is not None:
            self._keyframe_requests.request()

    def _send_viewer_count(self) -> None:
        count = len(self.viewers)
        if self.publisher is not None and count != self._last_viewer_count_sent:
            self._last_viewer_count_sent = count
            self.publisher.send_viewer_count(count)

    # -- viewer side ------------------------------------------------------------------

    def attach_viewer(self, sink: ViewerSink) -> ViewerQueue:
        config = self._registry.config
        queue = ViewerQueue(
            sink,
            self._registry.clock,
            self._registry.frame_factory,
            limit=config.viewer_queue_bytes,
            stall_timeout=config.viewer_stall_timeout,
            on_backlog_change=self._registry.budget.adjust,
            on_dropped=self._count_dropped,
            on_need_keyframe=self.need_keyframe,
        )
        self.viewers[sink] = queue
        self._registry.budget.add_viewer(queue)
        sink.attached(queue)
        frame, size = self._registry.status_frame("live" if self.live else "offline")
        queue.send_text(frame, size, "status")
        if self.meta is not None:
            queue.send_text(self.meta[0], self.meta[1], "meta")
        queue.start(self.gop.start_sequence(), self.gop.config)
        if queue.waiting_for_key:
            self.need_keyframe()
        self._viewer_count_updates.request()
        return queue

    def detach_viewer(self, sink: ViewerSink) -> None:
        queue = self.viewers.pop(sink, None)
        if queue is None:
            return
        queue.close()
        self._registry.budget.remove(queue)
        self._viewer_count_updates.request()

    def _count_dropped(self, count: int) -> None:
        self.dropped += count

    def _broadcast_status(self, state: str) -> None:
        frame, size = self._registry.status_frame(state)
        for queue in list(self.viewers.values()):
            queue.send_text(frame, size, "status")

    def close(self) -> None:
        """Release timers and cached bytes; the stream is leaving the registry."""
        self._keyframe_requests.cancel()
        self._viewer_count_updates.cancel()
        self.gop.clear()
        self._registry.budget.remove(self.gop)

    def describe(self, show_peer: bool) -> dict[str, Any]:
        """The stream's entry in ``/api/streams``."""
        bitrate, fps = self.rate.rates()
        publisher = None
        if self.publisher is not None and self.publisher_since is not None:
            since = datetime.datetime.fromtimestamp(self.publisher_since, datetime.timezone.utc)
            publisher = {
                "peer": self.publisher.peer_address if show_peer else None,
                "since": since.isoformat(timespec="seconds").replace("+00:00", "Z"),
            }
        return {
            "name": self.name,
            "live": self.live,
            "viewers": len(self.viewers),
            "publisher": publisher,
            "messages_in": self.messages_in,
            "bytes_in": self.bytes_in,
            "keyframes": self.keyframes,
            "dropped": self.dropped,
            "bitrate_bps": bitrate,
            "fps": fps,
        }


class PublisherSession:
    """A publisher's handle on its stream."""

    def __init__(self, registry: StreamRegistry, stream: Stream, link: PublisherLink) -> None:
        self._registry = registry
        self.stream = stream
        self._link = link
        self.closed = False

    @property
    def current(self) -> bool:
        """False once a newer publisher replaced this one."""
        return not self.closed and self.stream.publisher is self._link

    def media(self, message: MediaMessage) -> None:
        """Relay one media message to the stream's viewers and cache."""
        if self.current:
            self.stream.publish_media(message)

    def meta(self, raw: bytes) -> None:
        """Keep and forward stream metadata (a JSON object of type ``meta``)."""
        if self.current:
            self.stream.publish_meta(raw)

    def close(self) -> None:
        """The publisher connection is gone."""
        if self.closed:
            return
        self.closed = True
        self.stream.detach_publisher(self._link)
        self._registry._forget_if_idle(self.stream)


class ViewerSession:
    """A viewer's handle on its stream; ``queue`` is its outbound queue."""

    # One per viewer, for the connection's life: no per-instance dict.
    __slots__ = ("_address", "_registry", "_sink", "closed", "queue", "stream")

    def __init__(
        self, registry: StreamRegistry, stream: Stream, sink: ViewerSink, address: str | None
    ) -> None:
        self._registry = registry
        self.stream = stream
        self._sink = sink
        self._address = address
        if registry.waiting.is_waiting(stream.name):
            registry.waiting.hold(stream.name, address)
        self.queue = stream.attach_viewer(sink)
        self.closed = False

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
        # The two status messages, framed once: every join sends one.
        self._status_frames: dict[str, tuple[Any, int]] = {}

    def status_frame(self, state: str) -> tuple[Any, int]:
        """The prepared ``status`` message for ``state`` and its size."""
        found = self._status_frames.get(state)
        if found is None:
            raw = encode_text({"type": "status", "state": state})
            found = self._status_frames[state] = (self.frame_factory(raw, False), len(raw))
        return found

    # -- admission (answered in the HTTP handshake) -----------------------------------

    def check_publisher(self, name: str, address: str | None = None) -> Refusal | None:
        """Why a publisher for ``name`` would be refused now, or None.  Viewers never
        make a publisher wait: only streams with a publisher count.  (``address`` is
        accepted for symmetry with :meth:`check_viewer`; publishers have no per-address
        stream bound.)"""
        stream = self.streams.get(name)
        if stream is not None and stream.live:
            if not self.config.takeover:
                return Refusal(409, "stream already has a publisher")
            return None
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
        return PublisherSession(self, stream, link)

    def watch(
        self, name: str, sink: ViewerSink, address: str | None = None
    ) -> ViewerSession | Refusal:
        """Attach a viewer from ``address`` (see :meth:`check_viewer`) to ``name``; it
        gets status, meta, CONFIG and the cached GOP.  A name nobody publishes yet
        waits for its publisher, within the waiting-stream bounds."""
        refusal = self.check_viewer(name, address)
        if refusal is not None:
            return refusal
        if name not in self.streams:
            self.waiting.add(name)
        return ViewerSession(self, self._stream(name), sink, address)

    def _forget_if_idle(self, stream: Stream) -> None:
        if stream.idle and self.streams.get(stream.name) is stream:
            del self.streams[stream.name]
            self.waiting.forget(stream.name)
            stream.close()

    # -- reporting --------------------------------------------------------------------

    def describe(self, show_peers: bool) -> list[dict[str, Any]]:
        """Every stream that has a publisher or a viewer, by name."""
        return [
            self.streams[name].describe(show_peers)
            for name in sorted(self.streams)
            if not self.streams[name].idle
        ]

    @property
    def publisher_count(self) -> int:
        """Connected publishers (one per live stream)."""
        return self.live_streams

    @property
    def viewer_count(self) -> int:
        """Connected viewers."""
        return sum(len(stream.viewers) for stream in self.streams.values())
