"""Per-viewer outbound queue and the drop-to-keyframe policy, with no I/O.

The viewer's transport tells the queue when to stop and start writing (it is the
transport's push producer).  While the transport accepts data, messages are written at
once; while it is paused they wait here.  The bytes pending towards one viewer never
exceed ``limit`` plus one message: a media message that would go over puts the viewer
into *skipping* -- queued media that has not started is discarded and every media message
until the next KEY is dropped.  Text messages are never dropped and keep their order.
A message already handed to the transport is always finished, so framing stays valid.

The common case is the cheap one: a viewer that keeps up (transport not paused, nothing
queued, not skipping) gets each media message written at once, with no object made
for it and O(1) bookkeeping.  Cheaper still, on a plain TCP connection such a viewer
becomes a member of its stream's direct set (:mod:`streamrelay.fanout`), whose loop
sends each message straight to its socket without calling the queue at all: the queue
leaves the set (its counters settled) the moment it stops flowing, and its
``sent_messages`` and ``bytes_sent`` include what the set sent.

"Bytes" here are memory: each message is charged its size plus the objects kept with it
(:data:`streamrelay.budget.MESSAGE_OVERHEAD_BYTES`), so a flood of tiny messages is
bounded too.

Audio (docs/protocol.md, "Audio") is offered only to the queues of viewers that asked for
it (:meth:`ViewerQueue.send_audio`; the stream keeps them apart), so a viewer without
audio pays nothing for it.  Audio survives a video drop episode: queued audio is kept
when queued video is discarded, and new audio is delivered while the backlog stays
within the bound (it drains before the resuming KEY is taken: that KEY needs only the
transport to have drained); past that, audio is dropped too and resumes with
``{"type": "dropped", "audio": N}``.

(Over 400 lines: the slot declarations and the state properties that keep the fast
path's one-field summary right sit with the policy they summarise.)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from streamrelay.budget import MESSAGE_OVERHEAD_BYTES
from streamrelay.wire import FLAG_AUDIO, FLAG_CONFIG, MediaInfo, encode_text

if TYPE_CHECKING:
    from streamrelay.fanout import DirectPort, Seat

# What a transport may hold before it pauses its producer (Twisted's FileDescriptor
# bufferSize).  Public APIs do not expose the transport's buffer, so bytes handed over
# just before a pause are estimated with this figure.
TRANSPORT_HIGH_WATER_BYTES = 64 * 1024

# What one write waiting in Twisted's transport costs beyond its bytes: a slot in the
# transport's list of pending writes (8 B) and the header of the bytes object written
# (33 B), whose WebSocket frame header adds 2 to 10 B to the message, each object
# rounded up to pymalloc's 16 B (or malloc's header, when large).  Measured with
# tracemalloc (CPython 3.11.7, 64-bit): 43 B beyond the message for 9 B and 100 B
# messages, 45 B for 300 B, 62 B for 70 kB; worst case with rounding 33 + 10 + 8 + 15 =
# 66 B.  Until Twisted joins them (when the socket is writable) 64 KiB of 9-byte
# messages is ~7,000 writes: ~500 KB, not 64 KiB.  tests/test_viewer_queue.py
# re-measures it.
TRANSPORT_WRITE_OVERHEAD_BYTES = 72


class ViewerSink(Protocol):
    """What the queue needs from a viewer connection.  A connection that can take the
    fan-out's direct sends also has ``direct_port()``, returning its
    :class:`~streamrelay.fanout.DirectPort` while its transport holds nothing (else
    None); the queue asks for it only when it may join its stream's direct set."""

    def write_frame(self, frame: Any) -> bool | None:
        """Write one prepared WebSocket message to the transport; True when none of it
        waits in the transport's buffer (the kernel took it all)."""

    def stalled(self) -> None:
        """The transport made no write progress for the stall timeout."""

    def attached(self, queue: ViewerQueue) -> None:
        """The queue exists and nothing was sent yet: route the transport's pause and
        resume to it from now on (the join burst is subject to backpressure too)."""


@dataclass(slots=True)
class _Outbound:
    frame: Any
    size: int  # the memory charged: the message's bytes plus the per-message overhead
    message: MediaInfo | None  # None for text
    text_kind: str | None = None
    dropped: int = 0  # for a "dropped" notice: the count it reports


FrameFactory = Callable[[bytes, bool], Any]


class _FanOutFields:
    """The fields the fan-out loop reads for every viewer of every message.  Slots of a
    base class come first in an instance, beside its header: one cache line to fetch,
    on an object that the bytes copied since its last message have evicted."""

    __slots__ = ("_flowing", "_paused", "_sink")


class ViewerQueue(_FanOutFields):
    """Orders, bounds and drops what goes to one viewer."""

    # The rest as slots too: a few cache lines instead of a dict.
    __slots__ = (
        "_bytes_since_resume",
        "_clock",
        "_config_sent",
        "_frame_factory",
        "_latest_config",
        "_on_backlog_change",
        "_on_dropped",
        "_on_need_keyframe",
        "_overhead",
        "_queue",
        "_queued_bytes",
        "_stall_call",
        "_stall_timeout",
        "_transport_bytes",
        "_writes_since_resume",
        "_closed",
        "_skipping",
        "_waiting_for_key",
        "_audio_open",
        "_audio_last_us",
        "_audio_prev_us",
        "_audio_switched_from_us",
        "audio_dropped_in_episode",
        "audio_dropped_total",
        "dropped_in_episode",
        "dropped_total",
        "limit",
        "skip_episodes",
        "_sent_messages",
        "_bytes_sent",
        "_seats",
    )

    def __init__(
        self,
        sink: ViewerSink,
        clock: IReactorTime,
        frame_factory: FrameFactory,
        limit: int,
        stall_timeout: float,
        on_backlog_change: Callable[[int], None],
        on_dropped: Callable[[int], None],
        on_need_keyframe: Callable[[], None],
        message_overhead: int = MESSAGE_OVERHEAD_BYTES,
    ) -> None:
        self._sink = sink
        self._clock = clock
        self._frame_factory = frame_factory
        self.limit = limit
        self._stall_timeout = stall_timeout
        self._on_backlog_change = on_backlog_change
        self._on_dropped = on_dropped
        self._on_need_keyframe = on_need_keyframe
        self._overhead = message_overhead

        # Messages held while the transport is paused; a deque (its first block is
        # ~0.6 KB) only while there are some, the empty tuple otherwise.
        self._queue: deque[_Outbound] | tuple[()] = ()
        self._queued_bytes = 0
        self._transport_bytes = 0
        # Writes (and their wire bytes) handed to the transport's buffer since it last
        # drained (those the kernel took at once do not count): how many writes a
        # paused transport holds is estimated from them.
        self._writes_since_resume = 0
        self._bytes_since_resume = 0
        self._stall_call: IDelayedCall | None = None
        # The four states that stop the fast path, and their summary: True when none
        # holds, so the fan-out loop reads one field (the setters below keep it right).
        self._paused = False
        self._closed = False
        # Until a KEY arrives the viewer cannot decode: at join, after a publisher change.
        self._waiting_for_key = True
        self._skipping = False
        self._flowing = False
        self.dropped_in_episode = 0
        self.dropped_total = 0
        self.skip_episodes = 0
        # Messages written to the transport and their bytes (for metrics), but for
        # what the stream's direct sets sent since they last settled (see sent_messages).
        self._sent_messages = 0
        self._bytes_sent = 0
        # The direct sets (streamrelay.fanout) this viewer is a member of, none or its
        # stream's video set and audio set.
        self._seats: tuple[Seat, ...] = ()
        self._latest_config: tuple[MediaInfo, Any] | None = None
        self._config_sent: MediaInfo | None = None
        # Audio dropped since the last audio delivered, and ever (audio viewers only).
        self.audio_dropped_in_episode = 0
        self.audio_dropped_total = 0
        # Audio goes out from the first KEY on (join, new source), in strictly
        # increasing capture order: the capture time of the last audio delivered or
        # counted as dropped, and the one before it (the packet duration, for a gap a
        # rendition switch may leave).  After a switch, the capture time of the last audio
        # of the old rendition until the first audio of the new one is seen (else -1).
        self._audio_open = False
        self._audio_last_us = -1
        self._audio_prev_us = -1
        self._audio_switched_from_us = -1

    # -- state ---------------------------------------------------------------------

    def _refresh_flow(self) -> None:
        self._flowing = flowing = not (
            self._paused or self._waiting_for_key or self._skipping or self._closed
        )
        if not flowing and self._seats:
            # A direct set's members flow: out first.
            self.leave_direct()

    @property
    def paused(self) -> bool:
        """The transport's buffer is full: messages wait here."""
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self._paused = value
        self._refresh_flow()

    @property
    def closed(self) -> bool:
        """The viewer is gone."""
        return self._closed

    @closed.setter
    def closed(self, value: bool) -> None:
        self._closed = value
        self._refresh_flow()

    @property
    def waiting_for_key(self) -> bool:
        """No KEY yet since the join or the publisher's change: no media goes out."""
        return self._waiting_for_key

    @waiting_for_key.setter
    def waiting_for_key(self, value: bool) -> None:
        self._waiting_for_key = value
        self._refresh_flow()

    @property
    def skipping(self) -> bool:
        """In a drop episode: media is dropped until the next KEY fits."""
        return self._skipping

    @skipping.setter
    def skipping(self, value: bool) -> None:
        self._skipping = value
        self._refresh_flow()

    # -- accounting ---------------------------------------------------------------

    def cost(self, size: int) -> int:
        """The memory charged for a message of ``size`` bytes."""
        return size + self._overhead

    @property
    def sheddable_bytes(self) -> int:
        """Queued media memory that skipping would discard (0 while already skipping)."""
        if self.skipping or self.waiting_for_key:
            return 0
        return sum(item.size for item in self._queue if item.message is not None)

    @property
    def queued_bytes(self) -> int:
        """Memory held here, waiting for the paused transport (the transport's own
        buffer not counted)."""
        return self._queued_bytes

    @property
    def backlog_bytes(self) -> int:
        """Memory pending towards this viewer: queued here plus estimated in the transport."""
        return self._queued_bytes + self._transport_bytes

    def _set_transport_bytes(self, value: int) -> None:
        delta = value - self._transport_bytes
        self._transport_bytes = value
        if delta:
            self._on_backlog_change(delta)

    @property
    def sent_messages(self) -> int:
        """Messages written to the viewer (handed to its transport or its socket)."""
        if self._seats:
            self.settle_direct()
        return self._sent_messages

    @property
    def bytes_sent(self) -> int:
        """The bytes of the messages written to the viewer."""
        if self._seats:
            self.settle_direct()
        return self._bytes_sent

    # -- the stream's direct sets (streamrelay.fanout) --------------------------------

    def direct_port(self) -> DirectPort | None:
        """The viewer's socket for its stream's direct sets, when the queue flows and the
        connection has one whose transport holds nothing now; else None."""
        if not self._flowing:
            return None
        port = getattr(self._sink, "direct_port", None)
        return port() if port is not None else None

    def take_seat(self, seat: Seat) -> None:
        """The viewer is a member of ``seat``'s direct set from now: it leaves as soon
        as anything else touches its connection (the port watches the transport)."""
        if not self._seats:
            seat.port.watch(self.leave_direct)
        self._seats = (*self._seats, seat)

    def leave_direct(self) -> None:
        """Leave every direct set, counters settled: the queue stops flowing, or
        something else is about to write to the connection, close it or lose it."""
        seats = self._seats
        if seats:
            self._seats = ()
            seats[0].port.watch(None)
            for seat in seats:
                seat.direct.leave(seat)

    def settle_direct(self) -> None:
        """Bring the counters up to date with what the direct sets sent."""
        for seat in self._seats:
            seat.settle()

    def count_direct(self, messages: int, size: int) -> None:
        """A direct set sent ``messages`` messages of ``size`` bytes in all."""
        self._sent_messages += messages
        self._bytes_sent += size

    def audio_direct(self, last_us: int, prev_us: int | None) -> None:
        """The audio direct set's last message sent had capture time ``last_us``, and the
        one before ``prev_us`` (None: the last one this queue knew of)."""
        self._audio_prev_us = self._audio_last_us if prev_us is None else prev_us
        self._audio_last_us = last_us

    @property
    def audio_last_us(self) -> int:
        """The capture time of the last audio delivered or dropped (-1: none yet)."""
        if self._seats:
            self.settle_direct()
        return self._audio_last_us

    # -- input from the stream ------------------------------------------------------

    def start(
        self,
        sequence: list[tuple[MediaInfo, Any]],
        config: tuple[MediaInfo, Any] | None,
    ) -> None:
        """Begin with a cached GOP (CONFIG, KEY, ...) or, when empty, wait for a KEY."""
        # With a cached GOP the CONFIG in effect at its KEY comes first, from the sequence.
        self._latest_config = None if sequence else config
        for message, frame in sequence:
            if message.flags & FLAG_AUDIO:
                self.send_audio(message, frame)
            else:
                self.send_media(message, frame)

    def expect_new_source(self) -> None:
        """The publisher changed: wait for its CONFIG and KEY; not a drop episode."""
        self.waiting_for_key = True
        self._latest_config = None
        self._config_sent = None
        # Another publisher's capture clock: audio starts again at its first KEY.
        self._audio_open = False
        self._audio_last_us = self._audio_prev_us = self._audio_switched_from_us = -1

    def switch_source(
        self,
        config: tuple[MediaInfo, Any] | None,
        key: MediaInfo,
        frame: Any,
        audio: list[tuple[MediaInfo, Any]] | tuple[()] = (),
    ) -> None:
        """Another stream feeds this queue from its KEY ``key`` on (a rendition switch,
        :mod:`streamrelay.adaptive`): what is queued still goes first, then that stream's
        CONFIG (always: the decoder is reconfigured) and the KEY, as a viewer resuming
        after a drop; a drop episode under way ends with its ``dropped`` notice.

        Audio (an audio viewer: ``audio`` is the new stream's latest audio, in capture
        order) goes on from just after the last audio already delivered, so capture
        times keep strictly increasing: the new stream's audio newer than that is sent
        now (its audio may run ahead of the old one's), older audio is not sent twice,
        and a gap the switch leaves is announced as dropped audio.  (A queue that had
        no KEY yet starts its audio at this KEY, as at a join.)"""
        if self.closed:
            return
        # Its audio times are read below: settled, and out of the old stream's sets.
        self.leave_direct()
        if self._audio_open and self._audio_switched_from_us < 0:
            self._audio_switched_from_us = self._audio_last_us
        self._latest_config = config
        self._config_sent = None
        if not self.skipping:
            self.waiting_for_key = True
        self.send_media(key, frame)
        for message, audio_frame in audio:
            self.send_audio(message, audio_frame)

    def rebind(
        self, on_dropped: Callable[[int], None], on_need_keyframe: Callable[[], None]
    ) -> None:
        """Report drops and keyframe needs to another stream (the viewer moved)."""
        self._on_dropped = on_dropped
        self._on_need_keyframe = on_need_keyframe

    def send_text(self, frame: Any, size: int, kind: str) -> None:
        """Queue a text message of ``size`` bytes; an unsent older one of the same kind
        is superseded."""
        if self.closed:
            return
        queue = self._queue
        if kind in ("status", "meta") and isinstance(queue, deque) and queue:
            if queue[-1].text_kind == kind:
                # Superseded before it left, with nothing after it: replacing it keeps
                # every message's order relative to media.
                item = queue.pop()
                self._queued_bytes -= item.size
                self._on_backlog_change(-item.size)
        self._deliver(_Outbound(frame, self.cost(size), None, kind))

    def send_media(self, message: MediaInfo, frame: Any) -> bool:
        """Offer a media message; it is delivered, held, or dropped by the policy.  True
        when it went out at once on the fast path and the kernel took all of it (the
        viewer may then join its stream's direct set, :mod:`streamrelay.fanout`)."""
        if self._flowing and not message.flags & FLAG_CONFIG:
            # Keeping up: not paused, so nothing is pending in the transport, nor here
            # (the queue holds messages only while the transport is paused); the
            # message fits whatever its size and goes out now.  (_write, inlined: this
            # runs for every viewer outside the direct set, for every message.)
            self._sent_messages += 1
            self._bytes_sent += message.size
            if self._sink.write_frame(frame):
                return True
            self.kept_by_transport(message.size)
            return False
        if self.closed:
            return False
        if message.is_config:
            self._latest_config = (message, frame)
            if self.waiting_for_key or self.skipping:
                return False
        elif self.waiting_for_key or self.skipping:
            if not message.is_key:
                self._count_drop(1)
                return False
            if not self._fits(message):
                # A KEY this viewer cannot take: a drop episode, resumed by a requested KEY.
                self._enter_skipping()
                self._count_drop(1)
                return False
            self._resume_with(message, frame)
            return False
        if not self._fits(message):
            self._enter_skipping()
            self._count_drop(1)
            return False
        self._deliver(_Outbound(frame, self.cost(message.size), message))
        return False

    def send_audio(self, message: MediaInfo, frame: Any) -> bool:
        """Offer an audio message (only to viewers that take audio): written at once
        while the viewer keeps up; otherwise kept through a video drop episode while
        there is room, dropped (and counted for the next ``dropped`` notice) when not.
        True as for :meth:`send_media`."""
        capture = message.capture_time_us
        if capture <= self._audio_last_us:
            return False  # before the KEY this viewer started from, or delivered already
        if self._audio_switched_from_us >= 0:
            self._after_switch(capture)
        if self._flowing:
            # As send_media's fast path.
            self._audio_prev_us = self._audio_last_us
            self._audio_last_us = capture
            self._sent_messages += 1
            self._bytes_sent += message.size
            if self._sink.write_frame(frame):
                return True
            self.kept_by_transport(message.size)
            return False
        if self._closed or not self._audio_open:
            # Before the first KEY there is nothing to hear it with.  After it, a queue
            # waiting for a KEY (a switch whose KEY did not fit) is in a drop episode:
            # audio goes on within the bound.
            return False
        self._audio_prev_us = self._audio_last_us
        self._audio_last_us = capture
        cost = self.cost(message.size)
        pending = self.backlog_bytes
        if pending and pending + cost > self.limit and not self._skipping:
            # Over the bound: the video goes first, queued audio stays.
            self._enter_skipping()
            pending = self.backlog_bytes
        if pending and pending + cost > self.limit:
            self.audio_dropped_in_episode += 1
            self.audio_dropped_total += 1
            self._on_dropped(1)
            return False
        if self.audio_dropped_in_episode:
            self._audio_notice()
        self._deliver(_Outbound(frame, cost, message))
        return False

    def _after_switch(self, capture: int) -> None:
        """The first audio after a switch: when more than a packet is missing between
        the old rendition's last audio and it (the new rendition sent that audio before
        its KEY), those packets are announced as dropped, counted by the packet
        duration seen last."""
        last = self._audio_switched_from_us
        self._audio_switched_from_us = -1
        step = last - self._audio_prev_us if self._audio_prev_us >= 0 else 0
        if step > 0 and capture - last > step + step // 2:
            self.audio_gap(max(1, round((capture - last) / step) - 1))

    def _audio_notice(self) -> None:
        count = self.audio_dropped_in_episode
        self.audio_dropped_in_episode = 0
        notice = encode_text({"type": "dropped", "audio": count})
        notice_frame = self._frame_factory(notice, False)
        self._deliver(_Outbound(notice_frame, self.cost(len(notice)), None, "dropped-audio"))

    def audio_gap(self, count: int) -> None:
        """``count`` audio messages were lost before they reached this relay: the
        viewer's next audio is preceded by a ``dropped`` notice that counts them."""
        if not self._closed and self._audio_open:
            self.audio_dropped_in_episode += count
            self.audio_dropped_total += count
            self._on_dropped(count)
            if self._flowing:
                # The fast path that writes the next audio sends no notice: send it now.
                self._audio_notice()

    def _fits(self, message: MediaInfo) -> bool:
        pending = self.backlog_bytes
        return pending == 0 or pending + self.cost(message.size) <= self.limit

    def _count_drop(self, count: int) -> None:
        if self.skipping:
            self.dropped_in_episode += count
            self.dropped_total += count
            self._on_dropped(count)

    def _resume_with(self, key: MediaInfo, frame: Any) -> None:
        if self.skipping and self.dropped_in_episode:
            notice = encode_text({"type": "dropped", "messages": self.dropped_in_episode})
            notice_frame = self._frame_factory(notice, False)
            self._deliver(
                _Outbound(
                    notice_frame, self.cost(len(notice)), None, "dropped", self.dropped_in_episode
                )
            )
        if not self._audio_open:
            # A first KEY (join, new source): its audio starts at its capture time.
            self._audio_open = True
            self._audio_last_us = key.capture_time_us - 1
        self.skipping = False
        self.waiting_for_key = False
        self.dropped_in_episode = 0
        if self._latest_config is not None and self._latest_config[0] is not self._config_sent:
            config, config_frame = self._latest_config
            self._deliver(_Outbound(config_frame, self.cost(config.size), config))
        self._deliver(_Outbound(frame, self.cost(key.size), key))

    def _enter_skipping(self, request_keyframe: bool = True, keep_audio: bool = True) -> None:
        if self.skipping:
            return
        self.skipping = True
        self.skip_episodes += 1
        kept: deque[_Outbound] = deque()
        discarded = 0
        discarded_bytes = 0
        carried = 0
        for item in self._queue:
            if item.text_kind == "dropped":
                # The previous episode's notice never left: one notice will cover both.
                carried += item.dropped
                discarded_bytes += item.size
            elif item.message is None:
                kept.append(item)
            elif item.message.flags & FLAG_AUDIO:
                # Audio goes on through the episode, unless the budget needs its memory.
                if keep_audio:
                    kept.append(item)
                else:
                    self.audio_dropped_in_episode += 1
                    self.audio_dropped_total += 1
                    self._on_dropped(1)
                    discarded_bytes += item.size
            else:
                # A discarded CONFIG is not lost: it is resent before the next KEY.
                discarded += 0 if item.message.is_config else 1
                discarded_bytes += item.size
        self.dropped_in_episode = carried
        self._queue = kept if kept else ()
        self._queued_bytes -= discarded_bytes
        if discarded_bytes:
            self._on_backlog_change(-discarded_bytes)
        self._count_drop(discarded)
        if request_keyframe and not self.paused:
            self._on_need_keyframe()

    def skip_for_gap(self, count: int) -> None:
        """``count`` messages were lost before they reached this relay (its upstream
        dropped them, then resumes at a KEY): a drop episode as if they had been dropped
        here, so the viewer resumes with ``dropped``, the CONFIG if it changed, then the
        KEY.  No keyframe request: the upstream's KEY is on its way.  A viewer still
        waiting for its first KEY lost nothing."""
        if self.closed or self.waiting_for_key:
            return
        self._enter_skipping(request_keyframe=False)
        self._count_drop(count)

    def shed(self) -> None:
        """Put the viewer into skipping now (the global budget is over its bound)."""
        if not self.closed and not self.waiting_for_key:
            self._enter_skipping(keep_audio=False)

    def request_keyframe(self) -> None:
        """The viewer asked for a keyframe itself."""
        self._on_need_keyframe()

    # -- output towards the transport --------------------------------------------

    def _deliver(self, item: _Outbound) -> None:
        if self._paused or self._queue:
            queue = self._queue
            if not isinstance(queue, deque):
                queue = self._queue = deque()
            queue.append(item)
            self._queued_bytes += item.size
            self._on_backlog_change(item.size)
            return
        self._write(item.frame, item.size, item.message)

    def _write(self, frame: Any, size: int, message: MediaInfo | None) -> None:
        """Hand one message (charged ``size``) to the transport."""
        if message is not None and message.flags & FLAG_CONFIG:
            # Only a CONFIG that really left counts as sent: a discarded one is resent.
            self._config_sent = message
        self._sent_messages += 1
        self._bytes_sent += max(1, size - self._overhead)
        if self._sink.write_frame(frame):
            return  # all of it is in the kernel: nothing waits in the transport
        self.kept_by_transport(size - self._overhead)

    def kept_by_transport(self, size: int) -> None:
        """The transport kept (some of) the last message, of ``size`` bytes, written to
        it: count it, and if it paused us, estimate what it holds."""
        self._writes_since_resume += 1
        self._bytes_since_resume += size
        # A write that made the transport pause us sits, with up to its high-water mark
        # of earlier data, in the transport's buffer; one that did not is on its way.
        if self._paused:
            self._set_transport_bytes(self._transport_estimate(size + self._overhead))

    def _transport_estimate(self, last_size: int) -> int:
        """Memory in a transport that just paused: its high-water mark of bytes, the last
        message (charged ``last_size``) whole, and the per-write overhead of as many
        writes as their mean size since it last drained fits in that many bytes (no
        more than were written since then)."""
        wire_bytes = TRANSPORT_HIGH_WATER_BYTES + last_size - self._overhead
        writes = self._writes_since_resume
        mean_write_bytes = max(1.0, self._bytes_since_resume / max(1, writes))
        writes = min(writes, math.ceil(wire_bytes / mean_write_bytes))
        return TRANSPORT_HIGH_WATER_BYTES + last_size + writes * TRANSPORT_WRITE_OVERHEAD_BYTES

    def pause_producing(self) -> None:
        """The transport's buffer is full: hold messages here and start the stall clock."""
        if self.paused or self.closed:
            return
        self.paused = True
        if self._stall_call is None and self._stall_timeout > 0:
            self._stall_call = self._clock.callLater(self._stall_timeout, self._stalled)

    def resume_producing(self) -> None:
        """The transport drained: write what waits, then ask for a KEY if skipping."""
        if self.closed:
            return
        self.paused = False
        # Twisted resumes its producer once its buffer is empty.
        self._writes_since_resume = 0
        self._bytes_since_resume = 0
        self._set_transport_bytes(0)
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._stall_call = None
        # Each turn reads the queue afresh: a write may pause the transport, and the
        # budget may then shed this viewer, which replaces the queue.
        while isinstance(self._queue, deque) and self._queue:
            if self._paused or self._closed:
                break
            item = self._queue.popleft()
            self._queued_bytes -= item.size
            self._on_backlog_change(-item.size)
            self._write(item.frame, item.size, item.message)
        if not self._queue:
            self._queue = ()
        if self.skipping and not self.paused:
            self._on_need_keyframe()

    def _stalled(self) -> None:
        self._stall_call = None
        if not self.closed:
            self._sink.stalled()

    def close(self) -> None:
        """The viewer is gone: drop everything and give its bytes back."""
        if self.closed:
            return
        self.closed = True
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._stall_call = None
        released = self.backlog_bytes
        self._queue = ()
        self._queued_bytes = 0
        self._transport_bytes = 0
        if released:
            self._on_backlog_change(-released)
