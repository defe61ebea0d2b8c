"""The workers' directory (``streamrelay.local_directory``), network-free: the epoch and
compare-and-delete core, the server and client protocols over StringTransport, and the
worker's locator and pull manager."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from streamrelay.config import RelayConfig
from streamrelay.context import RelayContext
from streamrelay.local_directory import (
    Directory,
    DirectoryClientFactory,
    DirectoryLocator,
    DirectoryServerFactory,
    origin_message,
)
from streamrelay.workers import WorkerEnvironment, WorkerPuller

T1 = "ws://127.0.0.1:1001/relay/{stream}"
T2 = "ws://127.0.0.1:1002/relay/{stream}"


def lines(transport: StringTransport) -> list[dict[str, Any]]:
    """The JSON lines written to ``transport`` so far (and clear it)."""
    data = transport.value()
    transport.clear()
    return [json.loads(line) for line in data.splitlines() if line]


def test_each_publish_gets_a_growing_epoch_and_the_latest_wins() -> None:
    """Two workers publish the same name: the later one is the origin, with a larger
    epoch."""
    directory = Directory()
    directory.hello(1, T1)
    directory.hello(2, T2)
    first = directory.publish(1, "a")
    second = directory.publish(2, "a")
    assert first is not None and second is not None
    assert second.epoch > first.epoch
    assert directory.origins["a"].worker == 2
    assert second.url("a") == "ws://127.0.0.1:1002/relay/a"


def test_publish_before_hello_is_ignored() -> None:
    """A worker that never said where it serves cannot be an origin."""
    assert Directory().publish(1, "a") is None


def test_unpublish_is_compare_and_delete() -> None:
    """A stale worker or a stale epoch never removes the newer entry."""
    directory = Directory()
    directory.hello(1, T1)
    directory.hello(2, T2)
    old = directory.publish(1, "a")
    new = directory.publish(2, "a")
    assert old is not None and new is not None
    assert not directory.unpublish(1, "a", old.epoch)
    assert not directory.unpublish(2, "a", old.epoch)
    assert directory.origins["a"] == new
    assert directory.unpublish(2, "a", new.epoch)
    assert "a" not in directory.origins


def test_a_gone_worker_loses_its_streams_only() -> None:
    """forget() removes the streams of that worker and keeps the others'."""
    directory = Directory()
    directory.hello(1, T1)
    directory.hello(2, T2)
    directory.publish(1, "a")
    directory.publish(2, "b")
    assert directory.forget(1) == ["a"]
    assert list(directory.origins) == ["b"]


def connect_server(factory: DirectoryServerFactory) -> tuple[Any, StringTransport]:
    """A server protocol for one worker, connected to a StringTransport."""
    protocol: Any = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def two_workers_connected() -> tuple[
    DirectoryServerFactory, tuple[Any, StringTransport], tuple[Any, StringTransport]
]:
    """A directory server with workers 1 (at T1) and 2 (at T2) connected and said hello:
    the factory and each worker's (protocol, transport)."""
    factory = DirectoryServerFactory()
    one, one_out = connect_server(factory)
    two, two_out = connect_server(factory)
    one.lineReceived(json.dumps({"op": "hello", "worker": 1, "url": T1}).encode())
    two.lineReceived(json.dumps({"op": "hello", "worker": 2, "url": T2}).encode())
    return factory, (one, one_out), (two, two_out)


def test_server_broadcasts_origins_and_forgets_a_lost_worker() -> None:
    """Worker 1 publishes: both workers hear it; worker 1's connection drops: both hear
    the stream has no origin; a worker joining later gets the table on connect."""
    factory, (one, one_out), (two, two_out) = two_workers_connected()
    one.lineReceived(b'{"op": "publish", "stream": "a"}')
    expected = {"op": "origin", "stream": "a", "url": "ws://127.0.0.1:1001/relay/a", "epoch": 1}
    assert lines(one_out) == [expected]
    assert lines(two_out) == [expected]
    _, three_out = connect_server(factory)
    assert lines(three_out) == [expected]
    one.connectionLost()
    assert lines(two_out) == [origin_message("a", None)]


def test_server_ignores_garbage_and_anonymous_publishes() -> None:
    """Malformed lines and publishes before hello change nothing."""
    factory = DirectoryServerFactory()
    protocol, out = connect_server(factory)
    protocol.lineReceived(b"not json")
    protocol.lineReceived(b'{"op": "publish", "stream": "a"}')
    assert factory.directory.origins == {}
    assert lines(out) == []


def test_locator_follows_the_directory_and_keeps_the_last_url() -> None:
    """urls() names the origin; after the origin is gone, the last URL (a pull retries
    there); a change of URL calls on_change, a new epoch at the same URL does not."""
    locator = DirectoryLocator(T2)
    changed: list[str] = []
    locator.on_change = changed.append
    assert not locator.located("a")
    locator.update("a", "ws://127.0.0.1:1001/relay/a", 1)
    assert locator.urls("a") == ("ws://127.0.0.1:1001/relay/a",)
    locator.update("a", "ws://127.0.0.1:1001/relay/a", 2)
    locator.update("a", None, None)
    assert locator.urls("a") == ("ws://127.0.0.1:1001/relay/a",)
    locator.update("a", "ws://127.0.0.1:1002/relay/a", 3)
    assert locator.is_own("a")
    assert changed == ["a", "a"]


def test_locator_falls_back_to_the_upstream_templates() -> None:
    """A stream no worker publishes is pulled from --upstream when there is one."""
    locator = DirectoryLocator(T2, ("ws://origin:8080/relay/{stream}",))
    assert locator.urls("x") == ("ws://origin:8080/relay/x",)


def test_client_registers_publishes_and_unpublishes_with_the_epoch() -> None:
    """On connect: hello and every local stream; later only the changes, an unpublish
    carrying the epoch the directory gave."""
    locator = DirectoryLocator(T1)
    published = ["a"]
    factory = DirectoryClientFactory(1, locator, lambda: list(published))
    protocol: Any = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert lines(transport) == [
        {"op": "hello", "worker": 1, "url": T1},
        {"op": "publish", "stream": "a", "takeover": True},
    ]
    protocol.lineReceived(json.dumps(origin_message("a", None) | {"url": "u", "epoch": 7}).encode())
    published.clear()
    factory.report(published)
    factory.report(published)
    assert lines(transport) == [{"op": "unpublish", "stream": "a", "epoch": 7}]


def test_client_without_connection_reports_nothing_and_resends_on_reconnect() -> None:
    """Reports while disconnected are not lost: the next connection sends them all."""
    locator = DirectoryLocator(T1)
    factory = DirectoryClientFactory(1, locator, lambda: ["a", "b"])
    factory.report(["a"])
    protocol: Any = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert [m["op"] for m in lines(transport)] == ["hello", "publish", "publish"]


def worker_puller() -> tuple[WorkerPuller, RelayContext, DirectoryLocator]:
    """A worker's pull manager over a real registry, pulls never connecting."""
    config = RelayConfig(relay_secret=b"s")
    context = RelayContext.create(config, Clock())
    locator = DirectoryLocator(T2)
    puller = WorkerPuller(context, Clock(), locator)
    context.registry.puller = puller
    return puller, context, locator


class _Sink:
    """A viewer sink accepting everything."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def test_worker_pulls_only_once_the_directory_names_an_origin(monkeypatch: Any) -> None:
    """A viewer of an unknown stream starts no pull; the origin's announcement starts
    one; a move to another sibling restarts it there; the worker's own stream is never
    pulled."""
    puller, context, locator = worker_puller()
    started: list[str] = []
    monkeypatch.setattr("streamrelay.upstream.Pull.start", lambda self: started.append(self.name))
    monkeypatch.setattr("streamrelay.upstream.Pull.stop", lambda self: None)
    context.registry.watch("a", _Sink())  # type: ignore[arg-type]
    assert puller.pulls == {}
    locator.update("a", "ws://127.0.0.1:1001/relay/a", 1)
    assert list(puller.pulls) == ["a"] and started == ["a"]
    locator.update("a", "ws://127.0.0.1:1003/relay/a", 2)
    assert started == ["a", "a"]
    assert puller.sources["a"] == "ws://127.0.0.1:1003/relay/a"
    locator.update("a", "ws://127.0.0.1:1002/relay/a", 3)
    assert started == ["a", "a"]


def test_worker_environment_round_trip() -> None:
    """The supervisor's variables give the worker its number, sockets and directory;
    a process without them is no worker."""
    environ = {
        "STREAMRELAY_WORKER": "2",
        "STREAMRELAY_WORKER_FDS": "3:2,4:10",
        "STREAMRELAY_WORKER_DIRECTORY": "/tmp/x/directory.sock",
    }
    worker = WorkerEnvironment.from_environment(environ)
    assert worker == WorkerEnvironment(2, ((3, 2), (4, 10)), "/tmp/x/directory.sock")
    assert WorkerEnvironment.from_environment({}) is None


def test_a_newer_publish_on_a_sibling_supersedes_this_origin_only() -> None:
    """on_superseded runs when another worker is named for a stream this worker was told
    it holds; not for an origin announced before this worker's own publish was
    registered, nor when the stream merely loses its origin."""
    locator = DirectoryLocator(T2)
    superseded: list[str] = []
    locator.on_superseded = superseded.append
    locator.update("a", "ws://127.0.0.1:1001/relay/a", 1)  # older, before our publish
    assert superseded == []
    locator.update("a", "ws://127.0.0.1:1002/relay/a", 2)  # our publish registered
    assert locator.own_epochs == {"a": 2}
    locator.update("a", "ws://127.0.0.1:1001/relay/a", 3)  # a sibling's newer publish
    assert superseded == ["a"] and locator.own_epochs == {}
    locator.update("b", "ws://127.0.0.1:1002/relay/b", 4)
    locator.update("b", None, None)
    assert superseded == ["a"]


def test_superseded_worker_closes_its_publisher_with_4409_and_pulls(monkeypatch: Any) -> None:
    """Worker 2 was the origin of "a" with a viewer; worker 1's newer publish wins: the
    local publisher is told it was replaced (4409), the viewer stays and a pull from
    worker 1 starts; the unpublish that follows does not remove worker 1's entry."""
    from tests.test_streams import FakePublisher, FakeViewer

    puller, context, locator = worker_puller()
    locator.on_superseded = context.registry.give_up
    started: list[str] = []
    monkeypatch.setattr("streamrelay.upstream.Pull.start", lambda self: started.append(self.name))
    monkeypatch.setattr("streamrelay.upstream.Pull.stop", lambda self: None)
    link = FakePublisher(peer_address="127.0.0.1:5000", clock=Clock())
    context.registry.publish("a", link)  # type: ignore[arg-type]
    context.registry.watch("a", FakeViewer())
    published = ["a"]
    factory = DirectoryClientFactory(2, locator, lambda: list(published))
    protocol: Any = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    lines(transport)
    own = {"url": T2.replace("{stream}", "a"), "epoch": 5}
    protocol.lineReceived(json.dumps(origin_message("a", None) | own).encode())
    assert link.replaced_calls == 0 and started == []
    newer = {"url": T1.replace("{stream}", "a"), "epoch": 6}
    protocol.lineReceived(json.dumps(origin_message("a", None) | newer).encode())
    assert link.replaced_calls == 1
    stream = context.registry.streams["a"]
    assert not stream.local_publisher and len(stream.viewers) == 1
    assert started == ["a"] and puller.sources["a"] == "ws://127.0.0.1:1001/relay/a"
    published.clear()
    factory.report(published)
    (unpublish,) = lines(transport)
    assert unpublish["op"] == "unpublish" and unpublish["stream"] == "a"
    directory = Directory()
    directory.hello(1, T1)
    directory.hello(2, T2)
    directory.publish(2, "a")
    directory.publish(1, "a")
    assert not directory.unpublish(2, "a", unpublish["epoch"])
    assert directory.origins["a"].worker == 1


def test_no_takeover_publish_on_a_sibling_is_refused_to_that_worker_only() -> None:
    """A publish with ``takeover: false`` for a stream a sibling holds is answered with
    ``refused`` to the sender alone and changes nothing; the holder itself may publish
    again, and with takeover (the default) the newer publish wins as before."""
    factory, (one, one_out), (two, two_out) = two_workers_connected()
    one.lineReceived(b'{"op": "publish", "stream": "a", "takeover": false}')
    lines(one_out), lines(two_out)
    two.lineReceived(b'{"op": "publish", "stream": "a", "takeover": false}')
    assert lines(two_out) == [{"op": "refused", "stream": "a"}]
    assert lines(one_out) == []
    assert factory.directory.origins["a"].worker == 1
    one.lineReceived(b'{"op": "publish", "stream": "a", "takeover": false}')
    assert factory.directory.origins["a"].worker == 1 and factory.directory.origins["a"].epoch == 2
    two.lineReceived(b'{"op": "publish", "stream": "a", "takeover": true}')
    assert factory.directory.origins["a"].worker == 2


def test_a_refused_publish_closes_the_local_publisher_and_no_takeover_answers_409() -> None:
    """Worker side of ``--no-takeover``: a handshake for a stream the directory puts on a
    sibling is refused with 409; a publisher that raced past that check is closed when
    the directory answers ``refused``, and its stream is no longer reported."""
    from streamrelay.workers import WorkerOrigins
    from tests.test_streams import FakePublisher

    _, context, locator = worker_puller()
    origins = WorkerOrigins(locator, takeover=False)
    context.registry.origins = origins
    locator.on_refused = context.registry.give_up
    link = FakePublisher(peer_address="127.0.0.1:5000", clock=Clock())
    context.registry.publish("a", link)  # type: ignore[arg-type]
    published = ["a"]
    factory = DirectoryClientFactory(2, locator, lambda: list(published), takeover=False)
    protocol: Any = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert {"op": "publish", "stream": "a", "takeover": False} in lines(transport)
    protocol.lineReceived(b'{"op": "refused", "stream": "a"}')
    assert link.replaced_calls == 1
    stream = context.registry.streams.get("a")
    assert stream is None or not stream.local_publisher
    assert "a" not in factory.reported
    sibling = {"url": T1.replace("{stream}", "a"), "epoch": 3}
    protocol.lineReceived(json.dumps(origin_message("a", None) | sibling).encode())
    refusal = context.registry.check_publisher("a")
    assert refusal is not None and refusal.status == 409
    assert context.registry.check_publisher("b") is None
    assert WorkerOrigins(locator, takeover=True).check_publisher("a") is None

