"""The cluster directory's core (:mod:`streamrelay.directory`) and its wiring to the
registry (:mod:`streamrelay.cluster`), on a ``Clock`` with an in-memory store that keeps
Redis's semantics (TTLs, a growing epoch, compare-and-delete, notifications)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from streamrelay.cluster import ClusterOrigins, DirectoryLocator
from streamrelay.config import ClusterAddress, parse_cluster_address
from streamrelay.directory import TTL_SECONDS, ClusterDirectory, Origin, relay_url
from streamrelay.limits import Refusal
from tests.test_streams import OFFLINE, Core


class MemoryStore:
    """One shared in-memory directory; ``down`` makes every call fail (Redis gone), and
    ``wipe()`` forgets everything (Redis restarted without persistence)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.epoch = 0
        self.streams: dict[str, tuple[Origin, float]] = {}
        self.nodes: dict[str, float] = {}
        self.subscribers: list[Callable[[str, Origin | None], None]] = []
        self.down = False
        self.calls = 0
        self.heartbeats = 0
        # Deferreds left unanswered (a store that hangs) when set.
        self.hang = False

    def _answer(self, value: Any) -> defer.Deferred[Any]:
        self.calls += 1
        if self.hang:
            return defer.Deferred()
        if self.down:
            return defer.fail(ConnectionError("directory down"))
        return defer.succeed(value)

    def _current(self, name: str) -> Origin | None:
        entry = self.streams.get(name)
        if entry is None or entry[1] <= self.clock.seconds():
            self.streams.pop(name, None)
            return None
        return entry[0]

    def _notify(self, name: str, origin: Origin | None) -> None:
        for subscriber in self.subscribers:
            subscriber(name, origin)

    def claim(self, name: str, node: str, takeover: bool) -> defer.Deferred[Origin | None]:
        if self.down or self.hang:
            return self._answer(None)
        current = self._current(name)
        if not takeover and current is not None and current.node != node:
            return self._answer(None)
        self.epoch = max(self.epoch + 1, current.epoch + 1 if current else 0)
        origin = Origin(node, self.epoch)
        self.streams[name] = (origin, self.clock.seconds() + TTL_SECONDS)
        self._notify(name, origin)
        return self._answer(origin)

    def release(self, name: str, epoch: int) -> defer.Deferred[bool]:
        if self.down or self.hang:
            return self._answer(False)
        current = self._current(name)
        if current is None or current.epoch != epoch:
            return self._answer(False)
        del self.streams[name]
        self._notify(name, None)
        return self._answer(True)

    def heartbeat(self, node: str, held: dict[str, int]) -> defer.Deferred[dict[str, Origin]]:
        if self.down or self.hang:
            return self._answer({})
        self.heartbeats += 1
        self.nodes[node] = self.clock.seconds() + TTL_SECONDS
        lost = {}
        for name, epoch in held.items():
            current = self._current(name)
            if current is not None and current.beats(epoch, node):
                lost[name] = current
            else:
                self.streams[name] = (Origin(node, epoch), self.clock.seconds() + TTL_SECONDS)
                self.epoch = max(self.epoch, epoch)
        return self._answer(lost)

    def lookup(self, names: list[str]) -> defer.Deferred[dict[str, Origin | None]]:
        return self._answer({name: self._current(name) for name in names})

    def listing(self) -> defer.Deferred[dict[str, Origin]]:
        found = {name: self._current(name) for name in list(self.streams)}
        return self._answer({name: origin for name, origin in found.items() if origin})

    def subscribe(self, notified: Callable[[str, Origin | None], None]) -> None:
        self.subscribers.append(notified)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def wipe(self) -> None:
        self.epoch = 0
        self.streams.clear()
        self.nodes.clear()


A, B = "ws://a:8080", "ws://b:8080"


@pytest.fixture
def clock() -> Clock:
    """The shared clock."""
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    """The shared store."""
    return MemoryStore(clock)


class Node(ClusterDirectory):
    """A directory recording what it hands to ``on_lost`` and ``on_changed``."""

    def __init__(self, *arguments: Any, **options: Any) -> None:
        super().__init__(*arguments, **options)
        self.lost: list[str] = []
        self.changed: list[str] = []
        self.on_lost = self.lost.append
        self.on_changed = self.changed.append


def node(store: MemoryStore, clock: Clock, url: str, **options: Any) -> Node:
    """A started directory for node ``url``."""
    directory = Node(store, clock, url, **options)
    directory.start()
    return directory


def result_of(deferred: defer.Deferred[Any]) -> Any:
    """The result of an already fired Deferred."""
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "not fired"
    return results[0]


def test_a_claim_is_seen_by_another_node_and_released_by_compare_and_delete(
    clock: Clock, store: MemoryStore
) -> None:
    """A claims ``cam``; B learns it by notification (no store read needed); A's clean
    unpublish removes it and B learns that too."""
    a, b = node(store, clock, A), node(store, clock, B)
    a.publish("cam")
    assert a.held == {"cam": 1}
    assert b.origin("cam") == Origin(A, 1)
    assert b.elsewhere("cam") == Origin(A, 1) and a.elsewhere("cam") is None
    a.unpublish("cam")
    assert "cam" not in store.streams
    assert b.origin("cam") is None
    assert b.changed == ["cam", "cam"]


def test_a_stale_node_never_removes_a_newer_entry(clock: Clock, store: MemoryStore) -> None:
    """B takes ``cam`` over (epoch 2); A's late release of epoch 1 leaves B's entry."""
    a, b = node(store, clock, A), node(store, clock, B)
    a.publish("cam")
    b.publish("cam")
    assert a.lost == ["cam"] and "cam" not in a.held
    store.release("cam", 1)
    assert store._current("cam") == Origin(B, 2)


def test_takeover_missed_by_notification_is_found_by_the_heartbeat(
    clock: Clock, store: MemoryStore
) -> None:
    """A missed the notification (it was cut off): its next heartbeat answers that a
    newer epoch holds ``cam``, and A gives it up."""
    a = node(store, clock, A)
    a.publish("cam")
    store.subscribers.clear()
    node(store, clock, B).publish("cam")
    assert a.lost == []
    clock.advance(a.heartbeat_seconds)
    assert a.lost == ["cam"]
    assert a.origin("cam") == Origin(B, 2)


def test_one_heartbeat_call_refreshes_every_stream_held(clock: Clock, store: MemoryStore) -> None:
    """Streams held stay in the directory past the TTL, refreshed by one store call per
    heartbeat whatever their number; a node that stops beating loses them within it."""
    a = node(store, clock, A)
    for index in range(50):
        a.publish(f"s{index}")
    before = store.heartbeats
    clock.pump([a.heartbeat_seconds] * 10)
    assert store.heartbeats - before == 10
    assert len(result_of(store.listing())) == 50
    a.stop()
    assert result_of(store.listing()) == {}


def test_an_origin_that_stops_beating_expires_within_the_ttl(
    clock: Clock, store: MemoryStore
) -> None:
    """A crashed origin (no heartbeat, no release) disappears after the TTL."""
    a = node(store, clock, A)
    a.publish("cam")
    assert a._loop is not None
    a._loop.stop()  # the process is gone
    clock.advance(TTL_SECONDS + 0.01)
    assert store._current("cam") is None


def test_store_down_keeps_the_cache_counts_errors_and_reregisters(
    clock: Clock, store: MemoryStore
) -> None:
    """While the store is down, cached origins still answer (stale), errors are counted
    and the heartbeat ages; back (and empty), the next heartbeat re-registers the node
    and its streams, and the epoch counter is raised above the epochs held."""
    a, b = node(store, clock, A), node(store, clock, B)
    a.publish("cam")
    b.follow("cam")
    store.down = True
    clock.pump([1.0] * 5)
    assert b.origin("cam") == Origin(A, 1)
    assert result_of(b.lookup("cam")) == Origin(A, 1)
    assert a.errors >= 5 and b.errors >= 5
    assert a.heartbeat_age >= 4.9
    store.wipe()
    store.down = False
    clock.advance(1.0)
    assert store._current("cam") == Origin(A, 1)
    assert A in store.nodes and store.epoch >= 1
    assert a.heartbeat_age < 1.0


def test_a_claim_made_while_the_store_is_down_is_made_when_it_is_back(
    clock: Clock, store: MemoryStore
) -> None:
    """A publisher arriving while the store is down is claimed at the first heartbeat
    after the store is back."""
    a = node(store, clock, A)
    store.down = True
    a.publish("cam")
    clock.pump([1.0] * 3)
    assert store.streams == {} and a.held == {"cam": 0}
    store.down = False
    clock.advance(1.0)
    assert store._current("cam") == Origin(A, 1) and a.held == {"cam": 1}


def test_a_hanging_store_call_times_out_and_heartbeats_do_not_pile_up(
    clock: Clock, store: MemoryStore
) -> None:
    """A store that never answers: each call is abandoned after the call timeout and
    counted as an error; at most one heartbeat is in flight."""
    a = node(store, clock, A)
    store.hang = True
    calls = store.calls
    clock.advance(1.0)
    clock.advance(1.0)
    assert store.calls - calls == 1
    clock.advance(a.call_timeout)
    assert a.errors >= 1


def test_lookups_are_cached_briefly_and_followed_names_reread(
    clock: Clock, store: MemoryStore
) -> None:
    """A lookup within the cache time answers without the store; a followed name is
    re-read periodically, so a change missed by notification is found."""
    a, b = node(store, clock, A), node(store, clock, B)
    store.subscribers.clear()  # notifications lost
    a.publish("cam")
    assert result_of(b.lookup("cam")) == Origin(A, 1)
    calls = store.calls
    assert result_of(b.lookup("cam")) == Origin(A, 1)
    assert store.calls == calls
    b.follow("cam")
    a.unpublish("cam")
    clock.pump([1.0] * 3)
    assert b.origin("cam") is None and "cam" in b.changed


def test_no_takeover_claim_refused_gives_the_stream_up(clock: Clock, store: MemoryStore) -> None:
    """With takeover off, a claim for a stream another node holds is refused and the
    local publisher is given up; the cached view answers 409 once it knows, while its
    entry is recent."""
    node(store, clock, A).publish("cam")
    store.subscribers.clear()
    b = node(store, clock, B, takeover=False)
    origins = ClusterOrigins(b, takeover=False)
    assert origins.check_publisher("cam") is None  # not known yet
    b.publish("cam")
    assert b.lost == ["cam"]
    b.lookup("cam")
    refusal = origins.check_publisher("cam")
    assert refusal is not None and refusal.status == 409
    # Not followed, never re-read: after a while the entry is no longer trusted (its
    # origin may have died), and the claim decides.
    clock.advance(b.trust_seconds + 0.5)
    assert origins.check_publisher("cam") is None


def test_the_locator_names_the_origin_and_keeps_the_last_one(
    clock: Clock, store: MemoryStore
) -> None:
    """The locator answers the origin's ``/relay/NAME``; once the entry is gone it keeps
    the last URL (a pull keeps retrying there until a new origin is known)."""
    a, b = node(store, clock, A), node(store, clock, B)
    locator = DirectoryLocator(b)
    assert locator.urls("cam") == ()
    a.publish("cam")
    assert locator.urls("cam") == (relay_url(A, "cam"),) == ("ws://a:8080/relay/cam",)
    a.unpublish("cam")
    assert locator.urls("cam") == ("ws://a:8080/relay/cam",)
    locator.forget("cam")
    assert locator.urls("cam") == ()


def test_equal_epochs_after_an_empty_restart_resolve_to_one_origin(
    clock: Clock, store: MemoryStore
) -> None:
    """Two nodes holding the same epoch (claims on both sides of a store restart) settle
    on one origin, the greater node URL, within a heartbeat; the other gives up."""
    a, b = node(store, clock, A), node(store, clock, B)
    a.held["cam"] = 1
    b.held["cam"] = 1
    clock.pump([1.0] * 2)
    assert b.held == {"cam": 1} and "cam" not in a.held
    assert a.lost == ["cam"] and b.lost == []
    assert store._current("cam") == Origin(B, 1)


def test_origin_values_and_cluster_urls_parse() -> None:
    """Stored values and ``--cluster`` URLs: good ones parse, bad ones are refused."""
    assert Origin.decode(b"12 ws://a:1") == Origin("ws://a:1", 12)
    assert Origin.decode(Origin("ws://b", 3).encode()) == Origin("ws://b", 3)
    assert Origin.decode(None) is None and Origin.decode("x ws://a") is None
    assert parse_cluster_address("redis://10.0.0.1:6380/2") == ClusterAddress(
        (("10.0.0.1", 6380),), None, 2
    )
    assert parse_cluster_address("redis://r") == ClusterAddress((("r", 6379),), None, 0)
    assert parse_cluster_address("redis+sentinel://s1,s2:26380/main/1") == ClusterAddress(
        (("s1", 26379), ("s2", 26380)), "main", 1
    )
    for bad in (
        "http://r", "redis://:pw@r/0", "redis://r/x", "redis://a,b/0", "redis://r:0",
        "redis+sentinel://s1:26379", "redis+sentinel://s1/m/x", "redis://r/0?x=1",
    ):
        with pytest.raises(ValueError):
            parse_cluster_address(bad)


class RecordingPuller:
    """A :class:`~streamrelay.streams.Puller` that records what the registry asks."""

    def __init__(self) -> None:
        self.wanted: list[str] = []
        self.stopped: list[str] = []

    def check(self, name: str) -> Refusal | None:
        return None

    def want(self, name: str) -> None:
        self.wanted.append(name)

    def release(self, name: str) -> None:
        pass

    def stop(self, name: str) -> None:
        self.stopped.append(name)

    def describe(self, name: str) -> dict[str, Any] | None:
        return None


def test_a_node_taken_over_closes_its_publisher_and_pulls_for_its_viewers(
    clock: Clock, store: MemoryStore
) -> None:
    """Wired to a registry: a local publisher claims its stream, a clean unpublish
    releases it; taken over by another node, the registry closes the local publisher
    (its ``replaced``: 4409), its viewers see ``offline`` and stay, and a pull is wanted
    for them."""
    core = Core()
    directory = node(store, clock, A)
    directory.on_lost = core.registry.give_up
    core.registry.origins = ClusterOrigins(directory, takeover=True)
    puller = core.registry.puller = RecordingPuller()
    session, link = core.publish("cam")
    _, viewer = core.watch("cam")
    assert store._current("cam") == Origin(A, 1)
    session.close()
    assert store._current("cam") is None
    session, link = core.publish("cam")
    assert store._current("cam") == Origin(A, 2)
    node(store, clock, B).publish("cam")
    assert link.replaced_calls == 1
    assert viewer.texts()[-1] == OFFLINE and not core.registry.streams["cam"].live
    assert puller.wanted[-1] == "cam"
    session.close()  # the 4409 close arrives: nothing else changes, B's entry stays
    assert store._current("cam") == Origin(B, 3)
