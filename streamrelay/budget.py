"""The global bound on buffered bytes: every GOP cache plus everything pending towards
viewers.  When the total reaches the bound, the largest backlogs are shed (viewers are
put into skipping, then GOP caches are emptied) until the total is under 75% of it.

Every holder charges a message its memory cost: its bytes plus
:data:`MESSAGE_OVERHEAD_BYTES` for the Python objects kept with it, so that a flood of
tiny messages is bounded in real memory, not only in payload bytes.
"""

from __future__ import annotations

from typing import Final, Protocol

# What holding one relayed message costs beyond its bytes, in one holder (a GOP cache or
# a viewer queue): the prepared WebSocket frame (Autobahn's PreparedMessage and its
# payloadHybi bytes object, which carries the message), its MediaInfo (and the int of
# its capture time), and the holder's own slot (a 2-tuple and a list slot in the GOP
# cache; an _Outbound and a deque slot in a viewer queue).  Measured once through the
# real holders with the relay's frames (CPython 3.11.7, Autobahn 26.11.1, 64-bit Linux),
# per message beyond its size:
#   tracemalloc (2,000 messages), GOP cache:     245 B (9-byte messages), 273 B (300 B
#     and 5 kB), 281 B (70 kB); viewer queue alone holding the frame: 291 B, 321 B, 327 B
#   RSS growth (100,000 messages; pymalloc rounds each object up to 16 B, malloc adds
#     its own header): GOP cache 308 B (9 B), 356 B (300 B), 348 B (5 kB); viewer
#     queue 346 B (9 B), 396 B (300 B and 5 kB), 339 B (70 kB)
# The largest, 396 B, rounded up with some margin.  tests/test_budget.py re-measures it
# with tracemalloc.  Each holder is charged as if it alone kept the frame (the frame is
# shared when several hold it), so the sum of the charges is an upper bound.
MESSAGE_OVERHEAD_BYTES: Final = 448


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
