"""Counting over time, for the streams' reports and signals: :class:`RateWindow` (bytes and
frames over the last seconds) and :class:`Throttle` (an action at most once per interval,
never lost).  Network-free; the clock is injected."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

RATE_WINDOW_SECONDS = 5.0


class Throttle:
    """Runs ``action`` at most once per ``interval``; a need inside the interval runs at
    its end, never lost."""

    def __init__(self, clock: IReactorTime, interval: float, action: Callable[[], None]) -> None:
        self._clock = clock
        self.interval = interval
        self._action = action
        self._last_run: float | None = None
        self._pending: IDelayedCall | None = None

    def request(self) -> None:
        """Run now if the interval allows it, else once the interval ends."""
        if self._pending is not None:
            return
        now = self._clock.seconds()
        if self._last_run is None or now - self._last_run >= self.interval:
            self._run()
        else:
            delay = self._last_run + self.interval - now
            self._pending = self._clock.callLater(delay, self._run)

    def _run(self) -> None:
        self._pending = None
        self._last_run = self._clock.seconds()
        self._action()

    def reset(self) -> None:
        """Forget history and any pending run."""
        self.cancel()
        self._last_run = None

    def cancel(self) -> None:
        """Drop a pending run."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None


class RateWindow:
    """Bytes and frames over the last few seconds, in fixed buckets (bounded memory)."""

    def __init__(self, clock: IReactorTime, span: float = RATE_WINDOW_SECONDS, buckets: int = 10):
        self._clock = clock
        self._span = span
        self._bucket_width = span / buckets
        self._slots = buckets
        self._buckets: dict[int, list[int]] = {}
        self._started = clock.seconds()

    def add(self, size: int, frames: int) -> None:
        """Count one message of ``size`` bytes carrying ``frames`` frames."""
        index = int(self._clock.seconds() / self._bucket_width)
        bucket = self._buckets.get(index)
        if bucket is None:
            self._prune(index)
            bucket = self._buckets[index] = [0, 0]
        bucket[0] += size
        bucket[1] += frames

    def _prune(self, current: int) -> None:
        first_kept = current - self._slots + 1
        for index in [i for i in self._buckets if i < first_kept]:
            del self._buckets[index]

    def rates(self) -> tuple[int, float]:
        """``(bits per second, frames per second)`` over the window."""
        now = self._clock.seconds()
        current = int(now / self._bucket_width)
        self._prune(current)
        # The window is the last N bucket slots, the current partial one included, so it
        # covers a little less than the span: divide by what it really covers.
        window_start = (current - self._slots + 1) * self._bucket_width
        elapsed = max(now - max(self._started, window_start), self._bucket_width)
        total_bytes = sum(bucket[0] for bucket in self._buckets.values())
        total_frames = sum(bucket[1] for bucket in self._buckets.values())
        return int(total_bytes * 8 / elapsed), round(total_frames / elapsed, 2)
