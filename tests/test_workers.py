"""``--workers N`` option validation and the supervisor's wiring, network-free (the
processes themselves run in ``tests/integration/test_workers.py``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import cast

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

    spawning = workers._SpawningReactor(Reactor(), lambda number: {3: 16 + number})
    spawning.spawnProcess(object(), "python", ["python"], env={workers.WORKER_VARIABLE: "2"})
    assert calls == [
        {"env": {workers.WORKER_VARIABLE: "2"}, "childFDs": {0: "w", 1: "r", 2: "r", 3: 18}}
    ]
    assert spawning.seconds() == 42.0


class _ListeningPort:
    """What ParkedEndpoint uses of a Twisted TCP port, on a real listening socket."""

    backlog = 512

    def __init__(self, family: int = socket.AF_INET, host: str = "127.0.0.1") -> None:
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.bind((host, 0))
        self.socket.listen(self.backlog)
        self.socket.setblocking(False)
        self.reading = True

    def stopReading(self) -> None:  # noqa: N802
        self.reading = False


def _parked(port: _ListeningPort, count: int) -> workers.ParkedEndpoint:
    from twisted.internet import defer

    class Endpoint:
        def listen(self, factory: object) -> defer.Deferred[_ListeningPort]:
            return defer.succeed(port)

    parked = workers.ParkedEndpoint(Endpoint(), count)
    parked.listen(object())  # type: ignore[arg-type]
    return parked


def _accepted_by(parked: workers.ParkedEndpoint, count: int, connections: int) -> list[int]:
    """Open ``connections`` to the parked address; how many each worker's socket holds."""
    address = parked.port.socket.getsockname()[:2]  # type: ignore[union-attr]
    family = parked.port.socket.family  # type: ignore[union-attr]
    clients = []
    try:
        for _ in range(connections):
            client = socket.socket(family, socket.SOCK_STREAM)
            client.connect(address)
            clients.append(client)
        accepted = []
        for number in range(1, count + 1):
            fd, _ = parked.descriptor(number)
            listening = socket.socket(fileno=os.dup(fd))
            held = 0
            with listening:
                listening.setblocking(False)
                while True:
                    try:
                        listening.accept()[0].close()
                    except BlockingIOError:
                        break
                    held += 1
            accepted.append(held)
        return accepted
    finally:
        for client in clients:
            client.close()


@pytest.mark.skipif(not workers.kernel_balances_reuseport(), reason="Linux only")
@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_parked_tcp_endpoint_gives_each_worker_a_socket_the_kernel_balances(
    family: int, host: str
) -> None:
    """On Linux each of 3 workers gets its own socket of one SO_REUSEPORT group on the
    same address: 150 connections are spread over all three (each far from empty), and
    closing the extra sockets leaves the port itself."""
    port = _ListeningPort(family, host)
    parked = _parked(port, 3)
    try:
        descriptors = {parked.descriptor(number)[0] for number in (1, 2, 3)}
        assert len(descriptors) == 3
        assert parked.descriptor(1)[0] == port.socket.fileno()
        assert all(parked.descriptor(n)[1] == family for n in (1, 2, 3))
        # A restarted worker keeps its number, hence its socket.
        assert parked.descriptor(2) == parked.descriptor(2)
        held = _accepted_by(parked, 3, 150)
        assert sum(held) == 150
        # Binomial(150, 1/3): 50 expected, under 20 about once in 10^7 runs.
        assert min(held) >= 20, held
        for member in parked.extra:
            assert member.getsockname()[:2] == port.socket.getsockname()[:2]
        parked.close_extra()
        assert parked.extra == []
        assert parked.descriptor(2)[0] == port.socket.fileno()
    finally:
        parked.close_extra()
        port.socket.close()


def test_parked_endpoint_shares_one_socket_where_no_group_can_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off Linux, every worker gets the one socket (the kernel hands each connection to
    whichever accepts first)."""
    monkeypatch.setattr(workers, "kernel_balances_reuseport", lambda: False)
    port = _ListeningPort()
    parked = _parked(port, 3)
    try:
        assert {parked.descriptor(n)[0] for n in (1, 2, 3)} == {port.socket.fileno()}
        assert _accepted_by(parked, 1, 10) == [10]
    finally:
        port.socket.close()


@pytest.mark.skipif(not workers.kernel_balances_reuseport(), reason="Linux only")
def test_a_group_that_cannot_form_falls_back_to_the_shared_socket_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When a member socket cannot be made (here the process is out of descriptors at
    the third), the members made so far are closed, every worker shares the port's
    socket, the port leaves the group, and a warning says why."""
    import errno

    from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

    made: list[socket.socket] = []

    def member_socket(family: int) -> socket.socket:
        if len(made) == 2:
            raise OSError(errno.EMFILE, "Too many open files")
        made.append(socket.socket(family, socket.SOCK_STREAM))
        return made[-1]

    monkeypatch.setattr(workers, "_member_socket", member_socket)
    events: list[dict[str, object]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    port = _ListeningPort()
    try:
        parked = _parked(port, 4)
        assert parked.extra == []
        assert {parked.descriptor(n)[0] for n in (1, 2, 3, 4)} == {port.socket.fileno()}
        assert all(member.fileno() == -1 for member in made)
        assert port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        warned = [
            event
            for event in events
            if event.get("log_level") == LogLevel.warn
            and "share one listening socket" in str(event.get("log_format"))
        ]
        assert len(warned) == 1 and "Too many open files" in str(warned[0]["error"])
        assert _accepted_by(parked, 1, 10) == [10]
    finally:
        globalLogPublisher.removeObserver(observer)
        port.socket.close()
