"""The network side of a rendition set: one :class:`~.client.Publisher` per rendition.

Each rendition travels on a WebSocket of its own, a plain v1 publisher of its stream
(``BASE`` for the top rendition, ``BASE~LABEL`` for the others; see :mod:`.renditions`),
with all of the single publisher's machinery: reconnects with backoff, the bounded
outbox and handoff, meta and CONFIG again after a reconnect.

:class:`RenditionPublisher` ties them together:

- the viewer count it reports (``viewers``, ``on_viewers``) is the SUM over the rendition
  connections: the one number a publisher acts on (status line, publishing on demand);
- a keyframe request on ANY connection (the relay asked, a reconnect, drops) reaches
  ``on_keyframe_request`` once, and the encoder then makes the next source frame a
  keyframe in every rendition, so that keyframes stay aligned;
- it stops as a whole: when one connection stops for good (a newer publisher took its
  stream), the others are closed too.

It reads like a :class:`~.client.Publisher` where the status line and the command line
need one (``stats`` and ``dropped`` are sums, ``state`` and ``readiness`` the worst).
Reactor thread, except ``readiness`` (any thread).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from streamrelay.wsclient.backoff import Backoff
from streamrelay.wsclient.endpoint import EndpointFactory
from streamrelay.wsclient.target import RelayTarget

from .client import ConnectionState, Publisher, PublisherStats, Readiness
from .ondemand import Activity, OnDemand
from .renditions import Rendition, RenditionSet, base_stream_name, rendition_url
from .settings import PublisherSettings

_log = Logger()

# The state shown for the set when its connections differ: the one that most needs
# attention first.
_STATE_PRECEDENCE = (
    ConnectionState.RECONNECTING,
    ConnectionState.CONNECTING,
    ConnectionState.STOPPED,
    ConnectionState.IDLE,
    ConnectionState.LIVE,
)


class RenditionPublisher:
    """Publishes a rendition set, one connection per rendition (see the module docstring).

    ``settings`` is for the top rendition: its URL names the base stream, and the other
    renditions' settings are copies with their own stream's URL. ``queue_bounds(bitrate)``,
    when given, sizes each rendition's outbox (high water, limit) for its bitrate.
    """

    def __init__(
        self,
        settings: PublisherSettings,
        renditions: Sequence[Rendition],
        *,
        reactor: Any = None,
        queue_bounds: Callable[[int], tuple[int, int]] | None = None,
        backoff_factory: Callable[[], Backoff] | None = None,
        endpoint_factory: EndpointFactory | None = None,
    ) -> None:
        self.rendition_set = RenditionSet(base_stream_name(settings.url), tuple(renditions))
        self.settings = settings
        self.on_viewers: Callable[[int], None] | None = None
        self.on_keyframe_request: Callable[[], None] | None = None
        self.on_state_change: Callable[[ConnectionState], None] | None = None
        self._stopping = False
        self._shown_state = ConnectionState.IDLE
        # On demand, one decision for the set, fed the summed audience: a rendition nobody
        # watches is still encoded while another is watched (an ABR viewer may step to it).
        self._on_demand = (
            OnDemand(reactor, settings.on_demand_grace, self._set_activity)
            if settings.on_demand
            else None
        )
        publishers: list[Publisher] = []
        for rendition in self.rendition_set.renditions:
            changes: dict[str, Any] = {
                "url": rendition_url(settings.url, self.rendition_set.stream_name(rendition)),
                "on_demand": False,
            }
            if queue_bounds is not None:
                high_water, limit = queue_bounds(rendition.bitrate)
                changes.update(queue_high_water_bytes=high_water, queue_limit_bytes=limit)
            publisher = Publisher(
                dataclasses.replace(settings, **changes),
                reactor=reactor,
                backoff=backoff_factory() if backoff_factory is not None else None,
                endpoint_factory=endpoint_factory,
            )
            publisher.on_viewers = self._viewers_reported
            publisher.on_keyframe_request = self._keyframe_requested
            publisher.on_state_change = self._state_changed
            publishers.append(publisher)
        self.publishers: tuple[Publisher, ...] = tuple(publishers)
        self._stopped: defer.Deferred[list[str]] = defer.gatherResults(
            [publisher.when_stopped() for publisher in publishers]
        )
        for publisher in publishers:
            publisher.when_stopped().addCallback(self._member_stopped)

    # -- the set ---------------------------------------------------------------------------

    @property
    def renditions(self) -> tuple[Rendition, ...]:
        """The renditions, highest bitrate first (the order of :attr:`publishers`)."""
        return self.rendition_set.renditions

    def publisher(self, label: str) -> Publisher:
        """The connection of the rendition labelled ``label``."""
        for rendition, publisher in zip(self.renditions, self.publishers, strict=True):
            if rendition.label == label:
                return publisher
        raise KeyError(label)

    @property
    def target(self) -> RelayTarget:
        """The top rendition's relay URL (the base stream), parsed."""
        return self.publishers[0].target

    # -- what the set reports --------------------------------------------------------------

    @property
    def viewers(self) -> int | None:
        """Viewers of the whole set: the sum over the connections that know their count
        (None while none does). The count a publisher acts on."""
        counts = [p.viewers for p in self.publishers if p.viewers is not None]
        return sum(counts) if counts else None

    @property
    def stats(self) -> PublisherStats:
        """The connections' counters, added up (a fresh record on every read)."""
        total = PublisherStats()
        for publisher in self.publishers:
            for field in dataclasses.fields(PublisherStats):
                setattr(
                    total,
                    field.name,
                    getattr(total, field.name) + getattr(publisher.stats, field.name),
                )
        return total

    @property
    def dropped(self) -> int:
        """Frames the connections dropped because the network was behind."""
        return sum(publisher.dropped for publisher in self.publishers)

    @property
    def state(self) -> ConnectionState:
        """The connections' state when they agree, else the one needing attention most."""
        states = {publisher.state for publisher in self.publishers}
        if len(states) == 1:
            return states.pop()
        return next(state for state in _STATE_PRECEDENCE if state in states)

    @property
    def viewer_report(self) -> dict[str, Any] | None:
        """The relay's latest summary of the viewers' reports: the top rendition's (the
        base stream's), else the first rendition that has one."""
        for publisher in self.publishers:
            if publisher.viewer_report is not None:
                return publisher.viewer_report
        return None

    @property
    def on_demand(self) -> OnDemand | None:
        """The set's on-demand decision (its audience, idle time), None without it."""
        return self._on_demand

    @property
    def activity(self) -> Activity:
        """IDLE while the on-demand set has nobody watching any rendition, else ACTIVE."""
        return self.publishers[0].activity

    @property
    def connected(self) -> bool:
        """True while every connection is open."""
        return all(publisher.connected for publisher in self.publishers)

    @property
    def readiness(self) -> Readiness:
        """OFFLINE when no connection is open, CONGESTED when any is behind, else READY
        (each rendition's encoding follows its own connection's readiness). Any thread."""
        values = [publisher.readiness for publisher in self.publishers]
        if all(value is Readiness.OFFLINE for value in values):
            return Readiness.OFFLINE
        if all(value is Readiness.IDLE for value in values):
            return Readiness.IDLE
        if any(value is Readiness.CONGESTED for value in values):
            return Readiness.CONGESTED
        return Readiness.READY

    @property
    def last_error(self) -> str | None:
        """The first connection's last error, prefixed with its rendition's label."""
        for rendition, publisher in zip(self.renditions, self.publishers, strict=True):
            if publisher.last_error:
                return f"{rendition.label}: {publisher.last_error}"
        return None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start every connection."""
        for publisher in self.publishers:
            publisher.start()
        if self._on_demand is not None:
            self._on_demand.start()

    def stop(self, reason: str = "publisher stopped") -> defer.Deferred[str]:
        """Close every connection cleanly; fires with ``reason`` once all are closed."""
        self._stopping = True
        if self._on_demand is not None:
            self._on_demand.stop()
        stops = [publisher.stop(reason) for publisher in self.publishers]
        return defer.gatherResults(stops).addCallback(lambda _: reason)

    def when_stopped(self) -> defer.Deferred[str]:
        """Fires with the first stop reason once every connection has stopped for good."""
        waiter: defer.Deferred[str] = defer.Deferred()

        def fire(reasons: list[str]) -> list[str]:
            """Pass the first reason on, and keep the result for the next waiter."""
            waiter.callback(reasons[0])
            return reasons

        self._stopped.addCallback(fire)
        return waiter

    # -- the connections' reports ------------------------------------------------------------

    def _viewers_reported(self, count: int) -> None:
        total = self.viewers
        if self._on_demand is not None:
            self._on_demand.update(total)
        if total is not None and self.on_viewers is not None:
            self.on_viewers(total)

    def _set_activity(self, activity: Activity) -> None:
        # Every rendition together: they share one source and one capture thread.
        for publisher in self.publishers:
            publisher.set_activity(activity)

    def _keyframe_requested(self) -> None:
        if self.on_keyframe_request is not None:
            self.on_keyframe_request()

    def _state_changed(self, state: ConnectionState) -> None:
        if self._on_demand is not None:
            # A connection lost forgets its count: the audience is what the rest report.
            self._on_demand.update(self.viewers)
        shown = self.state
        if shown is not self._shown_state:
            self._shown_state = shown
            if self.on_state_change is not None:
                self.on_state_change(shown)

    def _member_stopped(self, reason: str) -> str:
        if not self._stopping:
            # One stream was taken over: a set with a rendition missing is no set.
            _log.warn(
                "a rendition connection stopped ({reason}); closing the others", reason=reason
            )
            self.stop(reason)
        return reason


__all__ = ["RenditionPublisher"]
