"""``--workers N``: one box, many cores (``docs/cluster.md``, "One box, many cores").

The supervising process (twistd, or the ``streamrelay`` console script) binds every
``--listen`` socket and never accepts on it: it runs N worker processes, each
``python -m streamrelay`` with the same arguments, that adopt the listening sockets
(``reactor.adoptStreamPort``, the descriptors passed as ``childFDs``).  On Linux a TCP
listener becomes one ``SO_REUSEPORT`` socket per worker, so the kernel spreads
connections evenly among them (elsewhere they share the one socket).  The workers are
supervised by Twisted's stock :class:`~twisted.runner.procmon.ProcessMonitor`
(restarted with a doubling delay while they keep dying young, their output logged line
by line, prefixed ``[worker N]``); SIGTERM stops the monitor, which forwards SIGTERM to
each worker (each drains as a relay does: 503 to new handshakes, 1001 to WebSockets) and
SIGKILLs a worker still alive after a bound.

The supervisor is also the workers' directory (:mod:`streamrelay.local_directory`) over
a UNIX socket in a private temporary folder.  Each worker listens on a private loopback
port for ``/relay/NAME`` pulls by its siblings and registers the streams published on
it; a worker with a viewer of a stream published on a sibling pulls it from there with
the upstream machinery (:class:`WorkerPuller`).  The pulls are authenticated with relay
tokens signed by ``--relay-secret-file`` when given, else by a secret the supervisor
generates in memory and hands to its workers in their environment (never in argv, never
logged).

With ``--cluster`` the local directory is not started: every worker is a node of the
cluster (:mod:`streamrelay.cluster`, Redis as the directory) and serves other nodes'
pulls on its own ``--worker-relay-ports`` port instead of the private loopback one.

What a worker learns from its environment (set by the supervisor only):
``STREAMRELAY_WORKER`` (its number), ``STREAMRELAY_WORKER_FDS`` (``fd:family`` of each
adopted socket, in ``--listen`` order) and ``STREAMRELAY_WORKER_DIRECTORY`` (the socket).

Over 400 lines because both halves live here: the worker side and the supervisor side
share that environment contract and are read together.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.runtime import platform
from zope.interface import implementer

from streamrelay.cluster import WorkerNode
from streamrelay.config import RelayConfig
from streamrelay.context import RelayContext
from streamrelay.limits import Refusal
from streamrelay.local_directory import (
    DirectoryClientFactory,
    DirectoryLocator,
    DirectoryServerFactory,
)
from streamrelay.upstream import UpstreamManager

_log = Logger()

WORKER_VARIABLE = "STREAMRELAY_WORKER"
FDS_VARIABLE = "STREAMRELAY_WORKER_FDS"
DIRECTORY_VARIABLE = "STREAMRELAY_WORKER_DIRECTORY"
SECRET_VARIABLE = "STREAMRELAY_RELAY_SECRET"
FIRST_FD = 3
# How often a worker compares its local publishers with what it told the directory.
REPORT_INTERVAL = 0.1
SIBLING_LISTEN = "tcp:0:interface=127.0.0.1"
ADOPTABLE = ("tcp", "tcp6", "unix")
BALANCER_HINT = (
    "run several relays (each without --workers) behind a load balancer such as nginx "
    "or HAProxy, with --upstream or --cluster between them (docs/cluster.md)"
)


def is_windows() -> bool:
    """True on Windows (patched by tests)."""
    return platform.isWindows()


def check_options(config: RelayConfig, listen: list[str], metrics_listen: list[str]) -> None:
    """Refuse what ``--workers`` cannot do (UsageError)."""
    if not config.workers:
        return
    if is_windows():
        raise usage.UsageError(
            "--workers is not available on Windows (its IOCP reactor cannot share a "
            f"listening socket between processes): {BALANCER_HINT}"
        )
    for description in listen:
        kind = description.split(":", 1)[0].lower()
        if kind not in ADOPTABLE:
            raise usage.UsageError(
                f"--workers: --listen {description!r}: workers share tcp:, tcp6: and unix: "
                "listeners only (terminate TLS in a proxy in front of them)"
            )
    if metrics_listen:
        raise usage.UsageError(
            "--workers: --metrics-listen is not shared between workers; scrape each "
            "worker's /metrics on its loopback port instead (docs/cluster.md)"
        )


# -- the worker side ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerEnvironment:
    """What the supervisor told a worker."""

    number: int
    fds: tuple[tuple[int, int], ...]  # (descriptor, address family)
    directory: str

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> WorkerEnvironment | None:
        """The worker's settings, or None in a process that is no worker."""
        environ = dict(os.environ) if environ is None else environ
        number = environ.get(WORKER_VARIABLE)
        if not number:
            return None
        fds = tuple(
            (int(fd), int(family))
            for fd, _, family in (item.partition(":") for item in environ[FDS_VARIABLE].split(","))
        )
        return cls(int(number), fds, environ.get(DIRECTORY_VARIABLE, ""))


def adopted_listeners(
    reactor: Any, worker: WorkerEnvironment, factory: IProtocolFactory
) -> list[StreamServerEndpointService]:
    """One service per socket the supervisor passed, serving ``factory``."""
    return [
        StreamServerEndpointService(
            endpoints.AdoptedStreamServerEndpoint(reactor, fd, family), factory
        )
        for fd, family in worker.fds
    ]


class WorkerPuller(UpstreamManager):
    """The pulls of a worker: from the sibling the directory names as a stream's origin.

    A viewer of a stream nobody publishes yet starts no pull; once the directory names
    an origin, every stream with local viewers and no local publisher pulls from it, and
    a pull whose origin moved to another sibling is restarted there."""

    def __init__(self, context: RelayContext, reactor: Any, locator: DirectoryLocator) -> None:
        super().__init__(context.registry, reactor, context.config, locator)
        self.directory = locator
        self.sources: dict[str, str] = {}
        locator.on_change = self.origin_changed

    def want(self, name: str) -> None:
        """Pull ``name`` if some sibling (or ``--upstream``) has it."""
        if name not in self.pulls:
            if self.directory.is_own(name) or not self.directory.located(name):
                return
            self.sources[name] = self.directory.urls(name)[0]
        super().want(name)

    def stop(self, name: str) -> None:
        """End the pull of ``name``."""
        self.sources.pop(name, None)
        super().stop(name)

    def origin_changed(self, name: str) -> None:
        """The directory names a new origin for ``name``: follow it."""
        if self.directory.is_own(name):
            return
        stream = self.registry.streams.get(name)
        if stream is None or not stream.viewers or stream.local_publisher:
            return
        if name in self.pulls:
            if self.sources.get(name) == self.directory.urls(name)[0]:
                return
            self.stop(name)
        self.want(name)


class WorkerOrigins:
    """The registry's :class:`~streamrelay.streams.Origins` for a worker of one box:
    ``--no-takeover`` answers 409 when the directory names a sibling as the stream's
    origin (the directory refuses a publish that raced past this check)."""

    def __init__(self, locator: DirectoryLocator, takeover: bool) -> None:
        self.locator = locator
        self.takeover = takeover

    def published(self, name: str) -> None:
        """Nothing to do now: the periodic report registers it."""

    def unpublished(self, name: str) -> None:
        """Nothing to do now: the periodic report withdraws it."""

    def check_publisher(self, name: str) -> Refusal | None:
        """409 when ``--no-takeover`` and a sibling is ``name``'s origin."""
        if not self.takeover and name in self.locator.current and not self.locator.is_own(name):
            return Refusal(409, "stream already has a publisher")
        return None


@implementer(IReadDescriptor)
class ParentWatch:
    """Stops the worker when its supervisor is gone: the supervisor holds the write end
    of the worker's standard input, which reads end-of-file once it has exited, even
    after a SIGKILL that left it no time to stop its workers."""

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        self._reactor = reactor
        self._fd = fd

    def fileno(self) -> int:
        """Standard input."""
        return self._fd

    def doRead(self) -> Failure | None:  # noqa: N802 (Twisted API)
        """Discard input; end-of-file ends the watch."""
        try:
            data = os.read(self._fd, 4096)
        except OSError:
            data = b""
        return None if data else CONNECTION_DONE  # type: ignore[return-value]

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        """The supervisor is gone: stop (and drain) as on SIGTERM."""
        _log.warn("The supervisor is gone: stopping this worker")
        if self._reactor.running:
            self._reactor.stop()

    def logPrefix(self) -> str:  # noqa: N802 (Twisted API)
        """For the reactor's log lines."""
        return "supervisor"


class WorkerService(service.Service):
    """A worker's link to its siblings: the private loopback port for their pulls, the
    directory connection, and the pull manager.  With ``--cluster`` (``node`` given) the
    worker is a cluster node instead: it serves pulls on its node's port and the
    cluster service (Redis) is its directory and its pull manager."""

    name = "worker"

    def __init__(
        self,
        context: RelayContext,
        reactor: Any,
        worker: WorkerEnvironment,
        site: Any,
        node: WorkerNode | None = None,
    ) -> None:
        self._context = context
        self._reactor = reactor
        self._worker = worker
        self._site = site
        self._node = node
        self.locator = DirectoryLocator("", context.config.upstream)
        self.puller = WorkerPuller(context, reactor, self.locator)
        self.locator.on_superseded = context.registry.give_up
        self.locator.on_refused = context.registry.give_up
        takeover = context.config.takeover
        if node is None:
            context.registry.puller = self.puller
            context.registry.origins = WorkerOrigins(self.locator, takeover)
        self.client = DirectoryClientFactory(
            worker.number, self.locator, self._published, takeover
        )
        self._port: IListeningPort | None = None
        self._reporter = TimerService(REPORT_INTERVAL, self._report)

    def _published(self) -> list[str]:
        return [
            name
            for name, stream in self._context.registry.streams.items()
            if stream.local_publisher
        ]

    def _report(self) -> None:
        self.client.report(self._published())

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        """Listen for siblings, then join the directory."""
        super().startService()
        if self._node is not None:
            self._port = self._reactor.listenTCP(
                self._node.port, self._site, interface=self._node.interface
            )
            _log.info(
                "Worker {number} ready: cluster node {url}, serving other nodes' pulls "
                "on port {port}",
                number=self._worker.number,
                url=self._node.url,
                port=self._node.port,
            )
        else:
            self._port = self._reactor.listenTCP(0, self._site, interface="127.0.0.1")
            port_number = self._port.getHost().port  # type: ignore[union-attr]
            self.locator.own_template = f"ws://127.0.0.1:{port_number}/relay/{{stream}}"
            _log.info(
                "Worker {number} ready: siblings pull from http://127.0.0.1:{port}/",
                number=self._worker.number,
                port=port_number,
            )
            self._reactor.connectUNIX(self._worker.directory, self.client)
            self._reporter.startService()
        # Signals come from the supervisor only: not from a terminal's Ctrl+C or a kill
        # of the supervisor's process group, which would stop the worker twice (the
        # supervisor forwards SIGTERM).  Its exit still stops the worker (ParentWatch).
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        self._reactor.addReader(ParentWatch(self._reactor))

    def stopService(self) -> Deferred[Any]:  # noqa: N802 (Twisted API)
        """Leave the directory, close the pulls and the sibling port."""
        super().stopService()
        if self._reporter.running:
            self._reporter.stopService()
        self.client.stopTrying()
        if self.client.connection is not None:
            self.client.connection.transport.loseConnection()  # type: ignore[union-attr]
        if self._node is None:
            self._context.registry.puller = None
            self._context.registry.origins = None
        pulls = self.puller.stop_all()
        if self._port is not None:
            port, self._port = self._port, None
            pulls.addBoth(lambda _: port.stopListening())
        return pulls


# -- the supervisor side --------------------------------------------------------------------


def kernel_balances_reuseport() -> bool:
    """True where a group of ``SO_REUSEPORT`` TCP sockets on one address has the kernel
    spread new connections over its members by a hash of the 4-tuple (Linux; the BSDs'
    and macOS's ``SO_REUSEPORT`` does not balance)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _member_socket(family: int) -> socket.socket:
    """A new TCP socket for a member of a worker socket group (replaced by tests)."""
    return socket.socket(family, socket.SOCK_STREAM)


@implementer(IStreamServerEndpoint)
class ParkedEndpoint:
    """Binds a listening socket for the workers; the supervisor never accepts on it.

    For a TCP listener on Linux it also binds one more socket per further worker on the
    same address, all in one ``SO_REUSEPORT`` group, so the kernel spreads connections
    evenly by a hash of each connection's addresses.  One socket shared by all workers
    goes to whichever process wakes and accepts first, which under load (or a busy
    reactor) is mostly the same one: that is what a UNIX socket, another POSIX system or
    a group that cannot be formed falls back to."""

    def __init__(self, endpoint: Any, count: int = 1) -> None:
        self._endpoint = endpoint
        self._count = count
        self.port: IListeningPort | None = None
        # The sockets bound besides the port, for workers 2, 3, ... (empty: shared).
        self.extra: list[socket.socket] = []

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:  # noqa: N803
        """Listen (announcing the address), then stop reading at once."""
        listening: Deferred[IListeningPort] = self._endpoint.listen(protocolFactory)
        return listening.addCallback(self._park)

    def _park(self, port: IListeningPort) -> IListeningPort:
        port.stopReading()  # type: ignore[attr-defined]
        self.port = port
        sock: socket.socket = port.socket  # type: ignore[attr-defined]
        if self._count > 1 and sock.family in (socket.AF_INET, socket.AF_INET6):
            if kernel_balances_reuseport():
                self._form_group(sock, getattr(port, "backlog", 50))
        return port

    def _form_group(self, leader: socket.socket, backlog: int) -> None:
        """Bind ``count - 1`` more sockets on the leader's address, all with
        ``SO_REUSEPORT``; on any error, close them and share the leader."""
        extra: list[socket.socket] = []
        try:
            # Linux adds a socket that is already listening to the group once it has
            # the option, when the next member listens.
            leader.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            for _ in range(self._count - 1):
                member = _member_socket(leader.family)
                extra.append(member)
                member.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                member.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if leader.family == socket.AF_INET6:
                    only = leader.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                    member.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, only)
                member.bind(leader.getsockname())
                member.listen(backlog)
                member.setblocking(False)
        except OSError as error:
            for member in extra:
                member.close()
            with contextlib.suppress(OSError):
                leader.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
            _log.warn(
                "The workers share one listening socket on {address} (no SO_REUSEPORT "
                "group: {error}); the kernel gives each connection to whichever worker "
                "accepts first",
                address=leader.getsockname(),
                error=error,
            )
            return
        self.extra = extra

    def descriptor(self, worker: int = 1) -> tuple[int, int]:
        """The descriptor of the socket for worker number ``worker`` and its address
        family."""
        assert self.port is not None, "not bound yet"
        sock: socket.socket = self.port.socket  # type: ignore[attr-defined]
        if self.extra and worker > 1:
            sock = self.extra[(worker - 2) % len(self.extra)]
        return sock.fileno(), int(sock.family)

    def close_extra(self) -> None:
        """Close the sockets bound besides the port (the workers have exited)."""
        extra, self.extra = self.extra, []
        for member in extra:
            member.close()


class _SpawningReactor:
    """The reactor as the process monitor sees it: spawned workers inherit the
    listening sockets (the stock monitor passes no ``childFDs``)."""

    def __init__(self, reactor: Any, inherited: Callable[[int], dict[int, int]]) -> None:
        self._reactor = reactor
        self._inherited = inherited

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 (Twisted API)
        """Spawn with stdin, stdout, stderr piped and the worker's sockets at 3, 4, ...
        (which worker: its environment says)."""
        number = int((kwargs.get("env") or {}).get(WORKER_VARIABLE, "1"))
        kwargs["childFDs"] = {0: "w", 1: "r", 2: "r", **self._inherited(number)}
        return self._reactor.spawnProcess(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class WorkerPool(service.Service):
    """Runs and supervises the workers (a :class:`ProcessMonitor` inside); stopping
    fires once every worker has exited."""

    name = "workers"

    def __init__(
        self,
        reactor: Any,
        count: int,
        command: list[str],
        environment: dict[str, str],
        sockets: list[ParkedEndpoint],
        kill_time: float,
    ) -> None:
        from twisted.protocols.basic import LineReceiver
        from twisted.runner.procmon import ProcessMonitor

        from streamrelay.demo import _ChildOutputLogger, _cut_line

        pool = self
        self._sockets = sockets
        self._exited: list[Deferred[None]] = []

        class Monitor(ProcessMonitor):
            threshold = 10
            minRestartDelay = 1
            maxRestartDelay = 30
            killTime = kill_time  # type: ignore[assignment]
            log = _ChildOutputLogger()

            def startProcess(self, name: str) -> None:  # noqa: N802
                super().startProcess(name)
                protocol = self.protocols.get(name)
                for receiver in (
                    getattr(protocol, "_output", None),
                    getattr(protocol, "_error", None),
                ):
                    if isinstance(receiver, LineReceiver):
                        receiver.lineLengthExceeded = _cut_line(receiver)  # type: ignore[method-assign]

            def _monitoredProcessExited(self, name: str, reason: Failure | None = None) -> None:
                super()._monitoredProcessExited(name, reason)
                pending = self.restart.get(name)
                if self.running and pending is not None and pending.active():
                    _log.warn(
                        "{name} ended ({reason}); restarting in {delay:.1f} s",
                        name=name,
                        reason=reason.getErrorMessage() if reason is not None else "exited",
                        delay=pending.getTime() - self._clock.seconds(),
                    )
                if not self.protocols:
                    exited, pool._exited = pool._exited, []
                    for waiting in exited:
                        waiting.callback(None)

        self.monitor = Monitor(_SpawningReactor(reactor, self._inherited))  # type: ignore[arg-type]
        self._count = count
        self._command = command
        self._environment = environment

    def _inherited(self, number: int) -> dict[int, int]:
        return {
            FIRST_FD + index: parked.descriptor(number)[0]
            for index, parked in enumerate(self._sockets)
        }

    def startService(self) -> None:  # noqa: N802 (Twisted API)
        """Start the workers (the sockets are bound by now)."""
        super().startService()
        fds = ",".join(
            f"{FIRST_FD + index}:{parked.descriptor()[1]}"
            for index, parked in enumerate(self._sockets)
        )
        self.monitor.startService()
        for number in range(1, self._count + 1):
            environment = {
                **self._environment,
                WORKER_VARIABLE: str(number),
                FDS_VARIABLE: fds,
            }
            self.monitor.addProcess(f"worker {number}", self._command, env=environment)
        _log.info("Started {count} workers", count=self._count)

    def stopService(self) -> Deferred[None]:  # noqa: N802 (Twisted API)
        """SIGTERM every worker (SIGKILL after the bound); fire once all have exited."""
        super().stopService()
        self.monitor.stopService()
        exited: Deferred[None] = Deferred()
        if self.monitor.protocols:
            self._exited.append(exited)
        else:
            exited.callback(None)
        return exited.addCallback(self._close_sockets)

    def _close_sockets(self, _: None) -> None:
        for parked in self._sockets:
            parked.close_extra()


class DirectoryService(service.Service):
    """The workers' directory on a UNIX socket in a private temporary folder."""

    name = "directory"

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.folder = tempfile.mkdtemp(prefix="streamrelay-workers-")  # mode 0700
        self.path = os.path.join(self.folder, "directory.sock")
        self.factory = DirectoryServerFactory()
        self._port: IListeningPort | None = None

    def privilegedStartService(self) -> None:  # noqa: N802 (Twisted API)
        """Listen before the workers start."""
        super().privilegedStartService()
        self._port = self._reactor.listenUNIX(self.path, self.factory, mode=0o600)

    def stopService(self) -> Any:  # noqa: N802 (Twisted API)
        """Stop listening and remove the folder."""
        super().stopService()
        port, self._port = self._port, None
        stopped: Deferred[Any] = maybeDeferred(port.stopListening) if port else succeed(None)
        # After the port is closed: closing it unlinks the socket file itself.
        stopped.addBoth(lambda _: shutil.rmtree(self.folder, ignore_errors=True))
        return stopped


def supervisor(
    reactor: Any,
    config: RelayConfig,
    arguments: list[str],
    listen: list[str],
    listener: Callable[..., StreamServerEndpointService],
    top: service.MultiService,
    demo: bool = False,
) -> service.MultiService:
    """The supervising process: the parked listeners, the directory and the workers,
    under ``top`` (a relay service that serves no connection of its own: it gives the
    process its log observer and stops the workers on stop)."""
    from twisted.internet.protocol import Factory

    parked: list[ParkedEndpoint] = []
    unused = Factory()  # never called: the supervisor does not accept
    announced: list[Any] = []
    for description in listen:
        listening = listener(reactor, description, unused)
        announced.append(listening.endpoint)
        endpoint = ParkedEndpoint(listening.endpoint, config.workers)
        listening.endpoint = endpoint
        parked.append(endpoint)
        listening.setServiceParent(top)
    environment = dict(os.environ)
    if not config.cluster:
        # With --cluster, Redis is the directory: every worker is a node of the cluster.
        directory = DirectoryService(reactor)
        directory.setServiceParent(top)
        environment[DIRECTORY_VARIABLE] = directory.path
    if config.relay_secret is None:
        # Only the workers know it: it signs the tokens of their pulls from each other.
        environment[SECRET_VARIABLE] = secrets.token_hex(32)
    command = [sys.executable, "-m", "streamrelay", *arguments]
    kill_time = config.close_timeout + 10.0
    pool = WorkerPool(reactor, config.workers, command, environment, parked, kill_time)
    pool.setServiceParent(top)
    if demo:
        # The demo publisher lands on whichever worker accepts it, as any publisher.
        from streamrelay.demo import DEMO_STREAM, DemoPublisherService

        def demo_url() -> str | None:
            urls = (endpoint.publish_url(DEMO_STREAM) for endpoint in announced)
            return next((url for url in urls if url is not None), None)

        DemoPublisherService(
            reactor, demo_url, sys.executable, dict(os.environ), config.publish_secret
        ).setServiceParent(top)
    return top
