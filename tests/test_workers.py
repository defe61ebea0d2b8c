"""``--workers N`` option validation and the supervisor's wiring, network-free (the
processes themselves run in ``tests/integration/test_workers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactor
from twisted.python import usage

from streamrelay import tap, workers
from streamrelay.tap import Options
from tests.support.certs import make_certificate


def parse(*arguments: str) -> Options:
    """Parsed options."""
    options = Options()
    options.parseOptions(list(arguments))
    return options


def usage_error(*arguments: str) -> str:
    """The message of the usage error these arguments cause."""
    with pytest.raises(usage.UsageError) as raised:
        parse(*arguments)
    return str(raised.value)


def test_workers_default_to_none_and_keep_the_arguments() -> None:
    """Without --workers nothing changes (0); the arguments are kept for the workers."""
    assert parse().config().workers == 0
    options = parse("--workers", "3", "--listen", "tcp:0")
    assert options.config().workers == 3
    assert options.arguments == ["--workers", "3", "--listen", "tcp:0"]


def test_negative_or_garbage_workers_are_usage_errors() -> None:
    """The error names the option."""
    assert "--workers" in usage_error("--workers", "-1")
    assert "--workers" in usage_error("--workers", "two")


def test_windows_refuses_workers_and_points_at_a_balancer(monkeypatch: pytest.MonkeyPatch) -> None:
    """No descriptor passing for IOCP ports: a clear refusal naming the alternative."""
    monkeypatch.setattr(workers, "is_windows", lambda: True)
    message = usage_error("--workers", "2")
    assert "Windows" in message and "load balancer" in message
    assert parse().config().workers == 0  # without --workers, Windows is fine


def test_workers_refuse_tls_listeners_and_metrics_listen(tmp_path: Path) -> None:
    """Only tcp:, tcp6: and unix: sockets are shared; --metrics-listen is refused."""
    files = make_certificate(tmp_path)
    tls = f"ssl:0:privateKey={files.key}:certKey={files.certificate}"
    assert "terminate TLS" in usage_error("--workers", "2", "--listen", tls)
    assert "--metrics-listen" in usage_error(
        "--workers", "2", "--metrics-listen", "tcp:0:interface=127.0.0.1"
    )
    parse("--workers", "2", "--listen", "tcp6:0", "--listen", "unix:/tmp/x.sock")


def test_supervisor_serves_nothing_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """With --workers, makeService builds the parked listeners, the directory and the
    pool, and no relay; the generated relay secret goes to the workers' environment
    only."""
    monkeypatch.delenv(workers.WORKER_VARIABLE, raising=False)
    monkeypatch.delenv(workers.SECRET_VARIABLE, raising=False)
    options = parse("--workers", "2", "--listen", "tcp:0:interface=127.0.0.1")
    top = tap.makeService(options)
    listeners = [child for child in top if isinstance(child, StreamServerEndpointService)]
    assert len(listeners) == 1
    assert isinstance(listeners[0].endpoint, workers.ParkedEndpoint)
    assert not [child for child in top if isinstance(child, workers.WorkerService)]
    names = {child.name for child in top if isinstance(child, service.Service)}
    assert {"directory", "workers"} <= names
    pool = top.getServiceNamed("workers")
    assert isinstance(pool, workers.WorkerPool)
    secret = pool._environment[workers.SECRET_VARIABLE]
    assert len(secret) == 64
    assert all(secret not in part for part in pool._command)
    top.getServiceNamed("directory").stopService()


def test_parked_endpoint_stops_reading_and_gives_the_descriptor() -> None:
    """The supervisor binds but never accepts."""
    import socket

    from twisted.internet import defer

    class Port:
        reading = True

        def __init__(self) -> None:
            self.socket = socket.socket()

        def stopReading(self) -> None:  # noqa: N802
            self.reading = False

    port = Port()

    class Endpoint:
        def listen(self, factory: object) -> defer.Deferred[Port]:
            return defer.succeed(port)

    parked = workers.ParkedEndpoint(Endpoint())
    parked.listen(object())  # type: ignore[arg-type]
    assert not port.reading
    assert parked.descriptor() == (port.socket.fileno(), int(socket.AF_INET))
    port.socket.close()


def test_spawning_reactor_passes_the_sockets() -> None:
    """Spawned workers get stdin/stdout/stderr pipes plus the listening sockets; the
    rest of the reactor (the monitor's clock) is the real one's."""
    calls: list[dict[str, object]] = []

    class Reactor(MemoryReactor):
        def spawnProcess(self, *args: object, **kwargs: object) -> None:  # noqa: N802
            calls.append(kwargs)

        def seconds(self) -> float:
            return 42.0

    spawning = workers._SpawningReactor(Reactor(), lambda: {3: 17})
    spawning.spawnProcess(object(), "python", ["python"])
    assert calls == [{"childFDs": {0: "w", 1: "r", 2: "r", 3: 17}}]
    assert spawning.seconds() == 42.0


def test_parent_watch_stops_the_reactor_at_end_of_input() -> None:
    """Input is discarded; end-of-file (the supervisor is gone) stops the reactor."""
    import os

    from streamrelay.workers import ParentWatch

    class Reactor:
        running = True
        stopped = False

        def stop(self) -> None:
            self.stopped = True

    reactor = Reactor()
    read, write = os.pipe()
    watch = ParentWatch(reactor, read)
    os.write(write, b"x")
    assert watch.doRead() is None
    os.close(write)
    assert watch.doRead() is not None
    watch.connectionLost(None)  # type: ignore[arg-type]
    assert reactor.stopped
    os.close(read)


def test_supervisor_logs_json_with_json_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """--json-logs gives the supervisor's application a JSON log observer, as a relay's."""
    from twisted.logger import ILogObserver

    monkeypatch.delenv(workers.WORKER_VARIABLE, raising=False)
    top = tap.makeService(parse("--workers", "2", "--json-logs", "--listen", "tcp:0"))
    application = service.Application("test")
    top.setServiceParent(application)
    assert application.getComponent(ILogObserver, None) is not None
    top.getServiceNamed("directory").stopService()
