"""The global bound on buffered bytes: every GOP cache plus everything pending towards
viewers.  When the total reaches the bound, the largest backlogs are shed (viewers are
put into skipping, then GOP caches are emptied) until the total is under 75% of it.
"""

from __future__ import annotations

from typing import Protocol


class Sheddable(Protocol):
    """Something that holds buffered bytes and can let most of them go."""

    @property
    def backlog_bytes(self) -> int:
        """Bytes this member holds."""
        ...

    @property
    def sheddable_bytes(self) -> int:
        """Bytes :meth:`shed` would free now."""
        ...

    def shed(self) -> None:
        """Drop what can be dropped (queued media, a cached GOP)."""
        ...


class BufferBudget:
    """Tracks the total of buffered bytes and enforces ``limit`` on it."""

    LOW_WATER_FRACTION = 0.75
    # After a pass that could not get under the low-water mark (the rest sits in
    # transport buffers), the next pass waits until the total grew by this fraction.
    RETRY_GROWTH_FRACTION = 1 / 16

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.sheds = 0
        self._viewers: set[Sheddable] = set()
        self._caches: set[Sheddable] = set()
        self._enforcing = False
        self._retry_above = 0

    def add_viewer(self, member: Sheddable) -> None:
        """Count a viewer's backlog towards the bound."""
        self._viewers.add(member)

    def add_cache(self, member: Sheddable) -> None:
        """Count a GOP cache towards the bound."""
        self._caches.add(member)

    def remove(self, member: Sheddable) -> None:
        """Stop tracking a member; its bytes must already have been given back."""
        self._viewers.discard(member)
        self._caches.discard(member)

    def adjust(self, delta: int) -> None:
        """Record that buffered bytes changed by ``delta``; shed load when over the bound."""
        self.total += delta
        if self.limit <= 0 or self._enforcing:
            return
        if self.total < self.limit:
            self._retry_above = 0
        elif self.total >= max(self.limit, self._retry_above):
            self._enforce()

    def _enforce(self) -> None:
        self._enforcing = True
        try:
            low_water = self.limit * self.LOW_WATER_FRACTION
            for group in (self._viewers, self._caches):
                # Largest backlogs first, among those shedding can actually relieve.
                candidates = [member for member in group if member.sheddable_bytes > 0]
                candidates.sort(key=lambda member: member.backlog_bytes, reverse=True)
                for member in candidates:
                    if self.total < low_water:
                        break
                    self.sheds += 1
                    member.shed()
            if self.total >= self.limit:
                self._retry_above = self.total + int(self.limit * self.RETRY_GROWTH_FRACTION)
        finally:
            self._enforcing = False
