"""The ping deadline shared by the relay's protocols and the viewer client, on a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from streamrelay.liveness import Liveness


class Peer:
    """What the owner of a :class:`Liveness` does: records pings and the verdict."""

    def __init__(self, clock: Clock, open_: bool = True) -> None:
        self.clock = clock
        self.heard = 0.0
        self.pings: list[float] = []
        self.silent_at: list[float] = []
        self.open = open_

    def liveness(self, interval: float = 1.0, timeout: float = 2.0) -> Liveness:
        """A started Liveness for this peer."""
        live = Liveness(
            self.clock, interval, timeout, lambda: self.heard, self.send_ping, self.silent
        )
        live.start()
        return live

    def send_ping(self) -> bool:
        if self.open:
            self.pings.append(self.clock.seconds())
        return self.open

    def silent(self) -> None:
        self.silent_at.append(self.clock.seconds())


def test_a_silent_peer_is_found_within_interval_plus_timeout() -> None:
    """Pings every interval; nothing heard within the timeout of the first: silent."""
    clock = Clock()
    peer = Peer(clock)
    peer.liveness()
    clock.pump([0.5] * 7)
    assert peer.pings[:2] == [1.0, 2.0] and peer.silent_at == [3.0]


def test_a_peer_heard_after_each_ping_stays() -> None:
    """A sign of life after each ping keeps the peer; pings go on."""
    clock = Clock()
    peer = Peer(clock)
    peer.liveness()
    for _ in range(20):
        clock.advance(0.5)
        peer.heard = clock.seconds()
    assert peer.silent_at == [] and len(peer.pings) == 10


def test_stop_and_a_closed_connection_end_the_pings() -> None:
    """``stop`` cancels every call; a connection that can no longer ping ends them."""
    clock = Clock()
    stopped = Peer(clock)
    stopped.liveness().stop()
    closed = Peer(clock, open_=False)
    closed.liveness()
    clock.pump([1.0] * 5)
    assert stopped.pings == [] and closed.pings == [] and clock.getDelayedCalls() == []
    assert stopped.silent_at == closed.silent_at == []


def test_zero_interval_or_timeout_disables_pings() -> None:
    """Either setting at 0 means no pings at all."""
    clock = Clock()
    Peer(clock).liveness(interval=0.0)
    Peer(clock).liveness(timeout=0.0)
    assert clock.getDelayedCalls() == []
