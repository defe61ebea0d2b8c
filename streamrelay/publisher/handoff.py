"""The bounded hand-over of frames from a producer thread to the reactor thread.

``reactor.callFromThread`` queues without bound. The handoff counts the frames that wait
for the reactor, and past its limit refuses them, and every delta after them until a KEY,
so that a stalled reactor costs dropped frames rather than memory, and the stream stays
decodable. The first refusal asks for a keyframe once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class FrameHandoff:
    """Admits at most ``limit`` frames into the reactor's queue at a time.

    :meth:`reserve` runs in the producer thread, :meth:`release` in the reactor thread,
    and :attr:`full` and :attr:`drops` may be read from any thread.
    """

    def __init__(self, limit: int, on_overflow: Callable[[], None]) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._on_overflow = on_overflow
        self._lock = threading.Lock()
        self._pending = 0
        # Touched by the producer thread only; drops is read elsewhere (an int: atomic).
        self._dropping = False
        self.drops = 0

    @property
    def full(self) -> bool:
        """True while one more frame would be refused."""
        return self._pending >= self.limit

    def reserve(self, key: bool) -> bool:
        """Take a place for one frame; False if it is dropped here instead."""
        if self._dropping and not key:
            self.drops += 1
            return False
        with self._lock:
            full = self._pending >= self.limit
            if not full:
                self._pending += 1
        if full:
            self.drops += 1
            if not self._dropping:
                self._dropping = True
                self._on_overflow()
            return False
        self._dropping = False
        return True

    def release(self) -> None:
        """A reserved frame has reached the reactor thread."""
        with self._lock:
            self._pending -= 1


__all__ = ["FrameHandoff"]
