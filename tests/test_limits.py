"""Admission limits with no I/O: connection caps and the handshake rate."""

from __future__ import annotations

from twisted.internet.task import Clock

from streamrelay.limits import (
    ConnectionLimiter,
    ConnectionSlot,
    HandshakeRateLimiter,
    Refusal,
    WaitingStreams,
)

# -- ConnectionLimiter -----------------------------------------------------------------


def test_global_cap_refuses_with_503_and_retry_after() -> None:
    """Over --max-connections every address gets 503 with Retry-After."""
    limiter = ConnectionLimiter(max_connections=3, max_per_address=10)
    slots = [limiter.acquire(f"10.0.0.{index}") for index in range(3)]
    assert all(isinstance(slot, ConnectionSlot) for slot in slots)
    refused = limiter.acquire("10.0.0.99")
    assert isinstance(refused, Refusal)
    assert refused.status == 503
    assert refused.retry_after is not None and refused.retry_after > 0
    assert limiter.refused == 1
    assert limiter.total == 3


def test_per_address_cap_leaves_other_addresses_alone() -> None:
    """Over --max-connections-per-ip one address is refused, others still get in."""
    limiter = ConnectionLimiter(max_connections=100, max_per_address=2)
    assert isinstance(limiter.acquire("10.0.0.1"), ConnectionSlot)
    assert isinstance(limiter.acquire("10.0.0.1"), ConnectionSlot)
    refused = limiter.acquire("10.0.0.1")
    assert isinstance(refused, Refusal) and refused.status == 503
    assert refused.retry_after is not None
    assert isinstance(limiter.acquire("10.0.0.2"), ConnectionSlot)
    assert limiter.count_for("10.0.0.1") == 2
    assert limiter.count_for("10.0.0.2") == 1


def test_refusal_takes_no_slot() -> None:
    """A refused connection is not counted: releasing the others returns to zero."""
    limiter = ConnectionLimiter(max_connections=1, max_per_address=1)
    slot = limiter.acquire("a")
    assert isinstance(slot, ConnectionSlot)
    for _ in range(5):
        assert isinstance(limiter.acquire("a"), Refusal)
        assert isinstance(limiter.acquire("b"), Refusal)
    slot.release()
    assert limiter.total == 0
    assert isinstance(limiter.acquire("b"), ConnectionSlot)


def test_release_is_idempotent() -> None:
    """Releasing a slot twice gives back one connection, not two."""
    limiter = ConnectionLimiter(max_connections=10, max_per_address=10)
    first = limiter.acquire("a")
    second = limiter.acquire("a")
    assert isinstance(first, ConnectionSlot) and isinstance(second, ConnectionSlot)
    first.release()
    first.release()
    assert limiter.total == 1
    assert limiter.count_for("a") == 1


def test_returns_to_idle_with_no_address_tracked() -> None:
    """After every connection is released nothing is remembered about any address."""
    limiter = ConnectionLimiter(max_connections=1000, max_per_address=5)
    slots = []
    for index in range(200):
        slot = limiter.acquire(f"192.0.2.{index % 50}")
        if isinstance(slot, ConnectionSlot):
            slots.append(slot)
    assert limiter.tracked_addresses == 50
    for slot in slots:
        slot.release()
    assert limiter.total == 0
    assert limiter.tracked_addresses == 0
    assert limiter.count_for("192.0.2.1") == 0


# -- HandshakeRateLimiter --------------------------------------------------------------


def test_burst_then_refusal_with_retry_after() -> None:
    """An address may open ``burst`` handshakes at once, then gets 503 + Retry-After."""
    clock = Clock()
    limiter = HandshakeRateLimiter(clock, rate=50, burst=100)
    for _ in range(100):
        assert limiter.allow("10.0.0.1") is None
    refused = limiter.allow("10.0.0.1")
    assert isinstance(refused, Refusal)
    assert refused.status == 503
    assert refused.retry_after == 1
    assert limiter.refused == 1
    # Another address has its own bucket.
    assert limiter.allow("10.0.0.2") is None


def test_retry_after_reflects_the_refill_time() -> None:
    """With a slow rate, Retry-After says how long until one handshake is allowed."""
    clock = Clock()
    limiter = HandshakeRateLimiter(clock, rate=0.25, burst=1)
    assert limiter.allow("a") is None
    refused = limiter.allow("a")
    assert isinstance(refused, Refusal)
    assert refused.retry_after == 4
    clock.advance(3.9)
    assert isinstance(limiter.allow("a"), Refusal)
    clock.advance(0.2)
    assert limiter.allow("a") is None


def test_bucket_refills_over_time() -> None:
    """Tokens come back at ``rate`` per second, up to the burst."""
    clock = Clock()
    limiter = HandshakeRateLimiter(clock, rate=10, burst=20)
    for _ in range(20):
        assert limiter.allow("a") is None
    assert limiter.allow("a") is not None
    clock.advance(0.5)  # five tokens
    allowed = sum(limiter.allow("a") is None for _ in range(10))
    assert allowed == 5
    clock.advance(100)  # full again, not more than the burst
    allowed = sum(limiter.allow("a") is None for _ in range(30))
    assert allowed == 20


def test_refused_attempts_do_not_extend_the_wait() -> None:
    """Hammering while refused does not push the refill further away."""
    clock = Clock()
    limiter = HandshakeRateLimiter(clock, rate=1, burst=1)
    assert limiter.allow("a") is None
    for _ in range(10):
        clock.advance(0.05)
        assert limiter.allow("a") is not None
    clock.advance(0.5)  # 1.0 s since the accepted handshake
    assert limiter.allow("a") is None


def test_sweep_forgets_refilled_buckets_only() -> None:
    """The periodic sweep forgets addresses whose bucket is full again, so the limiter
    returns to idle, but keeps those still being limited."""
    clock = Clock()
    limiter = HandshakeRateLimiter(clock, rate=10, burst=20)
    for _ in range(25):
        limiter.allow("busy")
    limiter.allow("quiet")
    assert limiter.tracked_addresses == 2
    limiter.sweep()
    assert limiter.tracked_addresses == 2
    clock.advance(1.0)
    limiter.allow("busy")  # still active
    clock.advance(1.0)  # quiet: 2 s since its last handshake, full after 2 s
    limiter.sweep()
    assert limiter.tracked_addresses == 1
    clock.advance(2.0)
    limiter.sweep()
    assert limiter.tracked_addresses == 0
    # Forgotten means a fresh, full bucket.
    for _ in range(20):
        assert limiter.allow("busy") is None


def test_sweep_never_forgets_a_bucket_that_is_not_full() -> None:
    """Forgetting a partly empty bucket would hand out a free burst."""
    clock = Clock()
    limiter = HandshakeRateLimiter(clock, rate=1, burst=10)
    for _ in range(10):
        limiter.allow("a")
    clock.advance(9.0)
    limiter.sweep()
    assert limiter.tracked_addresses == 1
    allowed = sum(limiter.allow("a") is None for _ in range(20))
    assert allowed == 9


def test_zero_rate_disables_the_limit() -> None:
    """A rate of 0 turns the handshake limit off and tracks nothing."""
    clock = Clock()
    limiter = HandshakeRateLimiter(clock, rate=0, burst=0)
    for _ in range(1000):
        assert limiter.allow("a") is None
    limiter.sweep()
    assert limiter.tracked_addresses == 0


# -- WaitingStreams ----------------------------------------------------------------------


def test_waiting_names_are_bounded_in_total() -> None:
    """New waiting names are refused (503 + Retry-After) at the total; names that already
    wait are not, whoever joins them."""
    waiting = WaitingStreams(max_total=2, max_per_address=10)
    for name in ("a", "b"):
        assert waiting.check(name, "10.0.0.1") is None
        waiting.add(name)
        waiting.hold(name, "10.0.0.1")
    refusal = waiting.check("c", "10.0.0.2")
    assert isinstance(refusal, Refusal)
    assert refusal.status == 503 and refusal.retry_after
    assert refusal.reason == "too many streams waiting for a publisher"
    assert waiting.check("a", "10.0.0.2") is None
    assert waiting.check("c", None) is not None
    assert waiting.refused == 2


def test_waiting_names_are_bounded_per_address() -> None:
    """An address holds at most ``max_per_address`` waiting names; more viewers on the
    names it holds are free, and other addresses are unaffected."""
    waiting = WaitingStreams(max_total=100, max_per_address=2)
    for name in ("a", "b"):
        waiting.add(name)
        waiting.hold(name, "10.0.0.1")
    assert waiting.held_by("10.0.0.1") == 2
    refusal = waiting.check("c", "10.0.0.1")
    assert isinstance(refusal, Refusal) and refusal.status == 503
    assert refusal.reason == "too many waiting streams from this address"
    waiting.add("c")
    waiting.hold("c", "10.0.0.2")
    assert waiting.check("c", "10.0.0.1") is not None  # would be a third name
    assert waiting.check("a", "10.0.0.1") is None
    waiting.hold("a", "10.0.0.1")
    assert waiting.held_by("10.0.0.1") == 2
    assert waiting.check("d", "10.0.0.3") is None
    assert waiting.check("d", None) is None  # no address: only the total applies


def test_waiting_releases_and_forgets_return_to_idle() -> None:
    """Every hold is released once; a name that stops waiting (published or gone) frees
    every address that held it; afterwards nothing is tracked."""
    waiting = WaitingStreams(max_total=10, max_per_address=1)
    waiting.add("a")
    waiting.hold("a", "10.0.0.1")
    waiting.hold("a", "10.0.0.1")
    waiting.hold("a", "10.0.0.2")
    waiting.hold("a", None)
    waiting.release("a", "10.0.0.1")
    assert waiting.check("b", "10.0.0.1") is not None  # still holds "a"
    waiting.release("a", "10.0.0.1")
    assert waiting.check("b", "10.0.0.1") is None
    waiting.forget("a")  # a publisher came: 10.0.0.2 holds nothing any more
    assert not waiting.is_waiting("a")
    assert waiting.check("b", "10.0.0.2") is None
    waiting.release("a", "10.0.0.2")  # the viewer leaves later: nothing to do
    waiting.release("a", None)
    waiting.forget("a")
    assert waiting.total == 0 and waiting.tracked_addresses == 0


