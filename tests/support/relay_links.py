"""Relays that connect to each other in memory, on one ``Clock``: the network-free
harness of the relay-to-relay and client tests.

Every relay is a :class:`tests.fakes.Relay` (the real site, gate and protocols) known by
an address such as ``origin:8080``; :meth:`Network.endpoint` is the endpoint factory a
:class:`~streamrelay.client.StreamClient` (or an edge's pull manager) connects with, and
each connection it makes is a :class:`Link`, an in-memory TCP connection that
:meth:`Network.flush` pumps both ways.  A link can go dark (a black hole: nothing moves,
nothing closes) and a relay can die (every link to it lost, new connections refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from streamrelay.client import ClientSettings, StreamClient, StreamListener
from streamrelay.config import RelayConfig
from streamrelay.upstream import UpstreamManager
from streamrelay.wire import MediaMessage
from streamrelay.wsclient.backoff import Backoff
from streamrelay.wsclient.target import RelayTarget
from tests.fakes import Relay

SECRET = b"relay-test-secret"


class Link:
    """One in-memory TCP connection from a client to a relay."""

    def __init__(self, network: Network, relay: Relay, client: Any, port: int) -> None:
        self.network = network
        self.relay = relay
        peer = IPv4Address("TCP", "127.0.0.1", port)
        host = IPv4Address("TCP", "127.0.0.1", 8080)
        self.server = relay.site.buildProtocol(peer)
        self.client = client
        self.server_io = iosim.FakeTransport(self.server, True, host, peer)
        self.client_io = iosim.FakeTransport(client, False, peer, host)
        self.dark = False
        self.gone = False
        self.pump = iosim.IOPump(
            client, self.server, self.client_io, self.server_io, False, clock=network.clock
        )
        self.server.makeConnection(self.server_io)
        client.makeConnection(self.client_io)

    def step(self) -> bool:
        """Move what waits, both ways; True if anything moved or closed."""
        if self.gone:
            return False
        if self.dark:
            # Nothing crosses a black hole, but a side that closes its own socket learns
            # at once; the other never does.
            changed = False
            for io in (self.client_io, self.server_io):
                if io.disconnecting and not io.disconnected:
                    io.disconnected = True
                    io.reportDisconnect()
                    changed = True
            self.gone = bool(self.client_io.disconnected and self.server_io.disconnected)
            return changed
        moved = bool(self.pump.pump(advanceClock=False))
        if self.server_io.disconnected and self.client_io.disconnected:
            self.gone = True
        return moved

    def cut(self) -> None:
        """Both ends lose the connection at once (a process died, its kernel reset it)."""
        if self.gone:
            return
        self.gone = True
        for io in (self.server_io, self.client_io):
            io.disconnecting = True
            io.disconnected = True
        self.server.connectionLost(Failure(ConnectionLost()))
        self.client.connectionLost(Failure(ConnectionLost()))


@implementer(IStreamClientEndpoint)
@dataclass
class _Endpoint:
    network: Network
    target: RelayTarget

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        return self.network.connect(self.target, factory)


@dataclass
class Network:
    """Relays by address, on one clock, and the links between them."""

    clock: Clock = field(default_factory=Clock)
    relays: dict[str, Relay] = field(default_factory=dict)
    links: list[Link] = field(default_factory=list)
    connects: dict[str, int] = field(default_factory=dict)
    _next_port: int = 50000

    def relay(self, address: str, **overrides: Any) -> Relay:
        """A relay at ``address`` (``host:port``) with a relay secret, so edges may pull."""
        overrides.setdefault("relay_secret", SECRET)
        relay = Relay(config=RelayConfig(**overrides), clock=self.clock)
        self.relays[address] = relay
        return relay

    def edge(self, address: str, upstream: str, **overrides: Any) -> tuple[Relay, UpstreamManager]:
        """A relay at ``address`` pulling from ``upstream`` (an address here)."""
        upstreams = tuple(f"ws://{item}/relay/{{stream}}" for item in upstream.split())
        relay = self.relay(address, upstream=upstreams, **overrides)
        manager = UpstreamManager(
            relay.context.registry,
            self.clock,
            relay.config,
            endpoint_factory=self.endpoint,
            backoff_factory=lambda: Backoff(0.1, 1.0, uniform=lambda: 1.0),
        )
        relay.context.registry.puller = manager
        return relay, manager

    def endpoint(self, reactor: Any, target: RelayTarget, insecure: bool) -> _Endpoint:
        """The endpoint factory of clients in this network."""
        return _Endpoint(self, target)

    def connect(self, target: RelayTarget, factory: IProtocolFactory) -> defer.Deferred[Any]:
        """A connection to the relay at ``target``'s address, or refused."""
        address = f"{target.host}:{target.port}"
        self.connects[address] = self.connects.get(address, 0) + 1
        relay = self.relays.get(address)
        if relay is None:
            return defer.fail(ConnectionRefusedError(address))
        self._next_port += 1
        client = factory.buildProtocol(IPv4Address("TCP", target.host, target.port))
        self.links.append(Link(self, relay, client, self._next_port))
        return defer.succeed(client)

    def flush(self, limit: int = 10_000) -> None:
        """Pump every link and run every call due now until nothing moves."""
        for _ in range(limit):
            self.clock.advance(0)
            moved = False
            for link in list(self.links):
                moved = link.step() or moved
            self.links = [link for link in self.links if not link.gone]
            for relay in self.relays.values():
                relay.settle()
            now = self.clock.seconds()
            if not moved and not [c for c in self.clock.getDelayedCalls() if c.getTime() <= now]:
                return
        raise AssertionError("the network never settles")

    def tick(self, seconds: float, step: float = 0.05) -> None:
        """Let ``seconds`` pass in small steps, pumping as a reactor would."""
        target = self.clock.seconds() + seconds
        self.flush()
        while self.clock.seconds() + step < target:
            self.clock.advance(step)
            self.flush()
        self.clock.advance(max(0.0, target - self.clock.seconds()))
        self.flush()

    def kill(self, address: str) -> None:
        """The relay at ``address`` dies: its links are cut, new connections refused."""
        relay = self.relays.pop(address)
        for link in self.links:
            if link.relay is relay:
                link.cut()
        self.flush()

    def revive(self, address: str, relay: Relay) -> None:
        """A relay (a new one) answers at ``address`` again."""
        self.relays[address] = relay

    def links_to(self, address: str) -> list[Link]:
        """Open links to the relay at ``address``."""
        relay = self.relays.get(address)
        return [link for link in self.links if link.relay is relay and not link.gone]


class Recorder(StreamListener):
    """A listener that records everything in order: ``("status", live)``,
    ``("meta", dict)``, ``("media", MediaMessage)``, ``("dropped", n)``, ``("text", dict)``,
    ``("opened",)``, ``("closed", why)``."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def opened(self, client: StreamClient) -> None:
        self.events.append(("opened",))

    def status(self, live: bool) -> None:
        self.events.append(("status", live))

    def meta(self, raw: bytes, meta: dict[str, Any]) -> None:
        assert json.loads(raw) == meta
        self.events.append(("meta", meta))

    def media(self, message: MediaMessage) -> None:
        self.events.append(("media", message))

    def dropped(self, count: int) -> None:
        self.events.append(("dropped", count))

    def text(self, message: dict[str, Any]) -> None:
        self.events.append(("text", message))

    def closed(self, why: str) -> None:
        self.events.append(("closed", why))

    def media_times(self) -> list[int]:
        """Capture times of the media received, in order."""
        return [event[1].capture_time_us for event in self.events if event[0] == "media"]

    def kinds(self) -> list[str]:
        """What arrived, in order, media as ``K`` (KEY), ``C`` (CONFIG) or ``d``."""
        shown = []
        for event in self.events:
            if event[0] == "media":
                message = event[1]
                shown.append("K" if message.is_key else "C" if message.is_config else "d")
            elif event[0] == "status":
                shown.append("live" if event[1] else "offline")
            else:
                shown.append(event[0])
        return shown


def watcher(network: Network, url: str, **settings: Any) -> tuple[StreamClient, Recorder]:
    """A started :class:`StreamClient` in ``network`` with a :class:`Recorder`."""
    recorder = Recorder()
    settings.setdefault("retry_initial", 0.1)
    settings.setdefault("retry_max", 1.0)
    client = StreamClient(
        ClientSettings(url, **settings),
        recorder,
        network.clock,
        backoff=Backoff(settings["retry_initial"], settings["retry_max"], uniform=lambda: 1.0),
        endpoint_factory=network.endpoint,
    )
    client.start()
    network.flush()
    return client, recorder
