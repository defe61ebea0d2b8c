"""The publisher's outbox and its thread handoff, with no network and no reactor."""

from __future__ import annotations

import threading

import pytest

from streamrelay.publisher.handoff import FrameHandoff
from streamrelay.publisher.outbox import Kind, Outbox, Outgoing, Verdict


class Wire:
    """The outbox's write function: records what went out, and can pause the outbox
    from inside a write, as a transport whose buffer fills up does."""

    def __init__(self) -> None:
        self.sent: list[Outgoing] = []
        self.pause_after: int | None = None
        self.outbox: Outbox | None = None

    def write(self, message: Outgoing) -> None:
        self.sent.append(message)
        if self.pause_after is not None and len(self.sent) >= self.pause_after:
            assert self.outbox is not None
            self.outbox.pause()

    def take(self) -> list[bytes]:
        sent, self.sent = self.sent, []
        return [message.data for message in sent]


def make_outbox(high: int = 1000, low: int = 250, limit: int = 3000) -> tuple[Outbox, Wire]:
    wire = Wire()
    outbox = Outbox(wire.write, high_water=high, low_water=low, limit=limit)
    wire.outbox = outbox
    return outbox, wire


def key(data: bytes) -> Outgoing:
    return Outgoing(data, Kind.KEY)


def delta(data: bytes) -> Outgoing:
    return Outgoing(data, Kind.DELTA)


def test_writes_straight_through_from_the_first_key_on() -> None:
    """Unpaused, text and CONFIG go out at once; frames go out from the first KEY on, the
    deltas before it being skipped (not counted as drops)."""
    outbox, wire = make_outbox()
    outbox.put(Outgoing(b"meta", Kind.TEXT))
    outbox.put(Outgoing(b"config", Kind.CONFIG))
    assert outbox.offer_frame(delta(b"early")) is Verdict.SKIPPED
    assert outbox.offer_frame(key(b"K")) is Verdict.SENT
    assert outbox.offer_frame(delta(b"d")) is Verdict.SENT
    assert wire.take() == [b"meta", b"config", b"K", b"d"]
    assert [Outgoing(b"m", kind).is_binary for kind in Kind] == [False, True, True, True, True]


def test_paused_messages_queue_in_order_with_congestion_hysteresis() -> None:
    """While paused nothing is written; from the high-water mark the outbox is congested,
    and it stays so until it drains to the low-water mark; resume writes in order."""
    outbox, wire = make_outbox(high=1000, low=250, limit=5000)
    outbox.offer_frame(key(b"K"))
    wire.take()
    outbox.pause()
    for index in range(4):
        assert outbox.offer_frame(delta(bytes([index]) * 300)) is Verdict.SENT
        assert outbox.congested is (index == 3)
    assert wire.take() == [] and outbox.queued_bytes == 1200
    wire.pause_after = 2  # the transport fills up again after two writes
    assert outbox.resume() is False
    assert [data[0] for data in wire.take()] == [0, 1]
    assert outbox.queued_bytes == 600 and outbox.congested  # above low water: still
    wire.pause_after = None
    outbox.resume()
    assert [data[0] for data in wire.take()] == [2, 3]
    assert outbox.queued_bytes == 0 and not outbox.congested and not outbox.backlogged


def test_a_frame_over_the_limit_drops_until_the_next_key_and_owes_one() -> None:
    """A frame that would take the backlog past the limit is dropped, and so is every
    delta after it; the KEY that resumes goes behind the backlog; once drained, resume
    says a keyframe is owed."""
    outbox, wire = make_outbox(high=1000, low=250, limit=1000)
    outbox.offer_frame(key(b"K"))
    wire.take()
    outbox.pause()
    assert outbox.offer_frame(delta(b"a" * 600)) is Verdict.SENT
    assert outbox.offer_frame(delta(b"b" * 600)) is Verdict.DROPPED
    assert outbox.offer_frame(delta(b"c")) is Verdict.DROPPED
    assert outbox.keyframe_owed
    assert outbox.offer_frame(key(b"K2")) is Verdict.SENT
    assert outbox.offer_frame(delta(b"d")) is Verdict.SENT
    assert outbox.resume() is True
    assert wire.take() == [b"a" * 600, b"K2", b"d"]


def test_reset_starts_a_new_connection_empty_and_at_a_key() -> None:
    """reset forgets the backlog, the pause, the congestion and the drop state: the next
    delta is skipped (a new connection waits for a KEY), not dropped."""
    outbox, wire = make_outbox(high=100, low=25, limit=200)
    outbox.offer_frame(key(b"K"))
    outbox.pause()
    outbox.offer_frame(delta(b"x" * 150))
    outbox.offer_frame(delta(b"y" * 100))
    assert outbox.congested and outbox.dropping_until_key and outbox.keyframe_owed
    outbox.reset()
    assert (outbox.queued_bytes, outbox.paused, outbox.congested) == (0, False, False)
    assert not outbox.keyframe_owed
    assert outbox.offer_frame(delta(b"d")) is Verdict.SKIPPED
    assert outbox.resume() is False
    assert wire.take() == [b"K"]


def test_water_marks_are_checked() -> None:
    """The marks must be ordered: low <= high <= limit."""
    for high, low, limit in ((100, 200, 300), (300, 100, 200), (100, -1, 200)):
        with pytest.raises(ValueError):
            Outbox(Wire().write, high_water=high, low_water=low, limit=limit)


def test_handoff_admits_up_to_its_limit_then_drops_until_a_key() -> None:
    """At most ``limit`` frames are in flight; past that frames are dropped (counted),
    the overflow asks for a keyframe once, deltas stay dropped until a KEY, and a
    released place admits again."""
    overflows: list[int] = []
    handoff = FrameHandoff(2, on_overflow=lambda: overflows.append(1))
    assert [handoff.reserve(True), handoff.reserve(False)] == [True, True]
    assert handoff.full
    assert handoff.reserve(False) is False
    assert handoff.reserve(True) is False
    assert overflows == [1] and handoff.drops == 2
    handoff.release()
    assert not handoff.full
    assert handoff.reserve(False) is False  # still waiting for a KEY
    assert handoff.reserve(True) is True
    handoff.release()
    assert handoff.reserve(False) is True
    assert handoff.drops == 3 and overflows == [1]
    with pytest.raises(ValueError):
        FrameHandoff(0, on_overflow=lambda: None)


def test_handoff_never_admits_more_than_its_limit_across_threads() -> None:
    """Producers racing each other never get more places than the limit."""
    handoff = FrameHandoff(5, on_overflow=lambda: None)
    admitted: list[bool] = []
    lock = threading.Lock()

    def produce() -> None:
        for _ in range(200):
            result = handoff.reserve(True)
            with lock:
                admitted.append(result)

    threads = [threading.Thread(target=produce) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert admitted.count(True) == 5
    assert handoff.drops == 800 - 5
