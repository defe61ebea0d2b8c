"""The directory of one box's workers (``--workers N`` without ``--cluster``): which
worker publishes which stream, kept by the supervising process and followed by every
worker (``docs/cluster.md``, "One box, many cores").

The supervisor listens on a UNIX socket in a private temporary folder and speaks a tiny
line-JSON protocol with its workers:

- worker -> directory: ``{"op": "hello", "worker": 1, "url": "ws://127.0.0.1:P/relay/{stream}"}``
  (the template its siblings pull from), ``{"op": "publish", "stream": S, "takeover": B}``
  and ``{"op": "unpublish", "stream": S, "epoch": E}``;
- directory -> every worker: ``{"op": "origin", "stream": S, "url": U, "epoch": E}``, ``url``
  null when the stream has no origin any more;
- directory -> one worker: ``{"op": "refused", "stream": S}`` when its publish came with
  ``"takeover": false`` (``--no-takeover``) and a sibling holds ``S``: the worker closes
  its publisher, as a cluster node does when its claim is refused.

:class:`Directory` is the core (no I/O): each publish gets a new, ever growing epoch and
the latest publish wins; an unpublish removes the entry only if it still names that
worker and epoch (compare-and-delete), and a worker whose connection is gone loses all
its entries.  :class:`DirectoryLocator` is the worker's view of it: an
:class:`~streamrelay.upstream.UpstreamLocator` whose answers are local (no lookup on the
reactor thread waits for anything), plus a callback when a stream's origin changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.protocol import Factory, ReconnectingClientFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from streamrelay.config import STREAM_PLACEHOLDER

_log = Logger()

MAX_LINE = 4096


@dataclass(frozen=True)
class Origin:
    """Where a stream is published: the worker, its pull URL template, the epoch."""

    worker: int
    template: str
    epoch: int

    def url(self, stream: str) -> str:
        """The ``/relay/STREAM`` URL of this origin."""
        return self.template.replace(STREAM_PLACEHOLDER, stream)


@dataclass
class Directory:
    """Stream -> origin, with fencing epochs (no I/O)."""

    origins: dict[str, Origin] = field(default_factory=dict)
    templates: dict[int, str] = field(default_factory=dict)
    last_epoch: int = 0

    def hello(self, worker: int, template: str) -> None:
        """``worker`` serves sibling pulls at ``template``."""
        self.templates[worker] = template

    def publish(self, worker: int, stream: str) -> Origin | None:
        """``worker`` has a publisher for ``stream``: it becomes the origin with a new
        epoch (None if the worker never said hello)."""
        template = self.templates.get(worker)
        if template is None:
            return None
        self.last_epoch += 1
        origin = self.origins[stream] = Origin(worker, template, self.last_epoch)
        return origin

    def unpublish(self, worker: int, stream: str, epoch: int | None) -> bool:
        """Remove ``stream``'s entry if it is still ``worker``'s (at ``epoch`` when
        given): a stale worker never removes a newer entry.  True when removed."""
        origin = self.origins.get(stream)
        if origin is None or origin.worker != worker:
            return False
        if epoch is not None and origin.epoch != epoch:
            return False
        del self.origins[stream]
        return True

    def forget(self, worker: int) -> list[str]:
        """``worker`` is gone: its streams have no origin any more (their names)."""
        self.templates.pop(worker, None)
        gone = [name for name, origin in self.origins.items() if origin.worker == worker]
        for name in gone:
            del self.origins[name]
        return gone


def origin_message(stream: str, origin: Origin | None) -> dict[str, Any]:
    """The broadcast telling workers ``stream``'s origin (or that it has none)."""
    if origin is None:
        return {"op": "origin", "stream": stream, "url": None, "epoch": None}
    return {"op": "origin", "stream": stream, "url": origin.url(stream), "epoch": origin.epoch}


class _JsonLines(LineOnlyReceiver):
    """One JSON object per line, bounded."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def send(self, message: dict[str, Any]) -> None:
        """Write ``message`` as one line."""
        self.sendLine(json.dumps(message, separators=(",", ":")).encode())

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted API)
        """Decode a line; a malformed one is logged and ignored."""
        try:
            message = json.loads(line)
        except ValueError:
            _log.warn("Directory: malformed line ignored")
            return
        if isinstance(message, dict):
            self.received(message)

    def received(self, message: dict[str, Any]) -> None:
        """Handle one message."""
        raise NotImplementedError


class DirectoryServerProtocol(_JsonLines):
    """The supervisor's end of one worker's connection."""

    factory: DirectoryServerFactory
    worker: int | None = None

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        """Join the broadcast list and send the current table."""
        self.factory.peers.append(self)
        for name, origin in self.factory.directory.origins.items():
            self.send(origin_message(name, origin))

    def received(self, message: dict[str, Any]) -> None:
        """hello / publish / unpublish from the worker."""
        directory, op = self.factory.directory, message.get("op")
        if op == "hello" and isinstance(message.get("worker"), int):
            self.worker = message["worker"]
            directory.hello(message["worker"], str(message.get("url", "")))
            return
        stream = message.get("stream")
        if self.worker is None or not isinstance(stream, str):
            return
        if op == "publish":
            current = directory.origins.get(stream)
            if message.get("takeover") is False and current and current.worker != self.worker:
                # --no-takeover: a sibling holds the stream; the first publisher stays.
                self.send({"op": "refused", "stream": stream})
                return
            origin = directory.publish(self.worker, stream)
            if origin is not None:
                self.factory.broadcast(origin_message(stream, origin))
        elif op == "unpublish":
            epoch = message.get("epoch")
            if directory.unpublish(self.worker, stream, epoch if isinstance(epoch, int) else None):
                self.factory.broadcast(origin_message(stream, None))

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 (Twisted API)
        """The worker is gone (exited or killed): its streams lose their origin."""
        if self in self.factory.peers:
            self.factory.peers.remove(self)
        if self.worker is not None:
            for name in self.factory.directory.forget(self.worker):
                self.factory.broadcast(origin_message(name, None))


class DirectoryServerFactory(Factory):
    """The supervisor's directory service for its workers."""

    protocol = DirectoryServerProtocol  # type: ignore[assignment]

    def __init__(self, directory: Directory | None = None) -> None:
        self.directory = directory or Directory()
        self.peers: list[DirectoryServerProtocol] = []

    def broadcast(self, message: dict[str, Any]) -> None:
        """Send ``message`` to every connected worker."""
        for peer in list(self.peers):
            peer.send(message)


class DirectoryLocator:
    """A worker's view of the directory: an :class:`~streamrelay.upstream.UpstreamLocator`.

    ``urls(name)`` answers from the table the directory pushes (never blocking); a stream
    that lost its origin keeps its last URL, so a pull retries where it was until the
    directory names a new origin.  ``on_change(name)`` runs when ``name``'s origin URL
    changes; ``located(name)`` says whether a URL is known at all.
    ``on_superseded(name)`` runs first when the directory names another worker as the
    origin of a stream this worker was the origin of (a newer publish on a sibling won):
    the worker closes its publisher with 4409, and its viewers are then pulled for.
    Only an origin this worker was told it holds can be superseded: a publisher that
    arrived here after the sibling's but is not registered yet is not closed by the
    older announcement (its own publish, later, wins).
    """

    def __init__(self, own_template: str, fallback: tuple[str, ...] = ()) -> None:
        self.own_template = own_template
        self.fallback = fallback
        self.current: dict[str, str] = {}
        self.epochs: dict[str, int] = {}
        self.last: dict[str, str] = {}
        self.own_epochs: dict[str, int] = {}
        self.on_change: Callable[[str], None] = lambda name: None
        self.on_superseded: Callable[[str], None] = lambda name: None
        self.on_refused: Callable[[str], None] = lambda name: None

    def urls(self, name: str) -> tuple[str, ...]:
        """The origin's ``/relay/NAME`` URL, else the last known one, else the
        ``--upstream`` templates."""
        url = self.current.get(name) or self.last.get(name)
        if url is not None:
            return (url,)
        return tuple(t.replace(STREAM_PLACEHOLDER, name) for t in self.fallback)

    def located(self, name: str) -> bool:
        """True when there is somewhere to pull ``name`` from."""
        return bool(self.urls(name))

    def is_own(self, name: str) -> bool:
        """True when this worker is ``name``'s origin."""
        return self.current.get(name) == self.own_template.replace(STREAM_PLACEHOLDER, name)

    def update(self, name: str, url: str | None, epoch: int | None) -> None:
        """The directory says ``name``'s origin is now ``url`` (None: no origin)."""
        before = self.current.get(name)
        own = url is not None and url == self.own_template.replace(STREAM_PLACEHOLDER, name)
        held = self.own_epochs.pop(name, None)
        if own and epoch is not None:
            self.own_epochs[name] = epoch
        if url is None:
            self.current.pop(name, None)
            self.epochs.pop(name, None)
        else:
            self.current[name] = self.last[name] = url
            if epoch is not None:
                self.epochs[name] = epoch
        if held is not None and url is not None and not own:
            self.on_superseded(name)
        if url is not None and url != before:
            self.on_change(name)

    def reset(self) -> None:
        """The connection to the directory is back: the table comes anew."""
        self.current.clear()
        self.epochs.clear()
        self.own_epochs.clear()


class DirectoryClientProtocol(_JsonLines):
    """A worker's connection to the directory."""

    factory: DirectoryClientFactory

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        """Say hello and register every stream published here."""
        client = self.factory
        client.resetDelay()
        client.connection = self
        client.locator.reset()
        client.reported = set()
        self.send({"op": "hello", "worker": client.worker, "url": client.locator.own_template})
        client.report(client.published())

    def received(self, message: dict[str, Any]) -> None:
        """An origin changed, or our publish was refused (``--no-takeover``)."""
        if message.get("op") == "refused" and isinstance(message.get("stream"), str):
            self.factory.reported.discard(message["stream"])
            self.factory.locator.on_refused(message["stream"])
            return
        if message.get("op") == "origin" and isinstance(message.get("stream"), str):
            url, epoch = message.get("url"), message.get("epoch")
            self.factory.locator.update(
                message["stream"],
                url if isinstance(url, str) else None,
                epoch if isinstance(epoch, int) else None,
            )

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 (Twisted API)
        """Forget the connection; the factory reconnects."""
        if self.factory.connection is self:
            self.factory.connection = None


class DirectoryClientFactory(ReconnectingClientFactory):
    """Keeps a worker connected to the directory and its publishes registered."""

    protocol = DirectoryClientProtocol  # type: ignore[assignment]
    maxDelay = 2
    initialDelay = 0.1  # type: ignore[assignment]

    def __init__(
        self,
        worker: int,
        locator: DirectoryLocator,
        published: Callable[[], Iterable[str]],
        takeover: bool = True,
    ) -> None:
        self.worker = worker
        self.locator = locator
        self.published = published
        self.takeover = takeover
        self.connection: DirectoryClientProtocol | None = None
        self.reported: set[str] = set()

    def report(self, now: Iterable[str]) -> None:
        """Tell the directory what changed since the last report."""
        connection = self.connection
        if connection is None:
            return
        current = set(now)
        for name in sorted(current - self.reported):
            connection.send({"op": "publish", "stream": name, "takeover": self.takeover})
        for name in sorted(self.reported - current):
            epoch = self.locator.own_epochs.get(name, self.locator.epochs.get(name))
            connection.send({"op": "unpublish", "stream": name, "epoch": epoch})
        self.reported = current
