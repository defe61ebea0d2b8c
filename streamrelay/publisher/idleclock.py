"""The time an on-demand publisher spent idle, shared by its video and audio threads.

A file's picture and sound are paced from the same start; while the publisher is idle
both stop, and both resume where they paused. Were each thread to time its own pause,
the two pauses would differ by the time each took to notice the change (a frame, an
audio block, a late wake-up on a loaded machine), and lip sync would wander with every
idle period. Both read one :class:`IdleClock` instead: the first thread to notice the
idle state starts the pause, the first to notice its end closes it, and both shift their
playback by the same total.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class IdleClock:
    """Seconds spent paused, from any number of threads (see the module docstring)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._paused_since: float | None = None
        self._total = 0.0

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused_since is not None

    def pause(self) -> None:
        """Start a pause (nothing if one is running already). Any thread."""
        with self._lock:
            if self._paused_since is None:
                self._paused_since = self._monotonic()

    def resume(self) -> None:
        """End the running pause (nothing if none runs). Any thread."""
        with self._lock:
            if self._paused_since is not None:
                self._total += self._monotonic() - self._paused_since
                self._paused_since = None

    def paused_seconds(self) -> float:
        """The length of the pauses that have ended: the running one counts once over,
        so that a thread that has not noticed it yet keeps its pace until then."""
        with self._lock:
            return self._total


__all__ = ["IdleClock"]
