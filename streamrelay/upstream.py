"""Pulling streams from an upstream relay (``--upstream``): the edge side of relay to
relay (``docs/cluster.md``).

A relay with an upstream serves every stream it has no local publisher for by pulling it:
the :class:`~streamrelay.streams.StreamRegistry` tells the :class:`UpstreamManager` (its
:class:`~streamrelay.streams.Puller`) when a stream gains its first local viewer, loses
its last, or gets a local publisher.  The manager keeps at most one :class:`Pull` per
stream and at most ``--max-pulls`` live ones (a viewer that would need one more is
refused with 503 in its handshake, so a refused viewer never starts a pull, and an
invalid name never reaches the registry).  A pull ends ``--upstream-grace`` seconds after the last
local viewer left; a viewer back within the grace reuses it.

A pull is a :class:`~streamrelay.client.StreamClient` (the library's viewer client) on
``/relay/NAME`` with a ``relay`` token minted here from ``--relay-secret-file``, per
connection.  While the upstream says ``live`` the pull is the stream's publisher
(:meth:`~streamrelay.streams.StreamRegistry.pull_source`), so the stream behaves as a
locally published one: GOP cache, status, meta, CONFIG-then-KEY for joiners, per-viewer
drops and the byte bounds.  It reports the stream's audience upstream and forwards the
keyframe requests the local cache cannot serve.  When the upstream goes away the viewers
see ``offline`` and stay; the client retries with full jitter (at most
:data:`RETRY_MAX_SECONDS` apart, so a restarted origin is served again within about a
second) and each URL of ``--upstream`` is tried in turn.

Where the URLs come from is a :class:`UpstreamLocator`, asked at every attempt: the
templates of ``--upstream`` here, a cluster directory later.

Names nobody publishes upstream (a viewer may invent any name) must not lock live streams
out: only a pull whose upstream has said ``live`` holds one of the ``--max-pulls``
places.  A pull that has never been live is a *probe*: it holds no place (the local
waiting-stream bounds, total and per address, already bound the names viewers invent),
and after :data:`PROBE_SECONDS` without ``live`` it is *parked*: its connection closes
(so it holds no waiting slot upstream either) and it probes again
:data:`PARK_SECONDS` later while its viewers wait here, as viewers of an unpublished
name do.  At most a quarter of ``--max-pulls`` probes are open at once (so an edge opens
at most 1.25 x ``--max-pulls`` connections upstream); more names queue for a probe, and
while some do, a probe told ``offline`` parks at once, so the queue moves at the pace of
handshakes and a live stream's name is reached quickly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall

from streamrelay.client import ClientSettings, StreamClient, StreamListener
from streamrelay.config import STREAM_PLACEHOLDER, RelayConfig
from streamrelay.context import RelayContext
from streamrelay.limits import Refusal
from streamrelay.logs import relay_logger
from streamrelay.roles import Role
from streamrelay.streams import PublisherSession, StreamRegistry
from streamrelay.tokens import make_token
from streamrelay.wire import MediaMessage, WireError
from streamrelay.wsclient.backoff import Backoff
from streamrelay.wsclient.endpoint import EndpointFactory, default_endpoint

_log = relay_logger(__name__)

# Reconnect delays of a pull: uniform in [0, min(max, initial * 2**attempt)].  A second at
# most: an edge's viewers wait for it, and a refused or failed attempt costs the upstream
# little (the handshake-rate limit bounds the rest).
RETRY_INITIAL_SECONDS = 0.1
RETRY_MAX_SECONDS = 1.0
# A pull never live upstream for this long is parked (closed) for PARK_SECONDS, then
# probes again: invented names hold neither a --max-pulls place nor an upstream slot.
PROBE_SECONDS = 5.0
PARK_SECONDS = 10.0
# A relay token is checked once, when the pull connects; it is minted for each attempt.
TOKEN_TTL_SECONDS = 300


class UpstreamLocator(Protocol):
    """Where a stream can be pulled from."""

    def urls(self, name: str) -> tuple[str, ...]:
        """The ``/relay/NAME`` URLs for ``name``, tried in turn."""
        ...


@dataclass(frozen=True)
class TemplateLocator:
    """The URL templates of ``--upstream``, ``{stream}`` filled in."""

    templates: tuple[str, ...]

    def urls(self, name: str) -> tuple[str, ...]:
        """Each template for ``name`` (names are validated before they get here)."""
        return tuple(template.replace(STREAM_PLACEHOLDER, name) for template in self.templates)


class Pull(StreamListener):
    """One stream pulled from the upstream: a viewer client upstream, the stream's
    publisher (:class:`~streamrelay.streams.PublisherLink`) here while it is live."""

    def __init__(self, manager: UpstreamManager, name: str) -> None:
        self.manager = manager
        self.name = name
        config = manager.config
        settings = ClientSettings(
            manager.locator.urls(name),
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            open_timeout=config.handshake_timeout,
            close_timeout=config.close_timeout,
            retry_initial=RETRY_INITIAL_SECONDS,
            retry_max=RETRY_MAX_SECONDS,
            max_message_bytes=config.max_message_bytes,
        )
        self.client = StreamClient(
            settings,
            self,
            manager.reactor,
            backoff=manager.backoff_factory(),
            endpoint_factory=manager.endpoint_factory,
            token_source=manager.token_for(name),
            next_url=self._next_url,
        )
        self._attempts = 0
        self.session: PublisherSession | None = None
        self._grace: IDelayedCall | None = None
        # True once the upstream said live: only then does the pull hold a place.
        self.was_live = False
        self._probe: IDelayedCall | None = None
        # A keyframe request made while the connection was down, sent once it is open.
        self.keyframe_owed = False

    def _next_url(self) -> str:
        # Asked anew at every attempt, so a locator whose answer changes (a directory of
        # origins) is followed; the URLs it gives are taken in turn.
        urls = self.manager.locator.urls(self.name)
        url = urls[self._attempts % len(urls)]
        self._attempts += 1
        return url

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (and keep reconnecting); parked if never live within the probe."""
        self._probe = self.manager.reactor.callLater(PROBE_SECONDS, self._probe_over)
        self.client.start()

    def _probe_over(self) -> None:
        self._probe = None
        if not self.was_live:
            self.manager.park(self)

    def _cancel_probe(self) -> None:
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        self._probe = None

    @property
    def in_grace(self) -> bool:
        """True while the pull waits out the grace period with no local viewer."""
        return self._grace is not None

    def keep(self) -> None:
        """A local viewer is back: no end in sight."""
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None

    def start_grace(self, seconds: float) -> None:
        """No local viewer is left: end after ``seconds`` unless one comes back."""
        if self._grace is None:
            self._grace = self.manager.reactor.callLater(seconds, self._grace_over)

    def _grace_over(self) -> None:
        self._grace = None
        self.manager.grace_over(self)

    def stop(self) -> defer.Deferred[None]:
        """Leave the stream and close the upstream connection."""
        self.keep()
        self._cancel_probe()
        self._detach()
        return self.client.stop("pull ended")

    def describe(self) -> dict[str, Any]:
        """The pull for ``/api/streams``."""
        return {**self.client.describe(), "grace": self.in_grace}

    def _detach(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()

    # -- what the upstream says (StreamListener) ------------------------------------------

    def opened(self, client: StreamClient) -> None:
        """Tell the upstream how many viewers this relay serves for the stream."""
        if client.stats.connects > 1:
            self.manager.reconnects += 1
        stream = self.manager.registry.streams.get(self.name)
        self.send_viewer_count(stream.audience if stream is not None else 0)
        if self.keyframe_owed:
            self.send_keyframe_request()

    def status(self, live: bool) -> None:
        """Live upstream: become the stream's publisher; offline: viewers see it too."""
        if not live:
            self._detach()
            if not self.was_live and self.manager.queued:
                # Names wait for a probe: this one has its answer, let the next ask.
                self.manager.park(self)
            return
        if self.session is not None:
            return
        if not self.was_live:
            if not self.manager.take_place(self):
                return
            self.was_live = True
            self._cancel_probe()
        self.session = self.manager.registry.pull_source(self.name, self)
        self.manager.probe_done()
        if self.session is None:
            # A local publisher has the stream: it wins, and this pull has no purpose.
            self.manager.stop(self.name)

    def meta(self, raw: bytes, meta: dict[str, Any]) -> None:
        """Forward the metadata unchanged."""
        if self.session is not None:
            self.session.meta(raw)

    def media(self, message: MediaMessage) -> None:
        """Feed the stream, as a local publisher's message would."""
        if self.session is not None:
            self.session.media(message)

    def dropped(self, count: int) -> None:
        """The upstream dropped messages towards this relay: viewers see the gap."""
        if self.session is not None:
            self.session.gap(count)

    def text(self, message: dict[str, Any]) -> None:
        """A ``thumbnail`` from the upstream is kept as the publisher's would be (never
        forwarded to viewers); one that breaks the rules is dropped, not fatal."""
        if self.session is not None and message.get("type") == "thumbnail":
            try:
                self.session.thumbnail(message)
            except WireError:
                pass

    def audio_dropped(self, count: int) -> None:
        """The upstream dropped audio towards this relay: audio viewers see the gap."""
        if self.session is not None:
            self.session.audio_gap(count)

    def closed(self, why: str) -> None:
        """The upstream connection is gone: viewers see ``offline`` and stay."""
        self._detach()

    # -- the stream's publisher (streams.PublisherLink) ------------------------------------

    @property
    def peer_address(self) -> str:
        """The upstream's URL, for logs."""
        return self.client.display_url

    def send_viewer_count(self, count: int) -> None:
        """Report this relay's audience of the stream upstream (``viewers``)."""
        self.client.send_json({"type": "viewers", "count": count})

    def forward_viewer_reports(self, rows: list[list[float | int | None]]) -> None:
        """Pass this relay's viewers' reports on upstream (``reports``), so that the
        publisher's relay sums up the whole audience; lost while disconnected."""
        self.client.send_json({"type": "reports", "reports": rows})

    def send_keyframe_request(self) -> None:
        """A local viewer needs a KEY the cache cannot give: ask upstream, now or (the
        connection being down) as soon as it is open again: a request is never lost."""
        self.keyframe_owed = not self.client.request_keyframe()

    def replaced(self) -> None:
        """A local publisher took the stream: the pull ends."""
        self.manager.stop(self.name)


class UpstreamManager:
    """The pulls of one relay: the registry's :class:`~streamrelay.streams.Puller`."""

    def __init__(
        self,
        registry: StreamRegistry,
        reactor: Any,
        config: RelayConfig,
        locator: UpstreamLocator | None = None,
        *,
        endpoint_factory: EndpointFactory = default_endpoint,
        backoff_factory: Callable[[], Backoff] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if config.relay_secret is None:
            raise ValueError("pulling from an upstream needs the relay secret")
        self.registry = registry
        self.reactor = reactor
        self.config = config
        self.locator: UpstreamLocator = locator or TemplateLocator(config.upstream)
        self.endpoint_factory = endpoint_factory
        self.backoff_factory = backoff_factory or (
            lambda: Backoff(RETRY_INITIAL_SECONDS, RETRY_MAX_SECONDS)
        )
        self._secret = config.relay_secret
        self._wall_clock = wall_clock
        self.pulls: dict[str, Pull] = {}
        # Names whose probe found nothing live: probed again when the call fires.
        self.parked: dict[str, IDelayedCall] = {}
        # Names waiting for a probe (at most max_probes are open), in order.
        self.queued: dict[str, None] = {}
        self.max_probes = max(1, config.max_pulls // 4)
        self.started = 0
        self.refused = 0
        self.parked_total = 0
        # Connections pulls reopened after their first, over the relay's life (a pull's
        # own count ends with it): the metric streamrelay_pull_reconnects_total.
        self.reconnects = 0

    def token_for(self, name: str) -> Callable[[str], str]:
        """Mints a fresh ``relay`` token for ``name`` per connection attempt (the secret
        never leaves this process but as an HMAC)."""

        def mint(url: str) -> str:
            expires = int(self._wall_clock()) + TOKEN_TTL_SECONDS
            return make_token(self._secret, Role.RELAY, name, expires)

        return mint

    # -- streams.Puller ---------------------------------------------------------------------

    @property
    def places_taken(self) -> int:
        """Pulls holding a ``--max-pulls`` place: those the upstream said were live."""
        return sum(1 for pull in self.pulls.values() if pull.was_live)

    def check(self, name: str) -> Refusal | None:
        """503 when ``name`` would need a pull and every place is held by a live one
        (probes for names not live upstream hold none)."""
        if name in self.pulls or name in self.parked or name in self.queued:
            return None
        if self.places_taken < self.config.max_pulls:
            return None
        self.refused += 1
        return Refusal(503, "upstream pull limit reached", retry_after=10)

    @property
    def probes(self) -> int:
        """Pulls not (yet) live upstream: they hold no place."""
        return sum(1 for pull in self.pulls.values() if not pull.was_live)

    def probe_done(self) -> None:
        """A probe ended or went live: queued names may start theirs."""
        while self.queued and self.probes < self.max_probes:
            name = next(iter(self.queued))
            del self.queued[name]
            self._want_again(name)

    def take_place(self, pull: Pull) -> bool:
        """``pull`` went live: True if it may hold a place; if the places filled up
        meanwhile it ends (its viewers wait for the next free place)."""
        if self.places_taken < self.config.max_pulls:
            return True
        self.refused += 1
        _log.warn("Not pulling {stream}: --max-pulls reached", stream=pull.name)
        if self.pulls.get(pull.name) is pull:
            del self.pulls[pull.name]
        pull.stop()
        self.probe_done()
        return False

    def park(self, pull: Pull) -> None:
        """``pull`` found nothing live upstream within its probe: close it and probe
        again later; its viewers stay and wait."""
        if self.pulls.get(pull.name) is not pull:
            return
        del self.pulls[pull.name]
        pull.stop()
        self.parked_total += 1
        self.parked[pull.name] = self.reactor.callLater(PARK_SECONDS, self._unpark, pull.name)
        self.probe_done()

    def _unpark(self, name: str) -> None:
        self.parked.pop(name, None)
        self._want_again(name)

    def _want_again(self, name: str) -> None:
        stream = self.registry.streams.get(name)
        if stream is not None and stream.viewers and not stream.local_publisher:
            self.want(name)

    def _forget_parked(self, name: str) -> None:
        self.queued.pop(name, None)
        call = self.parked.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def want(self, name: str) -> None:
        """Start pulling ``name``, or keep its pull (out of its grace)."""
        pull = self.pulls.get(name)
        if pull is not None:
            pull.keep()
            return
        if name in self.parked or name in self.queued:
            return
        if self.places_taken >= self.config.max_pulls:
            # check() refused such viewers already; a local publisher leaving its viewers
            # behind can still get here.
            self.refused += 1
            _log.warn("Not pulling {stream}: --max-pulls reached", stream=name)
            return
        if self.probes >= self.max_probes:
            self.queued[name] = None
            return
        pull = self.pulls[name] = Pull(self, name)
        self.started += 1
        _log.info("Pulling {stream} from {url}", stream=name, url=pull.client.display_url)
        pull.start()

    def release(self, name: str) -> None:
        """The last local viewer of ``name`` left: its pull ends after the grace."""
        self._forget_parked(name)
        pull = self.pulls.get(name)
        if pull is not None:
            pull.start_grace(self.config.upstream_grace)

    def stop(self, name: str) -> None:
        """End the pull of ``name`` now (a local publisher came, or the grace is over)."""
        self._forget_parked(name)
        pull = self.pulls.pop(name, None)
        if pull is not None:
            _log.info("Stopped pulling {stream}", stream=name)
            pull.stop()
            self._fill_vacancy()
            self.probe_done()

    def _fill_vacancy(self) -> None:
        # Streams left without a pull while the cap was reached (a local publisher left
        # its viewers behind) get the place that just came free.
        for stream in list(self.registry.streams.values()):
            if self.places_taken >= self.config.max_pulls:
                return
            name = stream.name
            if name in self.pulls or name in self.parked or name in self.queued:
                continue
            if stream.viewers and not stream.local_publisher:
                self.want(name)

    def describe(self, name: str) -> dict[str, Any] | None:
        """The pull of ``name`` for ``/api/streams``."""
        pull = self.pulls.get(name)
        return pull.describe() if pull is not None else None

    # -- the rest -----------------------------------------------------------------------------

    def grace_over(self, pull: Pull) -> None:
        """A pull's grace ran out: end it unless a local viewer is back."""
        if self.pulls.get(pull.name) is not pull:
            return
        stream = self.registry.streams.get(pull.name)
        if stream is not None and stream.viewers:
            return
        self.stop(pull.name)

    def stop_all(self) -> defer.Deferred[Any]:
        """End every pull (the relay is stopping); fires when all are closed."""
        pulls = list(self.pulls.values())
        self.pulls.clear()
        self.queued.clear()
        for name in list(self.parked):
            self._forget_parked(name)
        return defer.gatherResults([pull.stop() for pull in pulls], consumeErrors=True)


class UpstreamService(service.Service):
    """Owns the relay's :class:`UpstreamManager`: hooked into the registry from the
    start, every pull closed on stop."""

    name = "upstream"

    def __init__(self, context: RelayContext, reactor: Any) -> None:
        self.manager = UpstreamManager(context.registry, reactor, context.config)
        self._registry = context.registry
        context.registry.puller = self.manager

    def stopService(self) -> defer.Deferred[Any]:  # noqa: N802 (Twisted API)
        """No new pulls; close the open ones."""
        super().stopService()
        self._registry.puller = None
        return self.manager.stop_all()
