"""What one peer may send: an inbound budget of frames and bytes, with no I/O.

Autobahn parses every frame of one ``dataReceived`` before it returns, so a peer that
sends tiny frames (empty pongs, empty continuation fragments) can make the relay spend
a core on it while its socket never looks busy.  Each connection therefore has two token
buckets, frames per second and bytes per second, each with a burst allowance; control
frames, empty frames and fragments all count, each frame with its header.  A peer over
either budget is closed with 1008 by its protocol.  Separately, :data:`FRAMES_PER_TURN`
caps the frames parsed from one read before the protocol yields the reactor, so that
even a peer within its budget cannot hold the reactor between two of its reads.

The rates are settings (:class:`~streamrelay.config.RelayConfig`); the bursts follow
from them and from what must always fit (:func:`limits_for`).  The defaults:

- viewers, 5 frames and 4 KiB a second (bursts: 32 frames, 4,544 bytes): a player sends
  a keyframe request now and then (at most one a second goes on to the publisher), a
  pong per relay ping (every 10 s), its client's own pings and a close;
- publishers, 2,000 frames and 16 MiB a second (bursts: 4,160 frames, 16 MiB): 120 fps
  with meta and pongs is 130 frames a second, and a client that cuts messages into 4 KiB
  fragments sends 1,500 a second at 48 Mbit/s (60 fps of 100 KB); 16 MiB a second is
  more than twice a high-quality 4K stream, and the byte burst holds a keyframe of
  ``--max-message-bytes`` (8 MiB) whole;
- ``/echo``, for the conformance suite only, has no budget.

Parsing one empty frame costs Autobahn and the relay about 4 µs, so a viewer's whole
burst costs about 0.1 ms and a publisher's about 20 ms, spread over turns of
:data:`FRAMES_PER_TURN` frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from streamrelay.config import RelayConfig
from streamrelay.roles import Role

# Frames parsed from one connection before the protocol yields the reactor (pauses
# reading and continues on the next turn).  Small enough that a turn of empty frames
# costs about a quarter of a millisecond, large enough that a publisher's normal traffic
# (a few frames per read) never yields.
FRAMES_PER_TURN = 64

# The longest frame header a client sends: 2 bytes, an 8-byte length, a 4-byte mask.
MAX_FRAME_HEADER_BYTES = 14

# Seconds of traffic at the full rate that a burst holds at least.
BURST_SECONDS = 1.0

# A publisher's frame burst holds a message in the most fragments allowed plus this many
# frames around it (pongs, meta, a few media messages).
PUBLISHER_FRAME_SLACK = 64

# A viewer's frame burst: a reconnecting player's keyframe request, a pong or two and a
# close, many times over, whatever its (tiny) rate.
VIEWER_FRAME_BURST = 32

# An edge relay pulling from ``/relay/`` speaks for many viewers: it may send up to four
# viewer counts a second besides its keyframe requests, pings and pongs, so it gets this
# many times a viewer's rates and bursts.
RELAY_RATE_FACTOR = 4

TOO_MANY_FRAMES = "too many frames"
TOO_MUCH_DATA = "too much data"


@dataclass(frozen=True)
class InboundLimits:
    """Rates and bursts of one role."""

    frames_per_second: float
    frame_burst: float
    bytes_per_second: float
    byte_burst: float


def frame_size(payload_length: int) -> int:
    """A masked client frame's size on the wire: its header and its payload."""
    if payload_length < 126:
        return payload_length + 6
    if payload_length < 65536:
        return payload_length + 8
    return payload_length + MAX_FRAME_HEADER_BYTES


def _byte_burst(rate: float, frame_burst: float, max_message_bytes: int) -> float:
    # The largest message the endpoint accepts always fits, with the headers of a
    # whole frame burst (so does a message split into as many fragments as allowed).
    largest = max_message_bytes + frame_burst * MAX_FRAME_HEADER_BYTES
    return max(rate * BURST_SECONDS, largest)


def limits_for(role: Role, config: RelayConfig, max_message_bytes: int) -> InboundLimits | None:
    """The inbound budget of ``role`` on an endpoint accepting messages of up to
    ``max_message_bytes``; None (unlimited) for the echo endpoint, which the conformance
    suite floods on purpose (65,536 fragments in one message)."""
    if role is Role.PUBLISHER:
        # Whichever is more: a second at the rate, or a message in the most fragments
        # allowed (and a few frames around it).  Not both: a burst is CPU spent at once,
        # and a legal publisher's bucket is nearly full at any time (the default rate is
        # over ten times what 120 fps needs).
        frame_burst = max(
            config.publisher_frames_per_second * BURST_SECONDS,
            float(config.max_fragments_per_message + PUBLISHER_FRAME_SLACK),
        )
        return InboundLimits(
            frames_per_second=config.publisher_frames_per_second,
            frame_burst=frame_burst,
            bytes_per_second=config.publisher_bytes_per_second,
            byte_burst=_byte_burst(
                config.publisher_bytes_per_second, frame_burst, max_message_bytes
            ),
        )
    if role is Role.VIEWER or role is Role.RELAY:
        # A viewer's burst is not widened for max_fragments_per_message: a viewer never
        # needs more than a few fragments, so for viewers the burst is the tighter cap.
        factor = RELAY_RATE_FACTOR if role is Role.RELAY else 1
        frame_burst = factor * max(
            float(VIEWER_FRAME_BURST), config.viewer_frames_per_second * BURST_SECONDS
        )
        bytes_per_second = factor * config.viewer_bytes_per_second
        return InboundLimits(
            frames_per_second=factor * config.viewer_frames_per_second,
            frame_burst=frame_burst,
            bytes_per_second=bytes_per_second,
            byte_burst=_byte_burst(bytes_per_second, frame_burst, max_message_bytes),
        )
    return None


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; starts full.  The caller reads the
    clock (once for both buckets of a budget)."""

    __slots__ = ("rate", "burst", "_tokens", "_updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._updated = now

    def take(self, amount: float, now: float) -> bool:
        """Take ``amount`` tokens at time ``now``; False (taking nothing) when there are
        not enough."""
        tokens = self._tokens + (now - self._updated) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self._updated = now
        if tokens < amount:
            self._tokens = tokens
            return False
        self._tokens = tokens - amount
        return True


class InboundBudget:
    """One connection's inbound budget.  :meth:`frame` is called for every frame the
    peer sends, so it reads the clock once and allocates nothing."""

    __slots__ = ("_clock", "_frames", "_bytes", "exceeded")

    def __init__(self, clock: IReactorTime, limits: InboundLimits) -> None:
        now = clock.seconds()
        self._clock = clock
        self._frames = TokenBucket(limits.frames_per_second, limits.frame_burst, now)
        self._bytes = TokenBucket(limits.bytes_per_second, limits.byte_burst, now)
        # Why the peer went over budget (it stays over budget for good), or None.
        self.exceeded: str | None = None

    def frame(self, size: int) -> str | None:
        """Charge one frame of ``size`` bytes on the wire; the reason once the peer is
        over either budget, else None."""
        if self.exceeded is None:
            now = self._clock.seconds()
            if not self._frames.take(1.0, now):
                self.exceeded = TOO_MANY_FRAMES
            elif not self._bytes.take(size, now):
                self.exceeded = TOO_MUCH_DATA
        return self.exceeded
