"""Adaptive delivery (``/watch/BASE?abr=1``, docs/protocol.md "Renditions"): a base
stream's rendition set, read from its ``meta``, and the policy that decides when one
viewer steps down or up between renditions.  No I/O: every observation carries the
clock's reading, so tests drive the policy with plain numbers.

The policy watches what the viewer's queue holds (the bytes the relay keeps because the
viewer's transport is full) and how many bytes the transport accepted:

* **down** when the viewer falls behind, well before the drop-to-keyframe would fire:
  the queue holds more than :attr:`AbrSettings.down_fraction` of the queue bound, or a
  backlog worth :attr:`AbrSettings.behind_seconds` of the current rendition kept growing
  for :attr:`AbrSettings.growth_window`, or a drop episode began anyway.  The target is
  the highest rendition that fits the measured capacity (at least one step down).
* **capacity** is measured while the viewer is backlogged: the transport is then the
  bottleneck, so the bytes it accepts per second over the backlogged run are the link's
  throughput, not the send rate.
* **up** one step after :attr:`AbrSettings.up_hold` seconds with nothing queued, when
  the capacity estimate exceeds the higher rendition's bitrate by
  :attr:`AbrSettings.up_margin`.  A link that is not backlogged shows only the send rate,
  so an estimate older than :attr:`AbrSettings.estimate_ttl` no longer holds the viewer
  down: the step up is then a probe, and a probe that has to step down again within
  :attr:`AbrSettings.failed_probe_window` doubles the hold before the next one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streamrelay.names import is_rendition_of, is_valid_label

# A rendition set is bounded: each rendition is a stream the relay may have to pull.
MAX_RENDITIONS = 8
_MAX_DIMENSION = 16384
_MAX_BITRATE = 10_000_000_000
_MAX_CODEC_CHARS = 64


@dataclass(frozen=True, slots=True)
class Rendition:
    """One rendition of a set, as its publisher announced it."""

    name: str
    stream: str
    width: int
    height: int
    bitrate: int
    codec: str = ""

    def listing(self) -> dict[str, Any]:
        """The rendition in its base stream's ``/api/streams`` entry."""
        return {
            "name": self.name,
            "stream": self.stream,
            "width": self.width,
            "height": self.height,
            "bitrate": self.bitrate,
        }

    def announcement(self, reason: str) -> dict[str, Any]:
        """The ``rendition`` message telling a viewer it is (now) on this rendition."""
        return {
            "type": "rendition",
            "name": self.name,
            "stream": self.stream,
            "width": self.width,
            "height": self.height,
            "bitrate": self.bitrate,
            "reason": reason,
        }


def _positive_int(value: object, ceiling: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= ceiling:
        return None
    return value


def _rendition(entry: object, base: str) -> Rendition | None:
    if not isinstance(entry, Mapping):
        return None
    name, stream, codec = entry.get("name"), entry.get("stream"), entry.get("codec", "")
    if not isinstance(name, str) or not is_valid_label(name):
        return None
    if not isinstance(stream, str) or not is_rendition_of(stream, base):
        return None
    if not isinstance(codec, str) or len(codec) > _MAX_CODEC_CHARS:
        return None
    width = _positive_int(entry.get("width"), _MAX_DIMENSION)
    height = _positive_int(entry.get("height"), _MAX_DIMENSION)
    bitrate = _positive_int(entry.get("bitrate"), _MAX_BITRATE)
    if width is None or height is None or bitrate is None:
        return None
    return Rendition(name, stream, width, height, bitrate, codec)


def parse_renditions(meta: Mapping[str, Any], base: str) -> tuple[Rendition, ...] | None:
    """The rendition set a base stream's ``meta`` announces, highest bitrate first, or
    None when it announces none or a malformed one: more than :data:`MAX_RENDITIONS`,
    an entry that is not this base's rendition, a dimension or bitrate that is not a
    positive integer, duplicate names or streams, or a set without the base itself."""
    entries = meta.get("renditions")
    if not isinstance(entries, list) or not 2 <= len(entries) <= MAX_RENDITIONS:
        return None
    found = []
    for entry in entries:
        rendition = _rendition(entry, base)
        if rendition is None:
            return None
        found.append(rendition)
    if len({r.name for r in found}) != len(found) or len({r.stream for r in found}) != len(found):
        return None
    if base not in {r.stream for r in found}:
        return None
    return tuple(sorted(found, key=lambda r: -r.bitrate))


@dataclass(frozen=True)
class AbrSettings:
    """The policy's thresholds (seconds, fractions, factors)."""

    # How often a viewer's queue is observed.  One observation costs ~4 us, its ioctl
    # included, plus its timer (measured on CPython 3.11): 10,000 adaptive viewers at
    # 2 Hz take roughly a tenth of a core.
    interval: float = 0.5
    # Queued bytes over this fraction of the queue bound: step down at once (the drop
    # to keyframe fires at the whole bound).
    down_fraction: float = 0.25
    # A backlog worth this many seconds of the current rendition that grew over the
    # growth window: the viewer falls behind.
    behind_seconds: float = 0.5
    growth_window: float = 1.0
    # After a switch, no step down for this long unless urgent (the previous
    # rendition's backlog drains first).
    down_hold: float = 1.5
    # Less backlog than this many seconds of the current rendition is headroom.
    calm_seconds: float = 0.2
    # Seconds of headroom before a step up (doubled by each failed probe, up to the
    # maximum).
    up_hold: float = 6.0
    up_hold_max: float = 96.0
    up_margin: float = 1.25
    # A capacity measurement older than this no longer holds a viewer down.
    estimate_ttl: float = 15.0
    # A backlogged run this long gives a capacity measurement.
    measure_window: float = 1.0
    # A step down this soon after a step up: the probe failed.
    failed_probe_window: float = 10.0
    # A switch whose target sends no KEY within this is given up.
    switch_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Observation:
    """One look at a viewer's queue."""

    now: float
    # Bytes held for the viewer and not sent yet: in its queue, in the transport's
    # buffer and in the kernel's send buffer.
    queued: int
    # Bytes that left towards the viewer so far (handed over minus still held).
    sent: int
    skipping: bool  # in a drop episode


@dataclass(frozen=True, slots=True)
class Decision:
    """Switch to ``renditions[index]`` (``reason`` "down" or "up")."""

    index: int
    reason: str


class AbrPolicy:
    """When one viewer steps down or up; ``limit`` is its queue bound in bytes."""

    def __init__(self, limit: int, settings: AbrSettings | None = None) -> None:
        self.settings = settings or AbrSettings()
        self.limit = limit
        self.renditions: tuple[Rendition, ...] = ()
        self.current = 0
        # Capacity in bits per second, measured while backlogged, and when.
        self.capacity: float | None = None
        self.capacity_at = -math.inf
        self._history: deque[Observation] = deque()
        self._run_start: Observation | None = None
        self._headroom_since: float | None = None
        self._switched_at = -math.inf
        self._up_at = -math.inf
        self._failed_probes = 0
        # A switch is under way: no new decision until it ends.
        self.pending = False

    # -- the set --------------------------------------------------------------------

    def set_renditions(self, renditions: Sequence[Rendition], current_stream: str) -> bool:
        """Adopt a (new) set; the viewer is on ``current_stream``.  False when that
        stream is not in the set (the set is then not adopted)."""
        streams = [r.stream for r in renditions]
        if current_stream not in streams:
            return False
        self.renditions = tuple(renditions)
        self.current = streams.index(current_stream)
        return True

    @property
    def rendition(self) -> Rendition | None:
        """The rendition the viewer is on (None while no set is known)."""
        return self.renditions[self.current] if self.renditions else None

    @property
    def up_hold(self) -> float:
        """The headroom needed before the next step up, failed probes counted."""
        settings = self.settings
        return min(settings.up_hold_max, settings.up_hold * 2**self._failed_probes)

    # -- observing -------------------------------------------------------------------

    def observe(self, seen: Observation) -> Decision | None:
        """Take one observation; the switch to start now, if any."""
        self._measure(seen)
        rendition = self.rendition
        calm_bytes = rendition.bitrate / 8 * self.settings.calm_seconds if rendition else 0
        if seen.queued <= calm_bytes and not seen.skipping:
            if self._headroom_since is None:
                self._headroom_since = seen.now
        else:
            self._headroom_since = None
        settings = self.settings
        if math.isfinite(self._up_at) and seen.now - self._up_at > settings.failed_probe_window:
            # The last step up held: the next one waits the plain hold again.
            self._failed_probes = 0
            self._up_at = -math.inf
        if self.pending or len(self.renditions) < 2:
            return None
        down = self._down(seen)
        if down is not None:
            return down
        return self._up(seen)

    def _measure(self, seen: Observation) -> None:
        history = self._history
        history.append(seen)
        while len(history) > 2 and seen.now - history[1].now >= self.settings.growth_window:
            history.popleft()
        if seen.queued == 0:
            self._finish_run(seen)
            return
        start = self._run_start
        if start is None:
            self._run_start = seen
            return
        self._estimate_from(start, seen)

    def _finish_run(self, seen: Observation) -> None:
        start, self._run_start = self._run_start, None
        if start is not None:
            self._estimate_from(start, seen)

    def _estimate_from(self, start: Observation, end: Observation) -> None:
        elapsed = end.now - start.now
        if elapsed < self.settings.measure_window:
            return
        self.capacity = (end.sent - start.sent) * 8 / elapsed
        self.capacity_at = end.now

    def _falling_behind(self, seen: Observation) -> tuple[bool, bool]:
        """(behind, urgent)."""
        if seen.skipping or seen.queued > self.settings.down_fraction * self.limit:
            return True, True
        rendition = self.renditions[self.current]
        queued_seconds = seen.queued * 8 / rendition.bitrate
        oldest = self._history[0]
        start = self._run_start
        growing = (
            start is not None
            and seen.now - start.now >= self.settings.growth_window
            and seen.now - oldest.now >= self.settings.growth_window
            and seen.queued > oldest.queued
        )
        return growing and queued_seconds >= self.settings.behind_seconds, False

    def _down(self, seen: Observation) -> Decision | None:
        if self.current >= len(self.renditions) - 1:
            return None
        behind, urgent = self._falling_behind(seen)
        if not behind:
            return None
        if not urgent and seen.now - self._switched_at < self.settings.down_hold:
            return None
        target = self.current + 1
        capacity = self._recent_capacity(seen.now)
        if capacity is not None:
            while (
                target < len(self.renditions) - 1
                and self.renditions[target].bitrate * self.settings.up_margin > capacity
            ):
                target += 1
        return Decision(target, "down")

    def _recent_capacity(self, now: float) -> float | None:
        if self.capacity is None or now - self.capacity_at > self.settings.estimate_ttl:
            return None
        return self.capacity

    def _up(self, seen: Observation) -> Decision | None:
        if self.current == 0 or self._headroom_since is None:
            return None
        calm_since = max(self._headroom_since, self._switched_at)
        if seen.now - calm_since < self.up_hold:
            return None
        higher = self.renditions[self.current - 1]
        capacity = self._recent_capacity(seen.now)
        if capacity is not None and capacity < higher.bitrate * self.settings.up_margin:
            return None
        return Decision(self.current - 1, "up")

    # -- switches --------------------------------------------------------------------

    def started(self) -> None:
        """A switch the policy decided is under way."""
        self.pending = True

    def switched(self, index: int, reason: str, now: float) -> None:
        """The viewer is on ``renditions[index]`` from ``now`` (its KEY went out)."""
        self.pending = False
        if reason == "down" and now - self._up_at < self.settings.failed_probe_window:
            # One failure per probe, however many steps down follow it.
            self._failed_probes += 1
            self._up_at = -math.inf
        if reason == "up":
            self._up_at = now
        self.current = index
        self._switched_at = now
        self._history.clear()
        self._run_start = None
        self._headroom_since = None

    def abandoned(self, now: float) -> None:
        """The switch under way was given up (its target sent no KEY in time)."""
        self.pending = False
        self._switched_at = now
