"""Publishing on demand: when to stop capturing and encoding, and when to start again.

:class:`OnDemand` is fed the audience the relay reports (``{"type": "viewers"}``, the
whole audience, edges' viewers included; None while the count is unknown, i.e. no
connection) and decides between two states:

- ``ACTIVE``: capture, encode and send, as a publisher without ``--on-demand`` does;
- ``IDLE``: nobody has watched for ``grace`` seconds: the source is paused or closed, the
  encoder does nothing, and only WebSocket pings and the state message go out.

It starts ACTIVE (so the relay learns the stream's meta and CONFIG, and a broken source
shows at once), goes IDLE once the audience has been zero or unknown for a whole grace
period, and goes ACTIVE again at once on the first report of a viewer. The unit knows
nothing of connections or threads: it is given a clock and a callback, and a caller that
publishes several connections (renditions) feeds it their summed count.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: The default of ``--on-demand-grace``: long enough to ride out a viewer's page reload.
DEFAULT_GRACE_SECONDS = 10.0


class Activity(enum.Enum):
    """Whether an on-demand publisher captures and encodes now (the wire word is the value)."""

    ACTIVE = "active"
    IDLE = "idle"


class OnDemand:
    """The idle/active decision of an on-demand publisher (see the module docstring).

    ``on_change(activity)`` is called on every change, from the caller's thread (the
    reactor's, where the clock's calls run).
    """

    def __init__(
        self,
        clock: IReactorTime,
        grace: float = DEFAULT_GRACE_SECONDS,
        on_change: Callable[[Activity], None] | None = None,
    ) -> None:
        if grace < 0:
            raise ValueError("grace must be 0 seconds or more")
        self._clock = clock
        self.grace = grace
        self.on_change = on_change
        self.activity = Activity.ACTIVE
        self.audience: int | None = None
        self._timer: IDelayedCall | None = None
        self._running = False
        # Times spent in each state, for reports: seconds idle so far, and since when.
        self.idle_seconds = 0.0
        self.idle_periods = 0
        self._idle_since: float | None = None

    @property
    def idle(self) -> bool:
        """True while capture and encoding should be off."""
        return self.activity is Activity.IDLE

    def start(self) -> None:
        """Begin deciding: with nobody reported watching, idle after the grace period."""
        self._running = True
        self._arm_or_cancel()

    def stop(self) -> None:
        """Stop deciding (the publisher stops): cancel the pending idle."""
        self._running = False
        self._cancel()

    def update(self, audience: int | None) -> None:
        """The relay reported ``audience`` viewers (None: unknown, the connection is gone)."""
        self.audience = audience
        if audience and self.activity is Activity.IDLE:
            self._set(Activity.ACTIVE)
        self._arm_or_cancel()

    def total_idle_seconds(self) -> float:
        """Seconds spent idle so far, the current idle period included."""
        current = 0.0 if self._idle_since is None else self._clock.seconds() - self._idle_since
        return self.idle_seconds + current

    def _arm_or_cancel(self) -> None:
        if self.audience:
            self._cancel()
        elif self._running and self.activity is Activity.ACTIVE and self._timer is None:
            self._timer = self._clock.callLater(self.grace, self._grace_over)

    def _grace_over(self) -> None:
        self._timer = None
        if not self.audience and self.activity is Activity.ACTIVE:
            self._set(Activity.IDLE)

    def _set(self, activity: Activity) -> None:
        now = self._clock.seconds()
        if activity is Activity.IDLE:
            self.idle_periods += 1
            self._idle_since = now
        elif self._idle_since is not None:
            self.idle_seconds += now - self._idle_since
            self._idle_since = None
        self.activity = activity
        if self.on_change is not None:
            self.on_change(activity)

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


__all__ = ["DEFAULT_GRACE_SECONDS", "Activity", "OnDemand"]
