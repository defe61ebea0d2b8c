"""What one peer may send: an inbound budget of frames and bytes, with no I/O.

Autobahn parses every frame of one ``dataReceived`` before it returns, so a peer that
sends tiny frames (empty pongs, empty continuation fragments) can make the relay spend
a core on it while its socket never looks busy.  Each connection therefore has two token
buckets, frames per second and bytes per second, each with a burst allowance; control
frames, empty frames and fragments all count.  A peer over either budget is closed with
1008 by its protocol.  Separately, :data:`FRAMES_PER_TURN` caps the frames parsed in
one reactor turn, so that even a peer within its budget yields the reactor between
bursts.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

# Frames parsed from one connection before the protocol yields the reactor (pauses
# reading and continues on the next turn).  Small enough that a burst of empty frames
# costs well under a millisecond, large enough that a publisher's normal traffic (a few
# frames per read) never yields.
FRAMES_PER_TURN = 64


@dataclass(frozen=True)
class InboundLimits:
    """Rates and bursts of one role; ``None`` rates mean unlimited (the echo endpoint)."""

    frames_per_second: float | None
    frame_burst: float
    bytes_per_second: float | None
    byte_burst: float


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; starts full."""

    __slots__ = ("_clock", "rate", "burst", "_tokens", "_updated")

    def __init__(self, clock: IReactorTime, rate: float, burst: float) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._updated = clock.seconds()

    def take(self, amount: float) -> bool:
        """Take ``amount`` tokens; False (taking nothing) when there are not enough."""
        now = self._clock.seconds()
        tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if tokens < amount:
            self._tokens = tokens
            return False
        self._tokens = tokens - amount
        return True


class InboundBudget:
    """One connection's inbound budget; :meth:`frame` and :meth:`data` say whether the
    peer is still within it."""

    __slots__ = ("_frames", "_bytes", "exceeded")

    def __init__(self, clock: IReactorTime, limits: InboundLimits) -> None:
        self._frames = (
            TokenBucket(clock, limits.frames_per_second, limits.frame_burst)
            if limits.frames_per_second is not None
            else None
        )
        self._bytes = (
            TokenBucket(clock, limits.bytes_per_second, limits.byte_burst)
            if limits.bytes_per_second is not None
            else None
        )
        self.exceeded: str | None = None

    def frame(self) -> bool:
        """Charge one frame (of any kind); False once the frame budget is spent."""
        if self._frames is not None and not self._frames.take(1.0):
            self.exceeded = self.exceeded or "too many frames"
        return self.exceeded is None

    def data(self, size: int) -> bool:
        """Charge ``size`` bytes read from the peer; False once the byte budget is spent."""
        if self._bytes is not None and not self._bytes.take(float(size)):
            self.exceeded = self.exceeded or "too much data"
        return self.exceeded is None
