"""The viewer queue's fast path, the one every viewer of every media message takes: no
object made per message, writes the kernel took whole never charged to the transport,
and its one-field summary of the queue's state always right."""

from __future__ import annotations

import sys
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from streamrelay.budget import MESSAGE_OVERHEAD_BYTES
from streamrelay.viewer_queue import (
    TRANSPORT_HIGH_WATER_BYTES,
    TRANSPORT_WRITE_OVERHEAD_BYTES,
    ViewerQueue,
)
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, MediaInfo, encode_media, parse_media


def media(flags: int, tag: int, size: int = 100) -> MediaInfo:
    """A media message's description, identified by its capture time ``tag``."""
    return parse_media(encode_media(flags, tag, b"\x00" * (size - 9))).info()


class KernelSink:
    """A viewer whose writes the kernel takes whole (``write_frame`` returns True) unless
    ``buffer`` is set: then the transport keeps them and pauses past ``pause_after``."""

    def __init__(self) -> None:
        self.writes: list[Any] = []
        self.buffer = False
        self.pause_after = 0
        self.held = 0
        self.queue: ViewerQueue | None = None

    def write_frame(self, frame: Any) -> bool | None:
        self.writes.append(frame)
        if not self.buffer:
            return True
        self.held += frame[1]
        if self.held > self.pause_after:
            assert self.queue is not None
            self.queue.pause_producing()
        return False

    def stalled(self) -> None:
        raise AssertionError("no stall expected")

    def attached(self, queue: ViewerQueue) -> None:
        self.queue = queue


def make_queue(sink: KernelSink, limit: int = 1 << 22) -> tuple[ViewerQueue, list[int]]:
    """A queue on ``sink`` and the list of its backlog changes."""
    changes: list[int] = []
    queue = ViewerQueue(
        sink,
        Clock(),
        lambda payload, binary: ("text", len(payload)),
        limit=limit,
        stall_timeout=15.0,
        on_backlog_change=changes.append,
        on_dropped=lambda count: None,
        on_need_keyframe=lambda: None,
    )
    sink.attached(queue)
    return queue, changes


def test_a_viewer_that_keeps_up_costs_one_call_per_message() -> None:
    """Delivering a media message to a viewer that keeps up runs the queue's send_media
    and the sink's write_frame and nothing else: no constructor (no queue entry), no
    helper, no builtin (the calls seen by a profile hook)."""
    sink = KernelSink()
    queue, changes = make_queue(sink)
    queue.start([], None)
    key = media(FLAG_KEY, 1, 70_000)
    queue.send_media(key, ("key", key.size))
    message, frame = media(0, 2, 70_000), ("delta", 70_000)
    calls: list[str] = []

    def hook(frame_: Any, event: str, argument: Any) -> None:
        if event == "call":
            calls.append(frame_.f_code.co_name)
        elif event == "c_call":
            calls.append(f"builtin {argument.__name__}")

    sys.setprofile(hook)
    try:
        queue.send_media(message, frame)
    finally:
        sys.setprofile(None)
    assert calls[: calls.index("write_frame") + 1] == ["send_media", "write_frame"]
    # What the fake sink itself does is not the queue's; the hook sees its own removal.
    assert calls[calls.index("write_frame") + 1 :] == ["builtin append", "builtin setprofile"]
    assert sink.writes[-1] is frame
    assert queue.backlog_bytes == 0 and changes == []


def test_only_writes_the_transport_keeps_are_charged_to_it() -> None:
    """The transport estimate counts the writes it holds: the many that the kernel took
    whole before it paused do not count, the one it kept does."""
    sink = KernelSink()
    queue, changes = make_queue(sink, limit=100 * TRANSPORT_HIGH_WATER_BYTES)
    queue.start([], None)
    queue.send_media(media(FLAG_KEY, 1, 9), ("key", 9))
    for tag in range(2, 5000):
        queue.send_media(media(0, tag, 9), ("delta", 9))
    assert not queue.paused and queue.backlog_bytes == 0
    sink.buffer = True
    queue.send_media(media(0, 5000, 9), ("delta", 9))
    assert queue.paused
    assert queue.backlog_bytes == (
        TRANSPORT_HIGH_WATER_BYTES + 9 + MESSAGE_OVERHEAD_BYTES + TRANSPORT_WRITE_OVERHEAD_BYTES
    )
    assert sum(changes) == queue.backlog_bytes


_EVENTS = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["key", "delta", "delta", "config"]), st.integers(9, 3000)
        ),
        st.tuples(
            st.sampled_from(["text", "pause", "resume", "shed", "new-source", "close"]),
            st.none(),
        ),
    ),
    max_size=80,
)
_FLAGS = {"key": FLAG_KEY, "delta": 0, "config": FLAG_CONFIG}


@given(events=_EVENTS, buffer=st.booleans())
def test_the_fast_path_summary_is_always_right(
    events: list[tuple[str, int | None]], buffer: bool
) -> None:
    """Whatever happens, the queue takes its fast path exactly when the transport is not
    paused, the viewer decodes and is not skipping, and the queue is open; and it only
    holds messages while the transport is paused (so the fast path never overtakes)."""
    sink = KernelSink()
    sink.buffer = buffer
    sink.pause_after = 5000
    queue, changes = make_queue(sink, limit=8000 + 4 * MESSAGE_OVERHEAD_BYTES)
    queue.start([], None)
    for index, (kind, size) in enumerate(events):
        if kind in _FLAGS:
            assert size is not None
            queue.send_media(media(_FLAGS[kind], index, size), (kind, size))
        elif kind == "text":
            queue.send_text(("text", 20), 20, "other")
        elif kind == "pause":
            queue.pause_producing()
        elif kind == "resume":
            sink.held = 0
            queue.resume_producing()
        elif kind == "shed":
            queue.shed()
        elif kind == "new-source":
            queue.expect_new_source()
        else:
            queue.close()
        expected = not (
            queue.paused or queue.waiting_for_key or queue.skipping or queue.closed
        )
        assert queue._flowing is expected
        assert not queue._queue or queue.paused
        assert sum(changes) == queue.backlog_bytes
