"""Liveness by pings, network-free: used by the relay's protocols and by the viewer client.

A ping goes out every ``interval`` whatever the checks do, so a peer that falls silent is
caught by the next ping's deadline: within ``interval + timeout``.  Any sign of life the
owner records (bytes in, write progress) since a ping counts as its answer.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Liveness:
    """Pings every ``interval`` seconds and calls ``silent`` when nothing was heard
    within ``timeout`` of a ping.

    ``last_heard`` gives the time of the peer's last sign of life; ``send_ping`` sends a
    ping and returns True, or returns False when the connection can no longer carry one
    (then pinging ends).  An ``interval`` or ``timeout`` of 0 disables the pings.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        timeout: float,
        last_heard: Callable[[], float],
        send_ping: Callable[[], bool],
        silent: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._timeout = timeout
        self._last_heard = last_heard
        self._send_ping = send_ping
        self._silent = silent
        self._last_ping_sent = 0.0
        self._ping_call: IDelayedCall | None = None
        self._pong_deadline: IDelayedCall | None = None

    def start(self) -> None:
        """Schedule the first ping (nothing when disabled)."""
        if self._interval > 0 and self._timeout > 0:
            self._ping_call = self._clock.callLater(self._interval, self._ping)

    def stop(self) -> None:
        """Cancel the next ping and any pending deadline."""
        for call in (self._ping_call, self._pong_deadline):
            if call is not None and call.active():
                call.cancel()
        self._ping_call = self._pong_deadline = None

    def _ping(self) -> None:
        self._ping_call = None
        if not self._send_ping():
            return
        self._last_ping_sent = self._clock.seconds()
        self.start()
        if self._pong_deadline is None:
            self._arm_deadline(self._last_ping_sent)

    def _arm_deadline(self, sent_at: float) -> None:
        delay = sent_at + self._timeout - self._clock.seconds()
        self._pong_deadline = self._clock.callLater(max(0.0, delay), self._check, sent_at)

    def _check(self, sent_at: float) -> None:
        self._pong_deadline = None
        last_heard = self._last_heard()
        if last_heard < sent_at:
            self._silent()
        elif last_heard < self._last_ping_sent:
            # Alive for that ping; a newer one is still unanswered.
            self._arm_deadline(self._last_ping_sent)
