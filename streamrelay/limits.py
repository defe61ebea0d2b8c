"""Admission limits with no I/O: open connections (global and per address), the
per-address handshake rate, and the stream names viewers hold while they wait for a
first publisher (global and per address).

Every counter returns to its idle state: an address whose count drops to zero is
forgotten, and rate buckets that have refilled are swept away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: an HTTP status, a short reason and an optional retry delay."""

    status: int
    reason: str
    retry_after: int | None = None


class ConnectionSlot:
    """One admitted connection; :meth:`release` gives the slot back exactly once."""

    __slots__ = ("_limiter", "address", "_released")

    def __init__(self, limiter: ConnectionLimiter, address: str) -> None:
        self._limiter = limiter
        self.address = address
        self._released = False

    def release(self) -> None:
        """Return the slot to the limiter; later calls do nothing."""
        if not self._released:
            self._released = True
            self._limiter._release(self.address)


class ConnectionLimiter:
    """Counts open connections, in total and per peer address, against their caps."""

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.total = 0
        self.refused = 0
        self._per_address: dict[str, int] = {}

    def acquire(self, address: str) -> ConnectionSlot | Refusal:
        """Admit a connection from ``address`` or say why not."""
        if self.total >= self.max_connections:
            self.refused += 1
            return Refusal(503, "server connection limit reached", retry_after=5)
        held = self._per_address.get(address, 0)
        if held >= self.max_per_address:
            self.refused += 1
            return Refusal(503, "too many connections from this address", retry_after=5)
        self.total += 1
        self._per_address[address] = held + 1
        return ConnectionSlot(self, address)

    def _release(self, address: str) -> None:
        self.total -= 1
        held = self._per_address[address] - 1
        if held:
            self._per_address[address] = held
        else:
            del self._per_address[address]

    def count_for(self, address: str) -> int:
        """Open connections from ``address``."""
        return self._per_address.get(address, 0)

    @property
    def tracked_addresses(self) -> int:
        """How many addresses hold at least one connection."""
        return len(self._per_address)


class HandshakeRateLimiter:
    """A token bucket per address: ``rate`` handshakes a second with a burst of ``burst``."""

    def __init__(self, clock: IReactorTime, rate: float, burst: int) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self.refused = 0
        # address -> (tokens, time of last update)
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, address: str) -> Refusal | None:
        """Take one token for ``address``; return a 503 refusal when the bucket is empty."""
        if self.rate <= 0:
            return None
        now = self._clock.seconds()
        tokens, updated = self._buckets.get(address, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - updated) * self.rate)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            self.refused += 1
            wait = math.ceil((1.0 - tokens) / self.rate)
            return Refusal(503, "too many handshakes from this address", retry_after=max(1, wait))
        self._buckets[address] = (tokens - 1.0, now)
        return None

    def sweep(self) -> None:
        """Forget addresses whose bucket has refilled: they behave as if never seen."""
        if self.rate <= 0:
            self._buckets.clear()
            return
        now = self._clock.seconds()
        full_after = self.burst / self.rate
        for address, (_tokens, updated) in list(self._buckets.items()):
            if now - updated >= full_after:
                del self._buckets[address]

    @property
    def tracked_addresses(self) -> int:
        """How many addresses currently have a bucket."""
        return len(self._buckets)


class WaitingStreams:
    """Stream names that exist only because viewers wait for a first publisher.

    Viewing needs no token by default, so anyone could make up names; these names get
    their own bound, ``max_total`` at once, and ``max_per_address`` held by the viewers
    of one address, apart from ``--max-streams`` (which only publishers count): viewers
    never take the slots publishers need.  A name stops waiting once a publisher comes
    (its viewers are then ordinary viewers of a real stream) or when its last viewer
    leaves.  Viewers joining a name that already waits add no name in total, so any
    number of viewers may wait for one announced stream.
    """

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.refused = 0
        # name -> {address: viewers from that address waiting on the name}
        self._holders: dict[str, dict[str, int]] = {}
        # address -> how many waiting names its viewers hold
        self._per_address: dict[str, int] = {}

    def check(self, name: str, address: str | None) -> Refusal | None:
        """Why a viewer from ``address`` may not wait on ``name`` now, or None.

        ``name`` is a name nobody publishes yet (new, or already waiting); ``address``
        None skips the per-address bound (a caller that cannot tell)."""
        holders = self._holders.get(name)
        if holders is None and len(self._holders) >= self.max_total:
            self.refused += 1
            return Refusal(503, "too many streams waiting for a publisher", retry_after=10)
        if address is not None and (holders is None or address not in holders):
            if self._per_address.get(address, 0) >= self.max_per_address:
                self.refused += 1
                return Refusal(
                    503, "too many waiting streams from this address", retry_after=10
                )
        return None

    def is_waiting(self, name: str) -> bool:
        """True while ``name`` is held by viewers only, never published."""
        return name in self._holders

    def add(self, name: str) -> None:
        """A stream was created for viewers: ``name`` waits from now on."""
        self._holders.setdefault(name, {})

    def hold(self, name: str, address: str | None) -> None:
        """A viewer from ``address`` waits on ``name`` (which must be waiting)."""
        holders = self._holders[name]
        if address is None:
            return
        count = holders.get(address, 0)
        holders[address] = count + 1
        if count == 0:
            self._per_address[address] = self._per_address.get(address, 0) + 1

    def release(self, name: str, address: str | None) -> None:
        """A viewer from ``address`` stopped waiting on ``name`` (once per
        :meth:`hold`); nothing to do once ``name`` no longer waits."""
        holders = self._holders.get(name)
        if holders is None or address is None or address not in holders:
            return
        count = holders[address] - 1
        if count:
            holders[address] = count
            return
        del holders[address]
        self._release_address(address)

    def forget(self, name: str) -> None:
        """``name`` stops waiting (a publisher came, or the stream is gone): its
        viewers' addresses no longer hold it."""
        holders = self._holders.pop(name, None)
        for address in holders or ():
            self._release_address(address)

    def _release_address(self, address: str) -> None:
        left = self._per_address[address] - 1
        if left:
            self._per_address[address] = left
        else:
            del self._per_address[address]

    @property
    def total(self) -> int:
        """Names waiting now."""
        return len(self._holders)

    def held_by(self, address: str) -> int:
        """Waiting names the viewers from ``address`` hold."""
        return self._per_address.get(address, 0)

    @property
    def tracked_addresses(self) -> int:
        """How many addresses hold at least one waiting name."""
        return len(self._per_address)
