"""The inbound budget: frames and bytes per second with bursts, on a fake clock, and the
limits each role gets from the settings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from streamrelay.config import MIB, RelayConfig
from streamrelay.inbound import (
    MAX_FRAME_HEADER_BYTES,
    PUBLISHER_FRAME_SLACK,
    TOO_MANY_FRAMES,
    TOO_MUCH_DATA,
    VIEWER_FRAME_BURST,
    InboundBudget,
    InboundLimits,
    TokenBucket,
    frame_size,
    limits_for,
)
from streamrelay.roles import Role
from streamrelay.wire import MAX_VIEWER_MESSAGE_BYTES


def test_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    """A full bucket gives its burst at once, then ``rate`` tokens a second, never
    more than its burst however long it rested."""
    bucket = TokenBucket(rate=10.0, burst=5.0, now=0.0)
    assert [bucket.take(1.0, 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(1.0, 0.1)
    assert not bucket.take(1.0, 0.1)
    assert [bucket.take(1.0, 100.0) for _ in range(6)] == [True] * 5 + [False]


def test_bucket_refuses_more_than_it_holds_without_spending() -> None:
    """A refused take leaves the tokens for a smaller one."""
    bucket = TokenBucket(rate=1.0, burst=10.0, now=0.0)
    assert not bucket.take(11.0, 0.0)
    assert bucket.take(10.0, 0.0)


def limits(frames: float, frame_burst: float, rate: float, byte_burst: float) -> InboundLimits:
    return InboundLimits(frames, frame_burst, rate, byte_burst)


def test_frames_over_budget_are_reported_and_stay_reported() -> None:
    """Past its frame burst and rate a peer is over budget for good, with a reason."""
    clock = Clock()
    budget = InboundBudget(clock, limits(2.0, 4.0, 1e9, 1e9))
    assert [budget.frame(6) for _ in range(4)] == [None] * 4
    assert budget.frame(6) == TOO_MANY_FRAMES
    clock.advance(60.0)
    assert budget.frame(6) == TOO_MANY_FRAMES
    assert budget.exceeded == TOO_MANY_FRAMES


def test_bytes_over_budget_are_reported() -> None:
    """A frame larger than what is left of the byte burst is over budget."""
    clock = Clock()
    budget = InboundBudget(clock, limits(1e9, 1e9, 1000.0, 4000.0))
    assert budget.frame(4000) is None
    assert budget.frame(1) == TOO_MUCH_DATA


def test_a_steady_peer_within_its_rate_never_exceeds() -> None:
    """Frames at the allowed rates, for a long time, stay within budget."""
    clock = Clock()
    budget = InboundBudget(clock, limits(10.0, 10.0, 1000.0, 1000.0))
    for _ in range(10_000):
        clock.advance(0.1)
        assert budget.frame(100) is None
    assert budget.exceeded is None


@given(
    rate=st.floats(min_value=1.0, max_value=10_000.0),
    burst=st.integers(min_value=1, max_value=1000),
    steps=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=200),
)
def test_a_bucket_admits_at_most_its_burst_plus_rate_times_time(
    rate: float, burst: int, steps: list[float]
) -> None:
    """However the takes are spread in time, a bucket admits at most its burst plus its
    rate times the time elapsed."""
    bucket = TokenBucket(rate, float(burst), now=0.0)
    now = 0.0
    admitted = 0
    for step in steps:
        now += step
        while bucket.take(1.0, now):
            admitted += 1
        assert admitted <= burst + rate * now + 1e-6


@given(
    rate=st.floats(min_value=0.5, max_value=5000.0),
    size=st.integers(min_value=0, max_value=10_000),
    slack=st.lists(st.floats(min_value=1.0, max_value=3.0), min_size=1, max_size=300),
)
def test_a_peer_within_its_rates_is_never_refused(
    rate: float, size: int, slack: list[float]
) -> None:
    """A peer that never sends faster than its rates, however irregularly, stays within
    its budget (whose bursts hold one frame, with half a frame to spare for rounding)."""
    clock = Clock()
    budget = InboundBudget(clock, limits(rate, 1.5, rate * size, 1.5 * size))
    for factor in slack:
        assert budget.frame(size) is None
        clock.advance(factor / rate)


@pytest.mark.parametrize(
    ("length", "size"),
    [(0, 6), (125, 131), (126, 134), (65535, 65543), (65536, 65536 + MAX_FRAME_HEADER_BYTES)],
)
def test_frame_size_counts_the_masked_header(length: int, size: int) -> None:
    """A frame is charged its header (length field and mask) as well as its payload."""
    assert frame_size(length) == size


def test_viewers_get_almost_nothing() -> None:
    """A viewer's budget: a small frame burst at the default rate, and a byte burst
    that holds its largest message (and the headers of its frame burst)."""
    config = RelayConfig()
    viewer = limits_for(Role.VIEWER, config, MAX_VIEWER_MESSAGE_BYTES)
    assert viewer is not None
    assert viewer.frames_per_second == config.viewer_frames_per_second <= 10
    assert viewer.frame_burst == VIEWER_FRAME_BURST
    assert viewer.bytes_per_second == config.viewer_bytes_per_second
    assert viewer.byte_burst >= MAX_VIEWER_MESSAGE_BYTES + VIEWER_FRAME_BURST * 14
    assert viewer.byte_burst < 16 * 1024


def test_publishers_get_their_media_rate_and_a_whole_message() -> None:
    """A publisher's budget holds a second of video at 120 fps many times over, a
    ``max_message_bytes`` keyframe in one burst, and a message split into
    ``max_fragments_per_message`` fragments on top of a second's frames."""
    config = RelayConfig()
    publisher = limits_for(Role.PUBLISHER, config, config.max_message_bytes)
    assert publisher is not None
    assert publisher.frames_per_second >= 8 * 120
    assert publisher.frame_burst >= config.max_fragments_per_message + 60
    assert publisher.bytes_per_second >= 2 * 60 * 100_000  # 60 fps of 100 KB, twice over
    assert publisher.byte_burst >= frame_size(config.max_message_bytes)
    fragmented = config.max_message_bytes + config.max_fragments_per_message * 14
    assert publisher.byte_burst >= fragmented


def test_the_bursts_follow_the_settings() -> None:
    """Lower rates shrink the bursts, but never below what a legal message needs."""
    config = RelayConfig(
        publisher_frames_per_second=10.0,
        publisher_bytes_per_second=1000,
        max_fragments_per_message=16,
        max_message_bytes=MIB,
    )
    publisher = limits_for(Role.PUBLISHER, config, config.max_message_bytes)
    burst = 16 + PUBLISHER_FRAME_SLACK
    assert publisher == InboundLimits(10.0, burst, 1000, MIB + burst * MAX_FRAME_HEADER_BYTES)
    busy = RelayConfig(publisher_frames_per_second=50_000.0)
    busy_publisher = limits_for(Role.PUBLISHER, busy, MIB)
    assert busy_publisher is not None and busy_publisher.frame_burst == 50_000.0
    fast = RelayConfig(viewer_frames_per_second=100.0, viewer_bytes_per_second=100_000)
    viewer = limits_for(Role.VIEWER, fast, MAX_VIEWER_MESSAGE_BYTES)
    assert viewer == InboundLimits(100.0, 100.0, 100_000, 100_000)


def test_the_echo_endpoint_is_unlimited() -> None:
    """/echo has no budget: the conformance suite floods it on purpose."""
    assert limits_for(Role.ECHO, RelayConfig(), 8 * MIB) is None
