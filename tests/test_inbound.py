"""The inbound budget: frames and bytes per second with bursts, on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from streamrelay.inbound import InboundBudget, InboundLimits, TokenBucket


def test_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    """A full bucket gives its burst at once, then ``rate`` tokens a second."""
    clock = Clock()
    bucket = TokenBucket(clock, rate=10.0, burst=5.0)
    assert [bucket.take(1.0) for _ in range(6)] == [True] * 5 + [False]
    clock.advance(0.1)
    assert bucket.take(1.0)
    assert not bucket.take(1.0)
    clock.advance(100.0)
    assert [bucket.take(1.0) for _ in range(6)] == [True] * 5 + [False]


def test_bucket_refuses_more_than_it_holds_without_spending() -> None:
    """A refused take leaves the tokens for a smaller one."""
    clock = Clock()
    bucket = TokenBucket(clock, rate=1.0, burst=10.0)
    assert not bucket.take(11.0)
    assert bucket.take(10.0)


def test_frames_over_budget_are_reported_and_stay_reported() -> None:
    """Past its frame burst and rate a peer is over budget for good, with a reason."""
    clock = Clock()
    budget = InboundBudget(clock, InboundLimits(2.0, 4.0, None, 0.0))
    assert all(budget.frame() for _ in range(4))
    assert not budget.frame()
    assert budget.exceeded == "too many frames"
    clock.advance(60.0)
    assert not budget.frame()
    assert not budget.data(1)


def test_a_steady_peer_within_its_rate_never_exceeds() -> None:
    """Frames at the allowed rate, for a long time, stay within budget."""
    clock = Clock()
    budget = InboundBudget(clock, InboundLimits(10.0, 10.0, 1000.0, 1000.0))
    for _ in range(10_000):
        clock.advance(0.1)
        assert budget.frame()
        assert budget.data(100)
    assert budget.exceeded is None


def test_bytes_over_budget_are_reported() -> None:
    """A read larger than the byte burst is over budget."""
    clock = Clock()
    budget = InboundBudget(clock, InboundLimits(None, 0.0, 1000.0, 4000.0))
    assert budget.data(4000)
    assert not budget.data(1)
    assert budget.exceeded == "too much data"


def test_unlimited_budget_never_exceeds() -> None:
    """``None`` rates (the echo endpoint) admit anything."""
    budget = InboundBudget(Clock(), InboundLimits(None, 0.0, None, 0.0))
    assert all(budget.frame() and budget.data(1 << 20) for _ in range(100_000))
