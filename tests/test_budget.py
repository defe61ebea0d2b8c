"""The global bound on buffered bytes (--max-buffered-bytes)."""

from __future__ import annotations

import gc
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet.task import Clock

from streamrelay.budget import MESSAGE_OVERHEAD_BYTES, BufferBudget
from streamrelay.gop import GopCache
from streamrelay.viewer_queue import ViewerQueue
from streamrelay.wire import FLAG_KEY, MediaMessage, encode_media, parse_media


class Member:
    """A viewer backlog or GOP cache holding ``size`` bytes; shedding keeps ``keeps``."""

    def __init__(self, budget: BufferBudget, name: str, size: int, keeps: int = 0) -> None:
        self.budget = budget
        self.name = name
        self.size = 0
        self.keeps = keeps
        self.shed_count = 0
        self.grow(size)

    @property
    def backlog_bytes(self) -> int:
        return self.size

    @property
    def sheddable_bytes(self) -> int:
        return self.size - min(self.size, self.keeps)

    def grow(self, amount: int) -> None:
        self.size += amount
        self.budget.adjust(amount)

    def shed(self) -> None:
        self.shed_count += 1
        released = self.size - min(self.size, self.keeps)
        self.size -= released
        self.budget.adjust(-released)


def _viewer(budget: BufferBudget, name: str, size: int, keeps: int = 0) -> Member:
    budget.add_viewer(member := Member(budget, name, 0, keeps))
    member.grow(size)
    return member


def _cache(budget: BufferBudget, name: str, size: int, keeps: int = 0) -> Member:
    budget.add_cache(member := Member(budget, name, 0, keeps))
    member.grow(size)
    return member


def test_under_the_bound_nothing_is_shed() -> None:
    """Below --max-buffered-bytes every backlog is left alone."""
    budget = BufferBudget(1000)
    members = [_viewer(budget, "a", 400), _viewer(budget, "b", 300), _cache(budget, "c", 299)]
    assert budget.total == 999
    assert budget.sheds == 0
    assert all(member.shed_count == 0 for member in members)


def test_largest_viewer_backlogs_are_shed_until_under_75_percent() -> None:
    """At the bound, the viewers with the largest backlogs are put into skipping, the
    largest first, until the total is under 75% of the bound; small ones are spared."""
    budget = BufferBudget(1000)
    small = _viewer(budget, "small", 100)
    medium = _viewer(budget, "medium", 200)
    large = _viewer(budget, "large", 250)
    cache = _cache(budget, "cache", 150)
    assert budget.total == 700
    huge = _viewer(budget, "huge", 300)  # 1000: at the bound
    assert huge.shed_count == 1
    assert large.shed_count == 0  # 700 < 750 after the first shed
    assert small.shed_count == medium.shed_count == cache.shed_count == 0
    assert budget.total == 700 < 750


def test_several_viewers_are_shed_when_one_is_not_enough() -> None:
    """Shedding continues down the list of backlogs until under the low-water mark."""
    budget = BufferBudget(1000)
    viewers = [_viewer(budget, f"v{size}", size) for size in (200, 220, 240, 230)]
    cache = _cache(budget, "cache", 100)
    assert budget.total == 990
    viewers[0].grow(10)  # total 1000
    shed = {member.name for member in viewers if member.shed_count}
    assert shed == {"v240", "v230"}  # 1000 -> 760 (still >= 750) -> 530
    assert cache.shed_count == 0
    assert budget.total < 750


def test_gop_caches_are_shed_after_viewers() -> None:
    """When viewer backlogs cannot get the total under 75%, GOP caches are emptied too,
    the largest first."""
    budget = BufferBudget(1000)
    viewer = _viewer(budget, "viewer", 100)
    big = _cache(budget, "big", 500)
    small_cache = _cache(budget, "small", 150)
    tiny = _cache(budget, "tiny", 100)
    assert budget.total == 850
    viewer.grow(150)  # 1000
    assert viewer.shed_count == 1
    assert big.shed_count == 1
    assert small_cache.shed_count == 0 and tiny.shed_count == 0
    assert budget.total == 250


def test_members_that_keep_bytes_do_not_stop_the_shedding() -> None:
    """A viewer that keeps some bytes (a message half written) still leaves room for
    the others to be shed."""
    budget = BufferBudget(1000)
    stubborn = _viewer(budget, "stubborn", 600, keeps=500)
    other = _viewer(budget, "other", 300)
    cache = _cache(budget, "cache", 99)
    cache.grow(1)  # 1000
    assert stubborn.shed_count == 1
    assert other.shed_count == 1
    assert budget.total < 750


def test_shedding_is_not_reentrant() -> None:
    """Adjustments made by shedding itself do not start a nested enforcement."""
    budget = BufferBudget(100)

    class Grower(Member):
        def shed(self) -> None:
            super().shed()
            # Shedding one member makes another grow past the bound again.
            other.grow(10)

    grower = Grower(budget, "grower", 0)
    budget.add_viewer(grower)
    other = _viewer(budget, "other", 0)
    grower.grow(100)
    assert grower.shed_count == 1
    assert budget.total == 10


def test_removed_members_are_not_shed() -> None:
    """A viewer that left is no longer part of the budget."""
    budget = BufferBudget(1000)
    gone = _viewer(budget, "gone", 500)
    gone.grow(-500)
    budget.remove(gone)
    stay = _viewer(budget, "stay", 999)
    stay.grow(1)
    assert gone.shed_count == 0
    assert stay.shed_count == 1
    assert budget.total == 0


def test_zero_limit_means_no_bound() -> None:
    """A limit of 0 disables the global bound."""
    budget = BufferBudget(0)
    member = _viewer(budget, "a", 10**9)
    assert member.shed_count == 0
    assert budget.total == 10**9


def test_bytes_that_cannot_be_shed_do_not_trigger_a_pass_per_message() -> None:
    """When what stays over the bound cannot be shed (bytes already in transports), the
    budget does not re-run a pass, shedding healthy viewers, on every later message: the
    next pass waits until the total grew by a sixteenth of the bound."""
    budget = BufferBudget(1600)
    stuck = [_viewer(budget, f"stuck{index}", 400, keeps=400) for index in range(4)]
    assert budget.total == 1600
    passes_after_first = budget.sheds
    healthy = _viewer(budget, "healthy", 0)
    for _ in range(50):
        healthy.grow(1)
    assert healthy.shed_count == 0, "a small increase over a stuck total must not shed"
    healthy.grow(100)
    assert healthy.shed_count == 1, "past the retry margin the largest sheddable is shed"
    assert all(member.size == 400 for member in stuck)
    assert budget.sheds >= passes_after_first


# -- the per-message overhead, re-measured ----------------------------------------------


def _relay_frame_factory() -> Any:
    """The frames the relay keeps: Autobahn PreparedMessages from a server factory,
    uncompressed, as ``RelayContext`` prepares them for its viewers."""
    factory = WebSocketServerFactory()

    def prepare(payload: bytes, is_binary: bool) -> Any:
        return factory.prepareMessage(payload, isBinary=is_binary, doNotCompress=True)

    return prepare


def _messages(size: int, count: int) -> list[MediaMessage]:
    """``count`` distinct media messages of ``size`` bytes with realistic capture times."""
    now = time.time_ns() // 1000
    filler = b"\x5a" * (size - 9)
    return [parse_media(encode_media(0, now + index, filler)) for index in range(count)]


def _traced_overhead(size: int, hold: Any) -> float:
    """Bytes traced per message beyond its size while ``hold(message)`` keeps what the
    relay keeps for each of a batch of messages (the raw bytes it parsed are made
    beforehand and are not counted: the relay drops them once the frame is prepared)."""
    count = 2000 if size < 10_000 else 200
    messages = _messages(size, count)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for message in messages:
            hold(message)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / count - size


@pytest.mark.parametrize("size", [9, 100, 300, 5000, 70_000])
def test_message_overhead_covers_what_a_gop_cache_keeps(size: int) -> None:
    """Re-measured with tracemalloc: a message held by a GOP cache (its MediaInfo, the
    prepared frame carrying its bytes, the cache's tuple and list slot) costs no more
    than its size plus MESSAGE_OVERHEAD_BYTES."""
    frame_factory = _relay_frame_factory()
    cache: GopCache[Any] = GopCache(10**12, lambda change: None, max_messages=10**9)
    cache.add(_messages(9, 1)[0].info(), None)
    key = parse_media(encode_media(FLAG_KEY, 1, b""))
    cache.add(key.info(), frame_factory(key.data, True))

    def hold(message: MediaMessage) -> None:
        cache.add(message.info(), frame_factory(message.data, True))

    overhead = _traced_overhead(size, hold)
    assert overhead <= MESSAGE_OVERHEAD_BYTES, f"{overhead:.0f} B per {size}-byte message"
    # A sanity check of the measurement itself: without the frame it would be far less.
    assert overhead > MESSAGE_OVERHEAD_BYTES / 3, "the measurement missed the frame"


@dataclass
class _PausedSink:
    """A viewer whose transport never takes anything: every message stays queued."""

    queue: ViewerQueue | None = None

    def write_frame(self, frame: Any) -> None:
        raise AssertionError("a paused queue wrote")

    def stalled(self) -> None:
        pass

    def attached(self, queue: ViewerQueue) -> None:
        self.queue = queue


@pytest.mark.parametrize("size", [9, 100, 300, 5000, 70_000])
def test_message_overhead_covers_what_a_viewer_queue_keeps(size: int) -> None:
    """Re-measured with tracemalloc: a message queued for a viewer, the queue alone
    holding its frame (no GOP cache), costs no more than its size plus
    MESSAGE_OVERHEAD_BYTES."""
    frame_factory = _relay_frame_factory()
    queue = ViewerQueue(
        _PausedSink(),
        Clock(),
        frame_factory,
        limit=10**12,
        stall_timeout=0,
        on_backlog_change=lambda change: None,
        on_dropped=lambda count: None,
        on_need_keyframe=lambda: None,
    )
    queue.pause_producing()
    key = parse_media(encode_media(FLAG_KEY, 1, b""))
    queue.send_media(key.info(), frame_factory(key.data, True))

    def hold(message: MediaMessage) -> None:
        queue.send_media(message.info(), frame_factory(message.data, True))

    overhead = _traced_overhead(size, hold)
    assert not queue.skipping
    assert overhead <= MESSAGE_OVERHEAD_BYTES, f"{overhead:.0f} B per {size}-byte message"
    # A sanity check of the measurement itself: without the frame it would be far less.
    assert overhead > MESSAGE_OVERHEAD_BYTES / 3, "the measurement missed the frame"
