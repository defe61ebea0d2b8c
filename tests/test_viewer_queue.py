"""The per-viewer queue and the drop-to-keyframe policy, driven with a fake sink."""

from __future__ import annotations

import gc
import json
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from streamrelay.budget import MESSAGE_OVERHEAD_BYTES
from streamrelay.viewer_queue import (
    TRANSPORT_HIGH_WATER_BYTES,
    TRANSPORT_WRITE_OVERHEAD_BYTES,
    ViewerQueue,
)
from streamrelay.wire import (
    FLAG_CONFIG,
    FLAG_KEY,
    MediaInfo,
    encode_media,
    encode_text,
    parse_media,
)

OVERHEAD = MESSAGE_OVERHEAD_BYTES
# The queue charges each message its bytes plus OVERHEAD: room for 1000 bytes in four
# messages.
LIMIT = 1000 + 4 * OVERHEAD
# Two messages of this size do not fit in the queue, one does.
BIG = 600 + OVERHEAD
STALL = 15.0


def cost(*sizes: int) -> int:
    """The memory the queue is charged for messages of these sizes."""
    return sum(size + OVERHEAD for size in sizes)


def encoded(flags: int, tag: int, size: int = 100) -> bytes:
    """A message identified by its capture time ``tag``, ``size`` bytes in all."""
    return encode_media(flags, tag, b"\x00" * (size - 9))


def media(flags: int, tag: int, size: int = 100) -> MediaInfo:
    """The description the queue holds of :func:`encoded` ``(flags, tag, size)``."""
    return parse_media(encoded(flags, tag, size)).info()


@dataclass(frozen=True)
class Out:
    """What the sink saw: a media message (by tag) or a text message (decoded)."""

    kind: str  # "media" or "text"
    tag: int | None = None
    flags: int = 0
    size: int = 0
    value: Any = None

    @property
    def media_tag(self) -> int:
        """The tag of a media write."""
        assert self.kind == "media" and self.tag is not None, self
        return self.tag


@dataclass
class Sink:
    """Records writes; optionally pauses the queue once ``pause_after`` bytes were
    written since the last resume (as a transport with that buffer size would)."""

    writes: list[Out] = field(default_factory=list)
    stalls: int = 0
    pause_after: int | None = None
    queue: ViewerQueue | None = None
    written_since_resume: int = 0

    def write_frame(self, frame: Out) -> None:
        self.writes.append(frame)
        self.written_since_resume += frame.size
        if self.pause_after is not None and self.written_since_resume > self.pause_after:
            assert self.queue is not None
            self.queue.pause_producing()

    def stalled(self) -> None:
        self.stalls += 1

    def attached(self, queue: ViewerQueue) -> None:
        self.queue = queue

    def resume(self) -> None:
        """The transport drained its buffer."""
        assert self.queue is not None
        self.written_since_resume = 0
        self.queue.resume_producing()


def _frame_factory(payload: bytes, is_binary: bool) -> Out:
    assert not is_binary, "the queue frames only its own text notices"
    return Out("text", value=json.loads(payload), size=len(payload))


class Harness:
    """A ViewerQueue on a Clock, with every callback recorded."""

    def __init__(self, limit: int = LIMIT, stall: float = STALL, pause_after: int | None = None):
        self.clock = Clock()
        self.sink = Sink(pause_after=pause_after)
        self.backlog_total = 0
        self.dropped_reported = 0
        self.keyframe_needs = 0
        self.queue = ViewerQueue(
            self.sink,
            self.clock,
            _frame_factory,
            limit=limit,
            stall_timeout=stall,
            on_backlog_change=self._backlog,
            on_dropped=self._dropped,
            on_need_keyframe=self._need,
        )
        self.sink.attached(self.queue)

    def _backlog(self, delta: int) -> None:
        self.backlog_total += delta
        assert self.backlog_total >= 0

    def _dropped(self, count: int) -> None:
        assert count >= 0
        self.dropped_reported += count

    def _need(self) -> None:
        self.keyframe_needs += 1

    def media(self, message: MediaInfo) -> None:
        frame = Out("media", message.capture_time_us, message.flags, message.size)
        self.queue.send_media(message, frame)

    def send(self, *messages: MediaInfo) -> None:
        for message in messages:
            self.media(message)

    def text(self, value: dict[str, Any], kind: str = "other") -> None:
        raw = encode_text(value)
        self.queue.send_text(Out("text", value=value, size=len(raw)), len(raw), kind)

    def start(self, *messages: MediaInfo, config: MediaInfo | None = None) -> None:
        sequence = [(m, Out("media", m.capture_time_us, m.flags, m.size)) for m in messages]
        config_pair = None
        if config is not None:
            config_pair = (config, Out("media", config.capture_time_us, config.flags, config.size))
        self.queue.start(sequence, config_pair)

    def written(self) -> list[Any]:
        """Tags of media and ``("dropped", N)`` / text values, in write order."""
        result: list[Any] = []
        for out in self.sink.writes:
            if out.kind == "media":
                result.append(out.tag)
            elif out.value.get("type") == "dropped":
                result.append(("dropped", out.value["messages"]))
            else:
                result.append(out.value)
        return result


def started(**keywords: Any) -> Harness:
    """A harness whose viewer already decodes: CONFIG 1 and KEY 2 written."""
    harness = Harness(**keywords)
    harness.start()
    harness.send(media(FLAG_CONFIG, 1, 40), media(FLAG_KEY, 2))
    assert harness.written() == [1, 2]
    return harness


# -- delivery ----------------------------------------------------------------------------


def test_writes_immediately_when_not_paused() -> None:
    """With a transport that accepts data every message is written at once."""
    harness = started()
    harness.send(media(0, 3), media(0, 4))
    harness.text({"type": "meta", "codec": "h264"}, "meta")
    assert harness.written() == [1, 2, 3, 4, {"type": "meta", "codec": "h264"}]
    assert harness.queue.backlog_bytes == 0
    assert harness.backlog_total == 0


def test_holds_while_paused_and_writes_in_order_on_resume() -> None:
    """A paused transport makes messages wait, in order, text included."""
    harness = started()
    harness.queue.pause_producing()
    harness.send(media(0, 3))
    harness.text({"type": "x", "n": 1})
    harness.send(media(0, 4))
    assert harness.written() == [1, 2]
    assert harness.queue.backlog_bytes == harness.backlog_total > 200
    harness.sink.resume()
    assert harness.written() == [1, 2, 3, {"type": "x", "n": 1}, 4]
    assert harness.queue.backlog_bytes == harness.backlog_total == 0


def test_a_write_that_pauses_the_transport_counts_as_pending() -> None:
    """When a write fills the transport, its bytes (and the transport's buffer) count as
    pending towards the viewer until the transport drains."""
    harness = Harness(limit=10 * TRANSPORT_HIGH_WATER_BYTES, pause_after=0)
    harness.start()
    harness.send(media(FLAG_KEY, 1, 500))
    assert harness.queue.paused
    assert harness.queue.backlog_bytes == (
        TRANSPORT_HIGH_WATER_BYTES + cost(500) + TRANSPORT_WRITE_OVERHEAD_BYTES
    )
    assert harness.backlog_total == harness.queue.backlog_bytes
    harness.sink.pause_after = None
    harness.sink.resume()
    assert harness.queue.backlog_bytes == harness.backlog_total == 0


def test_a_transport_full_of_tiny_writes_is_charged_their_overhead() -> None:
    """64 KiB of 9-byte messages is thousands of writes waiting in the transport, each
    an object of its own: a transport that paused is charged its high-water mark plus
    the overhead of as many writes as the recent sizes fit in it, not 64 KiB alone."""
    harness = Harness(
        limit=100 * TRANSPORT_HIGH_WATER_BYTES, pause_after=TRANSPORT_HIGH_WATER_BYTES
    )
    harness.start()
    harness.send(media(FLAG_KEY, 1, 9))
    tag = 2
    while not harness.queue.paused:
        harness.send(media(0, tag, 9))
        tag += 1
    writes = len(harness.sink.writes)
    assert writes > TRANSPORT_HIGH_WATER_BYTES // 9
    charged = harness.queue.backlog_bytes
    assert charged == harness.backlog_total
    assert charged >= TRANSPORT_HIGH_WATER_BYTES + writes * TRANSPORT_WRITE_OVERHEAD_BYTES
    assert charged <= TRANSPORT_HIGH_WATER_BYTES + cost(9) + (writes + 1) * (
        TRANSPORT_WRITE_OVERHEAD_BYTES
    )
    # Once it drained and large messages follow, a pause costs little beyond 64 KiB.
    harness.sink.resume()
    for index in range(200):
        harness.send(media(0, tag + index, 20_000))
        if harness.queue.paused:
            harness.sink.resume()
    harness.send(media(0, tag + 200, 70_000))
    assert harness.queue.paused
    assert harness.queue.backlog_bytes <= (
        TRANSPORT_HIGH_WATER_BYTES + cost(70_000) + 8 * TRANSPORT_WRITE_OVERHEAD_BYTES
    )


def test_transport_write_overhead_is_not_an_underestimate() -> None:
    """Re-measured with tracemalloc: what a transport keeps per pending write (the bytes
    object of the prepared frame and a slot in its list of writes, as Twisted's
    FileDescriptor does until it joins them) is at most the message's size plus
    TRANSPORT_WRITE_OVERHEAD_BYTES, for tiny and large messages."""
    factory = WebSocketServerFactory()
    for size, count in ((9, 5000), (100, 5000), (300, 2000), (70_000, 100)):
        messages = [encoded(0, tag, size) for tag in range(count)]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            frames = [
                factory.prepareMessage(m, isBinary=True, doNotCompress=True)
                for m in messages
            ]
            pending = [frame.payloadHybi for frame in frames]
            del frames
            gc.collect()
            per_write = (tracemalloc.get_traced_memory()[0] - before) / count - size
        finally:
            tracemalloc.stop()
        assert len(pending) == count
        assert per_write <= TRANSPORT_WRITE_OVERHEAD_BYTES, f"{per_write:.0f} B at {size} B"
        assert per_write > 33, "the measurement missed the bytes object"


def test_joins_waiting_for_a_key_without_counting_drops() -> None:
    """Before its first KEY a viewer gets no media; that is not a drop episode."""
    harness = Harness()
    harness.start(config=media(FLAG_CONFIG, 1, 40))
    assert harness.queue.waiting_for_key
    harness.send(media(0, 2), media(0, 3))
    assert harness.written() == []
    harness.send(media(FLAG_KEY, 4), media(0, 5))
    assert harness.written() == [1, 4, 5]
    assert harness.queue.dropped_total == 0
    assert harness.dropped_reported == 0


def test_start_from_a_cached_gop() -> None:
    """A cached GOP (CONFIG, KEY, deltas) is written at once on join."""
    harness = Harness()
    harness.start(
        media(FLAG_CONFIG, 1, 40), media(FLAG_KEY, 2), media(0, 3), config=media(FLAG_CONFIG, 9)
    )
    assert harness.written() == [1, 2, 3]
    assert not harness.queue.waiting_for_key


def test_new_source_waits_for_its_config_and_key() -> None:
    """After a publisher change the viewer waits for the new CONFIG and KEY, not
    counting what it skips as dropped, and never sends the old CONFIG."""
    harness = started()
    harness.queue.expect_new_source()
    harness.send(media(0, 10))
    harness.send(media(FLAG_CONFIG, 11, 40), media(0, 12), media(FLAG_KEY, 13), media(0, 14))
    assert harness.written() == [1, 2, 11, 13, 14]
    assert harness.dropped_reported == 0


# -- the bound and skipping ----------------------------------------------------------------


def test_overflow_enters_skipping_and_discards_queued_media_but_keeps_text() -> None:
    """A message that would exceed --viewer-queue-bytes puts the viewer into skipping:
    queued media is discarded, queued text stays, in order."""
    harness = started()
    harness.queue.pause_producing()
    harness.send(media(0, 3, 300))
    harness.text({"type": "x", "n": 1})
    harness.send(media(0, 4, 300), media(0, 5, 300))
    assert not harness.queue.skipping
    harness.send(media(0, 6, 300))  # 900 + text + 300 bytes in five messages > LIMIT
    assert harness.queue.skipping
    text_cost = cost(len(encode_text({"type": "x", "n": 1})))
    assert harness.queue.backlog_bytes == harness.backlog_total == text_cost
    harness.send(media(0, 7), media(FLAG_CONFIG, 8, 40), media(0, 9))
    harness.sink.resume()
    assert harness.written() == [1, 2, {"type": "x", "n": 1}]
    assert harness.keyframe_needs == 1
    harness.send(media(FLAG_KEY, 10), media(0, 11))
    assert harness.written()[3:] == [("dropped", 6), 8, 10, 11]


def test_dropped_counts_every_media_message_not_delivered() -> None:
    """``dropped`` reports the messages dropped in the episode; the stream total (via
    on_dropped) and the queue total agree."""
    harness = started()
    harness.queue.pause_producing()
    for tag in range(3, 13):  # ten deltas of 300: three queue, the fourth overflows
        harness.media(media(0, tag, 300))
    harness.sink.resume()
    harness.media(media(FLAG_KEY, 20))
    assert harness.written() == [1, 2, ("dropped", 10), 20]
    assert harness.queue.dropped_total == harness.dropped_reported == 10
    assert harness.queue.skip_episodes == 1


def test_config_unchanged_while_skipping_is_not_resent() -> None:
    """After drops the CONFIG comes again only when it changed while skipping."""
    harness = started()
    harness.queue.pause_producing()
    harness.send(media(0, 3, BIG), media(0, 4, BIG))
    harness.sink.resume()
    harness.send(media(FLAG_KEY, 5))
    assert harness.written() == [1, 2, ("dropped", 2), 5]


def test_config_discarded_from_the_queue_is_resent() -> None:
    """A CONFIG that was queued and then discarded by skipping never reached the viewer:
    it comes before the next KEY (and, being resent, is not counted as dropped)."""
    harness = started()
    harness.queue.pause_producing()
    harness.send(media(FLAG_CONFIG, 3, 40), media(0, 4, BIG), media(0, 5, BIG))
    harness.sink.resume()
    harness.send(media(FLAG_KEY, 6))
    assert harness.written() == [1, 2, ("dropped", 2), 3, 6]
    assert harness.dropped_reported == 2


def test_deltas_before_the_key_are_dropped_while_skipping() -> None:
    """Skipping lasts until a KEY: deltas are dropped even after the transport drained."""
    harness = started()
    harness.queue.pause_producing()
    harness.send(media(0, 3, BIG), media(0, 4, BIG))
    harness.sink.resume()
    harness.send(media(0, 5), media(0, 6))
    assert harness.written() == [1, 2]
    harness.send(media(FLAG_KEY, 7))
    assert harness.written() == [1, 2, ("dropped", 4), 7]


def test_a_key_that_does_not_fit_while_skipping_is_dropped_too() -> None:
    """Resuming needs room for the KEY; otherwise it is dropped and counted."""
    harness = started()
    harness.queue.pause_producing()
    harness.text({"type": "x", "pad": "p" * (900 + 3 * OVERHEAD)})
    harness.send(media(0, 3, 200))  # overflow: skipping
    harness.send(media(FLAG_KEY, 4, 200))  # still no room
    assert harness.queue.skipping
    harness.sink.resume()
    harness.send(media(FLAG_KEY, 5, 200))
    assert harness.written()[3:] == [("dropped", 2), 5]


def test_shed_puts_a_viewer_into_skipping_and_asks_for_a_keyframe() -> None:
    """The global budget can shed a viewer at any time; when its transport accepts
    data a keyframe request goes out at once."""
    harness = started()
    harness.queue.shed()
    assert harness.queue.skipping
    assert harness.keyframe_needs == 1
    harness.send(media(0, 3), media(FLAG_KEY, 4))
    assert harness.written() == [1, 2, ("dropped", 1), 4]


def test_paused_viewer_asks_for_a_keyframe_when_it_can_take_one() -> None:
    """A keyframe is asked for when the skipping viewer's transport drains, not while
    it is still full (the KEY would be dropped)."""
    harness = started()
    harness.queue.pause_producing()
    harness.send(media(0, 3, BIG), media(0, 4, BIG))
    assert harness.queue.skipping and harness.keyframe_needs == 0
    harness.sink.resume()
    assert harness.keyframe_needs == 1


def test_viewer_keyframe_request_is_passed_on() -> None:
    """A viewer's own keyframe-request reaches the stream."""
    harness = started()
    harness.queue.request_keyframe()
    assert harness.keyframe_needs == 1


def test_second_episode_before_the_notice_left_reports_one_total() -> None:
    """If the queue overflows again before the first ``dropped`` notice was written,
    the viewer gets one notice counting both episodes, then CONFIG? KEY."""
    harness = started()
    harness.queue.pause_producing()
    harness.send(media(0, 3, BIG), media(0, 4, BIG))  # episode 1: 2 dropped (3 and 4)
    harness.send(media(FLAG_KEY, 5, 300))  # resumes into the queue (still paused)
    harness.send(media(0, 6, 900 + OVERHEAD))  # episode 2: discards KEY 5 and drops 6
    harness.sink.resume()
    harness.send(media(FLAG_KEY, 7))
    assert harness.written() == [1, 2, ("dropped", 4), 7]
    assert harness.dropped_reported == 4


def test_status_and_meta_supersede_unsent_older_ones() -> None:
    """An unsent status or meta that is the last queued message is replaced by a newer
    one of the same kind (the viewer needs the current state, not the history)."""
    harness = started()
    harness.queue.pause_producing()
    harness.text({"type": "status", "state": "offline"}, "status")
    harness.text({"type": "status", "state": "live"}, "status")
    harness.text({"type": "meta", "v": 1}, "meta")
    harness.text({"type": "meta", "v": 2}, "meta")
    harness.sink.resume()
    assert harness.written()[2:] == [
        {"type": "status", "state": "live"},
        {"type": "meta", "v": 2},
    ]
    assert harness.backlog_total == 0


def test_superseding_never_moves_text_across_media() -> None:
    """A status or meta with media queued after it is kept where it is: the viewer never
    gets media while it believes the stream is in another state."""
    harness = started()
    harness.queue.pause_producing()
    harness.text({"type": "status", "state": "offline"}, "status")
    harness.media(media(FLAG_KEY, 3))
    harness.text({"type": "status", "state": "live"}, "status")
    harness.sink.resume()
    assert harness.written()[2:] == [
        {"type": "status", "state": "offline"},
        3,
        {"type": "status", "state": "live"},
    ]


# -- stall timer and close ---------------------------------------------------------------


def test_stall_timer_fires_after_the_timeout_of_pause() -> None:
    """A viewer whose transport makes no write progress for --viewer-stall-timeout is
    reported stalled, once."""
    harness = started()
    harness.queue.pause_producing()
    harness.clock.advance(STALL - 0.01)
    assert harness.sink.stalls == 0
    harness.clock.advance(0.02)
    assert harness.sink.stalls == 1
    harness.clock.advance(100)
    assert harness.sink.stalls == 1


def test_resume_cancels_the_stall_timer() -> None:
    """Write progress within the timeout keeps the viewer; the clock restarts."""
    harness = started()
    for _ in range(5):
        harness.queue.pause_producing()
        harness.clock.advance(STALL - 1)
        harness.sink.resume()
    assert harness.sink.stalls == 0
    assert harness.clock.getDelayedCalls() == []
    harness.queue.pause_producing()
    harness.clock.advance(STALL)
    assert harness.sink.stalls == 1


def test_repeated_pause_does_not_restart_the_stall_timer() -> None:
    """Pauses without a resume in between do not push the deadline back."""
    harness = started()
    harness.queue.pause_producing()
    harness.clock.advance(STALL / 2)
    harness.queue.pause_producing()
    harness.clock.advance(STALL / 2)
    assert harness.sink.stalls == 1


def test_no_stall_without_a_pause() -> None:
    """An idle viewer whose transport accepts data is never stalled."""
    harness = started()
    harness.clock.advance(STALL * 10)
    assert harness.sink.stalls == 0


def test_close_releases_every_byte_and_timer() -> None:
    """A viewer that leaves gives back its backlog to the global budget and keeps no
    timer; later messages are ignored."""
    harness = Harness(pause_after=0, limit=10 * TRANSPORT_HIGH_WATER_BYTES)
    harness.start()
    harness.send(media(FLAG_KEY, 1), media(0, 2), media(0, 3))
    harness.text({"type": "x"})
    assert harness.backlog_total > 0
    harness.queue.close()
    assert harness.backlog_total == 0
    assert harness.queue.backlog_bytes == 0
    assert harness.clock.getDelayedCalls() == []
    before = len(harness.sink.writes)
    harness.send(media(FLAG_KEY, 4))
    harness.text({"type": "x"})
    harness.queue.resume_producing()
    harness.queue.close()
    assert len(harness.sink.writes) == before
    assert harness.backlog_total == 0


# -- property: never duplicated or reordered, GOPs whole, the bound held ------------------


# A publisher's messages interleaved with transport pauses/resumes, text and budget sheds.
_events = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["key", "delta", "delta", "delta", "config"]), st.integers(9, 700)
        ),
        st.tuples(st.sampled_from(["text", "pause", "resume", "shed"]), st.none()),
    ),
    min_size=1,
    max_size=60,
)

_FLAGS = {"key": FLAG_KEY, "delta": 0, "config": FLAG_CONFIG}


@given(events=_events, pause_after=st.one_of(st.none(), st.integers(0, 3000)))
def test_viewer_output_is_an_ordered_decodable_subsequence(
    events: list[tuple[str, Any]], pause_after: int | None
) -> None:
    """Whatever the publisher sends and however the transport pauses, the viewer gets:
    a subsequence of the publisher's messages in order with no duplicate; every text;
    each GOP whole from its KEY up to where it is cut; the CONFIG in effect at each KEY
    it starts from; after every gap a ``dropped`` notice then CONFIG? then KEY; and the
    pending media memory stays within the limit plus one message (plus the transport's
    estimated buffer)."""
    limit = 2000 + 4 * OVERHEAD
    harness = Harness(limit=limit, pause_after=pause_after)
    harness.start()
    sent: list[Any] = []  # the publisher's order: MediaInfo or text value
    largest = 0
    for index, (kind, size) in enumerate(events):
        if kind in _FLAGS:
            message = media(_FLAGS[kind], index, size)
            largest = max(largest, size)
            sent.append(message)
            harness.media(message)
        elif kind == "text":
            value = {"type": "x", "n": index}
            sent.append(value)
            harness.text(value)
        elif kind == "pause":
            harness.queue.pause_producing()
        elif kind == "resume":
            harness.sink.resume()
        else:
            harness.queue.shed()
        # Bookkeeping is exact and the bound holds.
        assert harness.backlog_total == harness.queue.backlog_bytes
        text_bytes = sum(
            item.size for item in harness.queue._queue if item.message is None
        )
        # When a write fills the transport its share is estimated as its high-water
        # mark plus that message plus the overhead of the writes it may hold; otherwise
        # everything pending is in the queue.
        estimate = 0
        if pause_after is not None:
            estimate = TRANSPORT_HIGH_WATER_BYTES + len(events) * TRANSPORT_WRITE_OVERHEAD_BYTES
        assert harness.queue.backlog_bytes - text_bytes <= limit + estimate + cost(largest)
    harness.sink.pause_after = None
    harness.sink.resume()
    _check_output(sent, harness.sink.writes)
    assert harness.dropped_reported == harness.queue.dropped_total
    harness.queue.close()
    assert harness.backlog_total == 0


def _check_output(sent: list[Any], writes: list[Out]) -> None:
    media_sent = [m for m in sent if isinstance(m, MediaInfo)]
    position = {m.capture_time_us: i for i, m in enumerate(media_sent)}
    texts_sent = [t for t in sent if not isinstance(t, MediaInfo)]
    # Every ordinary text arrives, once, in order.
    texts_written = [
        w.value for w in writes if w.kind == "text" and w.value.get("type") != "dropped"
    ]
    assert texts_written == texts_sent
    # Media: strictly increasing positions (no duplicate, no reordering) ...
    delivered = [position[w.media_tag] for w in writes if w.kind == "media"]
    assert delivered == sorted(set(delivered)), delivered
    # ... text and frames (KEY, delta) keep their relative order.  A CONFIG is held back
    # until the KEY it applies to, so it may come after text sent later.
    order_sent = {id(item): i for i, item in enumerate(sent)}
    by_tag = {m.capture_time_us: m for m in media_sent}
    sequence = []
    for w in writes:
        if w.kind == "media":
            if not w.flags & FLAG_CONFIG:
                sequence.append(order_sent[id(by_tag[w.media_tag])])
        elif w.value.get("type") != "dropped":
            sequence.append(order_sent[id(w.value)])
    assert sequence == sorted(sequence)
    # Decodability: walk the viewer's output like a decoder.
    have_config: MediaInfo | None = None
    last_position: int | None = None  # position of the last media delivered
    decoding = False
    notice_pending = False
    expect_key_next = False
    for w in writes:
        if w.kind == "text":
            if w.value.get("type") == "dropped":
                # 0 happens when the budget sheds a viewer with nothing queued.
                assert w.value["messages"] >= 0
                notice_pending = True
                expect_key_next = True
            continue
        message = media_sent[position[w.media_tag]]
        here = position[w.media_tag]
        was_decoding = decoding
        skipped = media_sent[(last_position + 1 if last_position is not None else 0) : here]
        if message.is_config:
            have_config = message
        elif message.is_key:
            # The CONFIG in effect at this KEY is the one the viewer holds.
            configs = [m for m in media_sent[:here] if m.is_config]
            assert have_config is (configs[-1] if configs else None)
            decoding = True
        else:
            assert decoding, "a delta before any KEY"
            # Whole GOP: nothing between the previous delivered message and this one.
            assert skipped == [], "a delta after a gap"
        if expect_key_next and not message.is_config:
            assert message.is_key, "after `dropped` the next frame is a KEY"
            expect_key_next = False
        lost_frames = [m for m in skipped if not m.is_config]
        if was_decoding and lost_frames:
            # Every gap after the first KEY is announced by a `dropped` notice.
            assert notice_pending, "media skipped without a dropped notice"
        if not message.is_config:
            notice_pending = False
        last_position = here


# -- rendition switches (streamrelay.adaptive) -------------------------------------------


def _pair(message: MediaInfo) -> tuple[MediaInfo, Out]:
    return message, Out("media", message.capture_time_us, message.flags, message.size)


def test_a_switch_sends_what_is_queued_then_the_new_config_and_key() -> None:
    """``switch_source``: the old source's queued media goes first, then the new
    source's CONFIG (even when a CONFIG was sent before) and its KEY; no drop episode."""
    harness = started()
    harness.queue.pause_producing()
    harness.send(media(0, 3), media(0, 4))
    key = media(FLAG_KEY, 102)
    harness.queue.switch_source(_pair(media(FLAG_CONFIG, 101, 40)), key, _pair(key)[1])
    harness.send(media(0, 103))
    harness.sink.resume()
    assert harness.written() == [1, 2, 3, 4, 101, 102, 103]
    assert harness.queue.skip_episodes == 0 and not harness.queue.skipping


def test_a_switch_during_a_drop_episode_ends_it_with_its_notice() -> None:
    """A viewer skipping when its switch comes resumes at the new KEY: ``dropped``, the
    new CONFIG, the KEY."""
    harness = started()
    harness.queue.pause_producing()
    harness.send(*(media(0, tag, 300) for tag in range(3, 8)))
    assert harness.queue.skipping
    harness.sink.resume()
    key = media(FLAG_KEY, 102)
    harness.queue.switch_source(_pair(media(FLAG_CONFIG, 101, 40)), key, _pair(key)[1])
    assert harness.written() == [1, 2, ("dropped", 5), 101, 102]
    assert not harness.queue.skipping


def test_rebind_reports_to_the_new_stream() -> None:
    """After ``rebind`` drops and keyframe needs go to the new callbacks."""
    harness = started()
    needs: list[int] = []
    drops: list[int] = []
    harness.queue.rebind(drops.append, lambda: needs.append(1))
    harness.queue.request_keyframe()
    harness.queue.shed()
    harness.send(media(0, 3))
    assert needs and sum(drops) == 1
    assert harness.keyframe_needs == 0 and harness.dropped_reported == 0
