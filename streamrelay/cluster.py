"""A relay as a node of a cluster (``--cluster``): the directory wired to the registry
and to the pull machinery of relay to relay (``docs/cluster.md``).

- :class:`ClusterOrigins` is the registry's :class:`~streamrelay.streams.Origins`: a
  local publisher claims its stream in the directory, a clean unpublish releases it, and
  with ``--no-takeover`` a publisher whose stream another node holds (in the cached view)
  gets 409.
- :class:`ClusterPuller` is an :class:`~streamrelay.upstream.UpstreamManager` whose
  locator is the directory: a viewer of a stream published elsewhere starts a pull from
  its origin, once the origin is known (looked up without blocking, then followed); when
  the origin changes, a pull still aimed at the old one starts over towards the new one.
- A stream taken over by a newer epoch on another node has its local publisher closed
  with 4409 (:meth:`~streamrelay.streams.StreamRegistry.give_up`); its viewers stay and
  are then served by a pull from the new origin.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from streamrelay.config import RelayConfig
from streamrelay.context import RelayContext
from streamrelay.directory import ClusterDirectory, DirectoryStore, relay_url
from streamrelay.limits import Refusal
from streamrelay.streams import StreamRegistry
from streamrelay.upstream import UpstreamManager

_log = Logger()


@dataclass(frozen=True)
class WorkerNode:
    """A worker as a node of the cluster (``--workers`` with ``--cluster``): the base URL
    it advertises and the address it serves other nodes' ``/relay`` pulls on."""

    url: str
    interface: str
    port: int


def worker_node(advertise: str, base_port: int, number: int) -> WorkerNode:
    """Worker ``number`` (from 1) of a box advertised at ``advertise``: port
    ``base_port + number - 1`` on the advertised host, bound there when the host is an
    IP address (else on every IPv4 interface: a name may resolve to an address the box does
    not hold, as behind NAT), advertised as plain ``ws://`` (the port speaks no TLS)."""
    if base_port <= 0 or number < 1:
        raise ValueError("a worker node needs a base port and a worker number")
    port = base_port + number - 1
    if port > 65535:
        raise ValueError(f"worker {number}: port {port} is over 65535")
    host = urlsplit(advertise).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        interface, shown = "", host
    else:
        interface = str(address)
        shown = f"[{address}]" if address.version == 6 else str(address)
    return WorkerNode(f"ws://{shown}:{port}", interface, port)


class DirectoryLocator:
    """:class:`~streamrelay.upstream.UpstreamLocator` answering from the directory's
    cached view: the origin's ``/relay/NAME``, or the last one known while none is."""

    def __init__(self, directory: ClusterDirectory) -> None:
        self.directory = directory
        self._last: dict[str, str] = {}

    def urls(self, name: str) -> tuple[str, ...]:
        """The origin's URL for ``name`` (empty when no origin was ever known)."""
        origin = self.directory.elsewhere(name)
        if origin is not None:
            self._last[name] = relay_url(origin.node, name)
        last = self._last.get(name)
        return (last,) if last is not None else ()

    def forget(self, name: str) -> None:
        """No pull of ``name`` is left: drop its last URL."""
        self._last.pop(name, None)


class ClusterPuller(UpstreamManager):
    """Pulls from the origin the directory names (see the module's docstring)."""

    def __init__(
        self,
        registry: StreamRegistry,
        reactor: Any,
        config: RelayConfig,
        directory: ClusterDirectory,
        **kwargs: Any,
    ) -> None:
        self.directory = directory
        self.directory_locator = DirectoryLocator(directory)
        super().__init__(registry, reactor, config, self.directory_locator, **kwargs)
        directory.on_changed = self.origin_changed

    def want(self, name: str) -> None:
        """Pull ``name`` from its origin; when none is cached yet, look it up first (the
        viewers wait, as for a stream nobody publishes)."""
        self.directory.follow(name)
        if name in self.pulls or self.locator.urls(name):
            super().want(name)
            return
        self.directory.lookup(name).addCallback(lambda _: self._retry(name))

    def _retry(self, name: str) -> None:
        stream = self.registry.streams.get(name)
        if (
            stream is not None
            and stream.viewers
            and not stream.local_publisher
            and name not in self.pulls
            and self.locator.urls(name)
        ):
            super().want(name)

    def stop(self, name: str) -> None:
        """End the pull of ``name``; stop following it unless viewers still wait."""
        stream = self.registry.streams.get(name)
        if stream is None or not stream.viewers or stream.local_publisher:
            self.directory.unfollow(name)
            self.directory_locator.forget(name)
        super().stop(name)

    def origin_changed(self, name: str) -> None:
        """The directory has a new origin for ``name``: aim the pull at it."""
        pull = self.pulls.get(name)
        urls = self.locator.urls(name)
        if pull is None:
            self._retry(name)
            return
        if urls and pull.client.display_url != urls[0]:
            _log.info("Stream {stream}: origin now {url}", stream=name, url=urls[0])
            # stop() frees the place and _fill_vacancy() starts the pull over, towards the
            # new origin, for the viewers that stay.
            self.stop(name)


class ClusterOrigins:
    """The registry's :class:`~streamrelay.streams.Origins` backed by the directory."""

    def __init__(self, directory: ClusterDirectory, takeover: bool) -> None:
        self.directory = directory
        self.takeover = takeover

    def published(self, name: str) -> None:
        """Claim ``name`` (a new epoch)."""
        self.directory.publish(name)

    def unpublished(self, name: str) -> None:
        """Release ``name`` (compare-and-delete)."""
        self.directory.unpublish(name)

    def check_publisher(self, name: str) -> Refusal | None:
        """``--no-takeover``: 409 when the cached view (recent enough) puts ``name`` on
        another node.  Otherwise the publisher is admitted and its claim, refused by the
        directory, closes it with 4409 (the handshake never waits for Redis)."""
        if not self.takeover and self.directory.recent(name) is not None:
            return Refusal(409, "stream already has a publisher")
        return None


class ClusterService(service.Service):
    """Joins the cluster: the directory, its heartbeat and the pulls from origins."""

    name = "cluster"

    def __init__(
        self,
        context: RelayContext,
        reactor: Any,
        advertise: str,
        store: DirectoryStore | None = None,
    ) -> None:
        config = context.config
        if store is None:
            # Imported here: txredisapi is the optional "cluster" extra.
            from streamrelay.redis_directory import RedisStore

            store = RedisStore(
                reactor, config.cluster, config.cluster_name,
                password=config.cluster_password, username=config.cluster_username,
            )
        self.directory = ClusterDirectory(
            store, reactor, advertise, takeover=config.takeover
        )
        self.manager = ClusterPuller(context.registry, reactor, config, self.directory)
        self.origins = ClusterOrigins(self.directory, config.takeover)
        self._registry = context.registry
        self.directory.on_lost = context.registry.give_up
        context.registry.puller = self.manager
        context.registry.origins = self.origins

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        """Register and start the heartbeat."""
        super().startService()
        self.directory.start()

    def stopService(self) -> defer.Deferred[Any]:  # noqa: N802 (Twisted API)
        """Release what we hold, close the pulls, disconnect."""
        super().stopService()
        self._registry.puller = None
        self._registry.origins = None
        pulls = self.manager.stop_all()
        released = self.directory.stop()
        return defer.gatherResults([pulls, released], consumeErrors=True)
