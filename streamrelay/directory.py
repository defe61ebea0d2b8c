"""The cluster directory's network-free core (``--cluster``, ``docs/cluster.md``).

Redis (or any store behind :class:`DirectoryStore`) says *where* each stream is
published: its **origin**, the node its publisher is on, with a **fencing epoch** that
only grows.  :class:`ClusterDirectory` keeps this node's side of it:

- it claims every stream published here (a new epoch each time) and releases it on a
  clean unpublish (compare-and-delete: a stale node never removes a newer entry);
- one heartbeat per second refreshes the node and *all* the streams it holds in one store
  call; the store answers with the streams a newer epoch took from us (a takeover on
  another node), which are handed to ``on_lost``;
- it keeps a cache of the origins it was asked about, refreshed by notifications *and* by
  periodic re-reads (notifications are lost while the store is unreachable), and served
  stale while the store is down, so running pulls and new viewers of known streams go on;
- everything that touches the store is asynchronous: the handshake path reads the cache
  only (:meth:`ClusterDirectory.origin`), it never waits.

Nothing here opens a socket: tests drive it with a ``Clock`` and an in-memory store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger()

HEARTBEAT_SECONDS = 1.0
# A node (and each stream it holds) expires after three missed heartbeats.
TTL_SECONDS = 3.0
# Cached lookups are answered without asking the store for this long.
CACHE_SECONDS = 1.0
# Streams this node cares about are re-read this often (notifications may be lost).
REREAD_SECONDS = 2.0
# Cached origins of names this node does not follow are dropped after this long.
FORGET_SECONDS = 60.0
# A store call that takes longer counts as an error (the store is down or cut off).
CALL_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class Origin:
    """Where a stream is published: the node's advertised URL and the claim's epoch."""

    node: str
    epoch: int

    def beats(self, epoch: int, node: str) -> bool:
        """True when this claim is newer than ``node``'s claim at ``epoch`` (equal epochs,
        possible across a restart of an empty store, go to the greater node URL)."""
        return self.epoch > epoch or (self.epoch == epoch and self.node > node)

    def encode(self) -> str:
        """The stored value: ``EPOCH NODE``."""
        return f"{self.epoch} {self.node}"

    @classmethod
    def decode(cls, value: str | bytes | None) -> Origin | None:
        """Parse a stored value; None for a missing or malformed one."""
        if value is None:
            return None
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        epoch, _, node = text.partition(" ")
        if not epoch.isdigit() or not node:
            return None
        return cls(node, int(epoch))


class DirectoryStore(Protocol):
    """The operations the directory needs from its store (Redis: ``redis_directory``)."""

    def claim(self, name: str, node: str, takeover: bool) -> defer.Deferred[Origin | None]:
        """Make ``node`` the origin of ``name`` with a new epoch and notify; with
        ``takeover`` False, None when another node holds it already."""
        ...

    def release(self, name: str, epoch: int) -> defer.Deferred[bool]:
        """Delete ``name``'s entry if it still holds ``epoch``, and notify."""
        ...

    def heartbeat(self, node: str, held: dict[str, int]) -> defer.Deferred[dict[str, Origin]]:
        """Refresh ``node`` and every stream in ``held`` (re-creating lost entries) in one
        call; answer the streams of ``held`` that a newer epoch took."""
        ...

    def lookup(self, names: list[str]) -> defer.Deferred[dict[str, Origin | None]]:
        """The origins of ``names`` (None: nobody publishes it)."""
        ...

    def listing(self) -> defer.Deferred[dict[str, Origin]]:
        """Every stream of the cluster with its origin."""
        ...

    def subscribe(self, notified: Callable[[str, Origin | None], None]) -> None:
        """Call ``notified(name, origin)`` for every change announced by any node."""
        ...

    def close(self) -> defer.Deferred[None]:
        """Disconnect."""
        ...


class ClusterDirectory:
    """This node's view of the cluster directory (see the module's docstring)."""

    def __init__(
        self,
        store: DirectoryStore,
        clock: IReactorTime,
        node: str,
        *,
        takeover: bool = True,
        heartbeat: float = HEARTBEAT_SECONDS,
        cache_seconds: float = CACHE_SECONDS,
        reread: float = REREAD_SECONDS,
        call_timeout: float = CALL_TIMEOUT_SECONDS,
    ) -> None:
        self.store = store
        self.clock = clock
        self.node = node
        self.takeover = takeover
        self.heartbeat_seconds = heartbeat
        self.cache_seconds = cache_seconds
        self.reread_seconds = reread
        self.call_timeout = call_timeout
        self.trust_seconds = TTL_SECONDS + reread
        # Streams published here, by name: the epoch of our claim (0 while in flight).
        self.held: dict[str, int] = {}
        # What we know of other streams: origin (None: unpublished) and when we read it.
        self.known: dict[str, tuple[Origin | None, float]] = {}
        # Names this node wants to follow (it pulls them, or viewers wait for them).
        self.interest: set[str] = set()
        # A stream we held was taken by a newer epoch elsewhere (or our claim refused).
        self.on_lost: Callable[[str], None] = lambda name: None
        # The origin of a followed stream changed.
        self.on_changed: Callable[[str], None] = lambda name: None
        self.errors = 0
        self.last_heartbeat: float | None = None
        self.started_at = clock.seconds()
        self._beating = False
        self._claiming: set[str] = set()
        self._releasing: set[defer.Deferred[Any]] = set()
        self._last_reread = 0.0
        self._loop: LoopingCall | None = None

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to notifications and start the heartbeat."""
        self.store.subscribe(self.notified)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.heartbeat_seconds, now=True)

    def stop(self) -> defer.Deferred[Any]:
        """Release every stream held here (a clean shutdown), then disconnect."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for name in list(self.held):
            self.release(name)
        # Releases already in flight (publishers closed by the drain) finish first.
        done = defer.gatherResults(list(self._releasing), consumeErrors=True)
        done.addBoth(lambda _: self.store.close())
        return done

    @property
    def heartbeat_age(self) -> float:
        """Seconds since the last successful heartbeat (since start if none yet)."""
        since = self.last_heartbeat if self.last_heartbeat is not None else self.started_at
        return self.clock.seconds() - since

    # -- streams published here -----------------------------------------------------------

    def publish(self, name: str) -> None:
        """A local publisher has ``name``: claim it (no-op when held already)."""
        if name in self.held:
            return
        self.held[name] = 0
        self._claim(name)

    def _claim(self, name: str) -> None:
        # A claim that fails (the store is down) is made again at the next heartbeat.
        self._claiming.add(name)
        claimed = self._call(self.store.claim(name, self.node, self.takeover))
        claimed.addCallbacks(lambda origin: self._claimed(name, origin), lambda failure: None)
        claimed.addBoth(lambda _: self._claiming.discard(name))

    def _claimed(self, name: str, origin: Origin | None) -> None:
        if origin is None:
            # --no-takeover and another node had it first (the cache did not know yet).
            self.held.pop(name, None)
            self.on_lost(name)
            return
        if name not in self.held:
            # Unpublished while the claim was in flight: undo it.
            self._call(self.store.release(name, origin.epoch)).addErrback(lambda _: None)
            return
        self.held[name] = origin.epoch
        self.known[name] = (origin, self.clock.seconds())

    def unpublish(self, name: str) -> defer.Deferred[Any]:
        """The local publisher of ``name`` left cleanly: release it."""
        return self.release(name)

    def release(self, name: str) -> defer.Deferred[Any]:
        """Compare-and-delete our entry of ``name`` (its epoch only)."""
        epoch = self.held.pop(name, None)
        self.known.pop(name, None)
        if not epoch:
            # Not held, or the claim is in flight (_claimed undoes it).
            return defer.succeed(None)
        released = self._call(self.store.release(name, epoch)).addErrback(lambda _: None)
        self._releasing.add(released)
        released.addBoth(self._released, released)
        return released

    def _released(self, result: Any, released: defer.Deferred[Any]) -> Any:
        self._releasing.discard(released)
        return result

    # -- other streams --------------------------------------------------------------------

    def origin(self, name: str) -> Origin | None:
        """The cached origin of ``name`` (never waits; stale while the store is down)."""
        if name in self.held:
            return Origin(self.node, self.held[name])
        entry = self.known.get(name)
        return entry[0] if entry is not None else None

    def elsewhere(self, name: str) -> Origin | None:
        """The cached origin of ``name`` when it is another node, else None."""
        origin = self.origin(name)
        return origin if origin is not None and origin.node != self.node else None

    def recent(self, name: str) -> Origin | None:
        """:meth:`elsewhere`, only when read or notified within the TTL plus a re-read
        period (a followed name always is, while the store answers): an entry learned by
        notification and never refreshed may name an origin that died since."""
        entry = self.known.get(name)
        if entry is None or self.clock.seconds() - entry[1] > self.trust_seconds:
            return None
        return self.elsewhere(name)

    def follow(self, name: str) -> None:
        """Keep ``name``'s origin fresh (re-read periodically) until :meth:`unfollow`."""
        self.interest.add(name)

    def unfollow(self, name: str) -> None:
        """Stop re-reading ``name``."""
        self.interest.discard(name)

    def lookup(self, name: str) -> defer.Deferred[Origin | None]:
        """``name``'s origin: from the cache when fresh, else read from the store (on a
        store error, the stale cache)."""
        entry = self.known.get(name)
        if name in self.held or (
            entry is not None and self.clock.seconds() - entry[1] < self.cache_seconds
        ):
            return defer.succeed(self.origin(name))
        read: defer.Deferred[Any] = self._read([name])
        return read.addBoth(lambda _: self.origin(name))

    def listing(self) -> defer.Deferred[dict[str, Origin]]:
        """Every stream of the cluster and its origin (read from the store)."""
        return self._call(self.store.listing())

    # -- notifications, heartbeat, re-reads ------------------------------------------------

    def notified(self, name: str, origin: Origin | None) -> None:
        """A node announced that ``name``'s origin is now ``origin`` (None: released)."""
        held = self.held.get(name)
        if held is not None:
            if origin is not None and held and origin.beats(held, self.node):
                self._lost(name, origin)
            return
        self._learn(name, origin)

    def tick(self) -> None:
        """Once per heartbeat: refresh what we hold, claim again what failed to be; now
        and then re-read what we follow."""
        for name, epoch in list(self.held.items()):
            if not epoch and name not in self._claiming:
                self._claim(name)
        if not self._beating:
            self._beating = True
            held = {name: epoch for name, epoch in self.held.items() if epoch}
            beat = self._call(self.store.heartbeat(self.node, held))
            beat.addCallback(self._beaten)
            beat.addBoth(self._beat_done)
        now = self.clock.seconds()
        for name, (_, read_at) in list(self.known.items()):
            # Entries learned by notification for names nobody here follows: bounded.
            if name not in self.interest and now - read_at > FORGET_SECONDS:
                del self.known[name]
        if self.interest and now - self._last_reread >= self.reread_seconds:
            self._last_reread = now
            self._read(sorted(self.interest)).addErrback(lambda _: None)

    def _beaten(self, lost: dict[str, Origin]) -> None:
        self.last_heartbeat = self.clock.seconds()
        for name, origin in lost.items():
            if name in self.held and origin.beats(self.held[name], self.node):
                self._lost(name, origin)

    def _beat_done(self, result: Any) -> None:
        self._beating = False
        return None

    def _read(self, names: list[str]) -> defer.Deferred[None]:
        def learned(origins: dict[str, Origin | None]) -> None:
            for name, origin in origins.items():
                if name not in self.held:
                    self._learn(name, origin)

        return self._call(self.store.lookup(names)).addCallback(learned)

    def _learn(self, name: str, origin: Origin | None) -> None:
        previous = self.known.get(name)
        self.known[name] = (origin, self.clock.seconds())
        if previous is None or previous[0] != origin:
            self.on_changed(name)

    def _lost(self, name: str, origin: Origin) -> None:
        _log.info(
            "Stream {stream} taken over by {node} (epoch {epoch})",
            stream=name,
            node=origin.node,
            epoch=origin.epoch,
        )
        self.held.pop(name, None)
        self.known[name] = (origin, self.clock.seconds())
        self.on_lost(name)

    def _call(self, call: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """Bound a store call in time and count its failure."""
        call.addTimeout(self.call_timeout, self.clock)

        def failed(failure: Failure) -> Failure:
            self.errors += 1
            _log.debug("Directory call failed: {error}", error=failure.getErrorMessage())
            return failure

        return call.addErrback(failed)


def relay_url(node: str, name: str) -> str:
    """The ``/relay/NAME`` URL of ``name`` on ``node`` (its advertised base URL)."""
    return node.rstrip("/") + "/relay/" + name

