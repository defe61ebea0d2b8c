"""One timer for every connection's handshake deadline.

Every connection must deliver its request head within ``--handshake-timeout`` of the
accept (or of the end of its previous request).  A ``callLater`` per connection costs an
object, a heap insertion and a cancellation on every handshake -- a measurable share of a
handshake storm.  All these deadlines have the same length and are armed as time goes
on, so they expire in the order they were armed: :class:`Deadlines` keeps them in an
insertion-ordered dict (arm and disarm are O(1)) under one delayed call, set for the
earliest, which runs every expired callback when it fires and then sets itself for the
next.  It holds no timer while nothing is armed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

_log = Logger()


class Deadlines:
    """Deadlines of one fixed ``length`` on ``clock``: :meth:`arm` a key with the
    callback to run when its deadline passes, :meth:`disarm` it once met."""

    def __init__(self, clock: IReactorTime, length: float) -> None:
        self._clock = clock
        self.length = length
        # key -> (when, callback), in arming order, so in deadline order.
        self._pending: dict[Hashable, tuple[float, Callable[[], object]]] = {}
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        """Deadlines armed and not yet passed or disarmed."""
        return len(self._pending)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._pending

    def arm(self, key: Hashable, callback: Callable[[], object]) -> None:
        """Run ``callback`` ``length`` seconds from now unless ``key`` is disarmed
        first; a key already armed keeps its earlier deadline."""
        if key in self._pending:
            return
        self._pending[key] = (self._clock.seconds() + self.length, callback)
        if self._call is None:
            self._call = self._clock.callLater(self.length, self._fire)

    def disarm(self, key: Hashable) -> None:
        """Forget ``key``'s deadline (nothing happens if it has none)."""
        if self._pending.pop(key, None) is not None and not self._pending:
            call, self._call = self._call, None
            if call is not None and call.active():
                call.cancel()

    def _fire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        pending = self._pending
        while pending:
            key = next(iter(pending))
            when, callback = pending[key]
            if when > now:
                break
            del pending[key]
            try:
                callback()
            except Exception:
                # One failing callback must not leave the others' deadlines unrun.
                _log.failure("Error in a deadline callback")
        if pending and self._call is None:
            when = pending[next(iter(pending))][0]
            self._call = self._clock.callLater(max(0.0, when - now), self._fire)
