"""The publisher's outbox: what waits while the network is behind, and what is dropped.

Messages go straight to the connection while its transport accepts them. Once Twisted
pauses the transport (its write buffer is over its bound) they wait here, in order. From
the high-water mark on the outbox is *congested* (an encoder should drop raw frames rather
than encode them) until it drains to the low-water mark. A frame that would take it past
its limit is dropped, and so is every frame after it until the next KEY, so that what does
go out stays decodable; a keyframe is owed once the backlog has drained.

No I/O: the outbox writes through the function it is given, and the publisher relays
Twisted's pause and resume to it.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from twisted.logger import Logger

_log = Logger()


class Kind(enum.Enum):
    """What an outgoing message is, for the publisher's counters."""

    TEXT = "text"
    CONFIG = "config"
    KEY = "key"
    DELTA = "delta"
    AUDIO = "audio"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One WebSocket message on its way to the relay."""

    data: bytes
    kind: Kind

    @property
    def is_binary(self) -> bool:
        """Media messages are binary, ``meta`` is text."""
        return self.kind is not Kind.TEXT


class Verdict(enum.Enum):
    """What became of a frame offered to the outbox."""

    SENT = "sent"  # written, or queued behind earlier messages
    SKIPPED = "skipped"  # a delta before the first KEY of a connection: not a drop
    DROPPED = "dropped"  # the network is behind: dropped until the next KEY


class Outbox:
    """Messages waiting for a paused transport, and the drop-until-KEY rule (see above).

    One outbox serves one connection after another: :meth:`reset` starts it afresh for
    each, waiting for a KEY.
    """

    queued_bytes: int
    paused: bool  # the transport asked to hold back
    congested: bool  # from high water until drained to low water
    awaiting_key: bool  # frames wait for a KEY (a new connection, or after a drop)
    dropping_until_key: bool  # ... because frames were dropped: the rest count as drops
    keyframe_owed: bool  # frames were dropped: ask for a KEY once the backlog is gone

    def __init__(
        self, write: Callable[[Outgoing], None], *, high_water: int, low_water: int, limit: int
    ) -> None:
        if not 0 <= low_water <= high_water <= limit:
            raise ValueError("need 0 <= low_water <= high_water <= limit")
        self._write = write
        self._high_water = high_water
        self._low_water = low_water
        self._limit = limit
        self._queue: deque[Outgoing] = deque()
        self.reset()

    def reset(self) -> None:
        """Forget everything queued: a new connection starts empty, at a KEY."""
        self._queue.clear()
        self.queued_bytes = 0
        self.paused = False
        self.congested = False
        self.awaiting_key = True
        self.dropping_until_key = False
        self.keyframe_owed = False

    @property
    def backlogged(self) -> bool:
        """True while a new message would have to wait."""
        return self.paused or bool(self._queue)

    def put(self, message: Outgoing) -> None:
        """Write ``message`` now, or queue it behind what waits (``meta`` and CONFIG)."""
        if self.backlogged:
            self._queue.append(message)
            self.queued_bytes += len(message.data)
            self._update_congestion()
        else:
            self._write(message)

    def offer_frame(self, message: Outgoing) -> Verdict:
        """Send or queue a KEY or delta, unless it must wait for a KEY or go over the limit."""
        key = message.kind is Kind.KEY
        if self.awaiting_key and not key:
            return Verdict.DROPPED if self.dropping_until_key else Verdict.SKIPPED
        if self.backlogged and self.queued_bytes + len(message.data) > self._limit:
            if not self.dropping_until_key:
                _log.warn(
                    "network behind: dropping frames until the next keyframe "
                    "({queued} bytes queued)",
                    queued=self.queued_bytes,
                )
            self.awaiting_key = True
            self.dropping_until_key = True
            self.keyframe_owed = True
            return Verdict.DROPPED
        self.awaiting_key = False
        self.dropping_until_key = False
        self.put(message)
        return Verdict.SENT

    def offer_audio(self, message: Outgoing) -> bool:
        """Send or queue an audio packet unless it would go over the limit (then it is
        dropped alone: audio needs no KEY to resume); True when sent or queued."""
        if self.backlogged and self.queued_bytes + len(message.data) > self._limit:
            return False
        self.put(message)
        return True

    def pause(self) -> None:
        """The transport's buffer is full: hold messages back."""
        self.paused = True

    def resume(self) -> bool:
        """The transport has drained: write what waits; True when the keyframe owed for
        dropped frames should be asked for now (the backlog is gone)."""
        self.paused = False
        # Each write may pause the transport again, synchronously: check before each one.
        while self._queue and not self.paused:
            message = self._queue.popleft()
            self.queued_bytes -= len(message.data)
            self._write(message)
        self._update_congestion()
        return self.keyframe_owed and not self.backlogged

    def _update_congestion(self) -> None:
        if self.queued_bytes >= self._high_water:
            self.congested = True
        elif self.queued_bytes <= self._low_water:
            self.congested = False


__all__ = ["Kind", "Outbox", "Outgoing", "Verdict"]
