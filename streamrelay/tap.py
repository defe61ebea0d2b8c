"""twistd wiring: ``twistd -n streamrelay [options]``.

:class:`Options` is derived from the declarations in :mod:`streamrelay.config` (one option
per :class:`~streamrelay.config.RelayConfig` setting, a bad value is a usage error naming
it) plus the options that wire the process: ``--listen``, ``--metrics-listen`` and
``--demo``.  :func:`makeService` returns a :class:`RelayService` (a ``MultiService``)
holding one ``StreamServerEndpointService`` per ``--listen`` and ``--metrics-listen``
endpoint, the rate-limit sweeper, the summaries of suppressed log lines, with
``--upstream`` the pull manager (:class:`~streamrelay.upstream.UpstreamService`) and,
with ``--demo``, the supervised test-pattern publisher.  With ``--workers N`` the same
service holds instead the supervisor of N worker processes (:mod:`streamrelay.workers`),
and in each worker the relay on the listening sockets it inherited.  A repeatable setting
(``--upstream``) gets an ``opt_`` handler that collects every occurrence.  The same
service runs under twistd and under the ``streamrelay`` console script
(:mod:`streamrelay.cli`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from importlib.util import find_spec
from types import ModuleType
from typing import Any

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized
from zope.interface import implementer

from streamrelay import logs, workers
from streamrelay.cluster import ClusterService, worker_node
from streamrelay.config import Declared, RelayConfig, derivations, settings
from streamrelay.tokens import secret_from_environment
from streamrelay.upstream import UpstreamService
from streamrelay.web import RelayContext, RelaySite, Root, metrics_site

_log = Logger()

rlimit: ModuleType | None
try:
    import resource as rlimit
except ImportError:  # Windows (IOCP): no descriptor limit to raise
    rlimit = None

# The select reactor cannot watch descriptors past FD_SETSIZE; keep a margin for
# listening sockets, logs and the demo child's pipes.
SELECT_FD_LIMIT = 1024
FD_RESERVE = 64

DEFAULT_LISTEN = "tcp:8080"
PUBLISHER_EXTRA_HINT = "pip install 'streamrelay[publisher]'"
CLUSTER_EXTRA_HINT = "pip install 'streamrelay[cluster]'"


def _check_port(description: str) -> None:
    """TCP and TLS endpoints name their port first: it must be 0-65535 (ValueError)."""
    kind, _, rest = description.partition(":")
    if kind.lower() not in ("tcp", "ssl", "tcp6", "ssl6"):
        return
    parts = rest.split(":")
    positional = [part for part in parts if "=" not in part]
    named = [part.split("=", 1)[1] for part in parts if part.startswith("port=")]
    port = positional[0] if positional else (named[0] if named else "")
    if not (port.isascii() and port.isdigit() and 0 <= int(port) <= 65535):
        raise ValueError("port must be 0-65535")


def _listen_port(description: str) -> int | None:
    """The port of a ``tcp:PORT...`` description, None for port 0 or another kind."""
    kind, _, rest = description.partition(":")
    port = rest.split(":")[0]
    if kind.lower() not in ("tcp", "tcp6") or not port.isdigit() or int(port) == 0:
        return None
    return int(port)


def _publisher_installed() -> bool:
    """True when PyAV, which the test-pattern publisher encodes with, can be imported."""
    return find_spec("av") is not None


class Options(usage.Options):
    """Command-line options of ``twistd streamrelay``."""

    synopsis = "[options]"
    longdesc = (
        "Relay live video from desktop publishers (WebSocket /publish/NAME) to browser "
        "viewers (WebSocket /watch/NAME; player at /view/NAME)."
    )
    # Parameters carry their default as command-line text, which Twisted shows once as
    # "[default: ...]"; postOptions parses given and default text alike.
    optFlags = [
        [declared.option, None, declared.setting.help]
        for declared in settings()
        if declared.setting.is_flag
    ] + [
        [
            "demo",
            None,
            "Also run the test-pattern publisher on stream 'demo' "
            f"(needs the publisher extra: {PUBLISHER_EXTRA_HINT}).",
        ]
    ]
    optParameters = [
        [declared.option, None, declared.shown(), declared.setting.help]
        for declared in settings()
        if not declared.setting.is_flag
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["metrics-listen"] = []
        self._config = RelayConfig()
        # The texts of each repeatable setting, in the order given.
        self.repeated: dict[str, list[str]] = {}
        # The arguments as given: --workers runs its workers with the same ones.
        self.arguments: list[str] = []

    def parseOptions(self, options: Any = None) -> None:  # noqa: N802 (Twisted API)
        """Parse, keeping the arguments for the workers of ``--workers``."""
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint to listen on, repeatable (default tcp:8080), e.g.
        tcp:0:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem, unix:/path."""
        self["listen"].append(endpoint)

    def opt_metrics_listen(self, endpoint: str) -> None:
        """Also serve GET /metrics, to anyone who reaches it, on this Twisted endpoint
        (repeatable; default none), e.g. tcp:9100:interface=10.0.0.5. On the relay's own
        port /metrics answers direct loopback requests only."""
        self["metrics-listen"].append(endpoint)

    def postOptions(self) -> None:
        """Check and convert every value; the error names the option."""
        self._config = self._parse_settings()
        self._check_listen()
        self._check_cluster()
        workers.check_options(self._config, self["listen"], self["metrics-listen"])
        if self._config.upstream and self._config.relay_secret is None:
            raise usage.UsageError(
                "--upstream needs --relay-secret-file (or STREAMRELAY_RELAY_SECRET): the "
                "relay tokens it pulls with are signed with it"
            )
        if self["demo"] and not _publisher_installed():
            raise usage.UsageError(
                f"--demo runs the test-pattern publisher, which needs PyAV: {PUBLISHER_EXTRA_HINT}"
            )

    def _check_cluster(self) -> None:
        """``--cluster`` needs the relay secret, an address to advertise and txredisapi."""
        config = self._config
        if not config.cluster:
            return
        if config.upstream:
            raise usage.UsageError("--cluster and --upstream exclude each other")
        if config.workers:
            # Each worker is a node: a shared listening port cannot name one worker, so
            # each serves other nodes' pulls on a port of its own.
            if not config.worker_relay_ports:
                raise usage.UsageError(
                    "--cluster with --workers needs --worker-relay-ports BASE: worker N "
                    "serves other nodes' pulls on port BASE+N-1 (docs/cluster.md)"
                )
            if config.worker_relay_ports + config.workers - 1 > 65535:
                raise usage.UsageError("--worker-relay-ports: the last worker's port is over 65535")
        if config.relay_secret is None:
            raise usage.UsageError(
                "--cluster needs --relay-secret-file (or STREAMRELAY_RELAY_SECRET): nodes "
                "pull from each other with relay tokens signed with it"
            )
        if not config.advertise and _listen_port(self["listen"][0]) is None:
            raise usage.UsageError(
                "--cluster needs --advertise (the URL other nodes pull from) unless the "
                "first --listen is a TCP port other than 0"
            )
        if config.cluster_username and config.cluster_password is None:
            raise usage.UsageError(
                "--cluster-username needs --cluster-password-file (or "
                "STREAMRELAY_CLUSTER_PASSWORD)"
            )
        if find_spec("txredisapi") is None:
            raise usage.UsageError(f"--cluster needs txredisapi: {CLUSTER_EXTRA_HINT}")

    def advertise(self) -> str:
        """The URL other nodes reach this one at: ``--advertise``, else the first
        ``--listen`` port on loopback."""
        if self._config.advertise:
            return self._config.advertise
        return f"ws://127.0.0.1:{_listen_port(self['listen'][0])}"

    def _parse_settings(self) -> RelayConfig:
        """Parse each declared setting's text (given or default) into the config."""
        values: dict[str, Any] = {}
        for declared in settings():
            setting, given = declared.setting, self[declared.option]
            if setting.parse is None:
                values[declared.field] = setting.when_given if given else declared.default
                continue
            if given is None:
                if setting.environment:
                    values[declared.field] = secret_from_environment(setting.environment)
                continue
            try:
                value = setting.parse(given)
            except (OSError, ValueError) as error:  # OSError: an unreadable secret file
                raise usage.UsageError(f"--{declared.option}: {error}") from None
            values[declared.field] = value
            if not setting.secret:
                self[declared.option] = value
        for name, rule in derivations():
            if rule.source in values:
                values[name] = rule.compute(values[rule.source])
        return RelayConfig(**values)

    def _check_listen(self) -> None:
        """Default to tcp:8080; refuse an endpoint Twisted cannot build."""
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        from twisted.internet import reactor

        for option in ("listen", "metrics-listen"):
            for description in self[option]:
                try:
                    _check_port(description)
                    endpoints.serverFromString(reactor, description)
                except Exception as error:  # a bad key file: OSError or an SSL error
                    raise usage.UsageError(f"--{option}: {description!r}: {error}") from None

    def config(self) -> RelayConfig:
        """The :class:`RelayConfig` these options describe."""
        return self._config


def _repeatable_handler(declared: Declared) -> Any:
    """``opt_NAME`` for a repeatable setting: each occurrence adds its text."""

    def handler(self: Options, text: str) -> None:
        given = self.repeated.setdefault(declared.option, [])
        given.append(text)
        self[declared.option] = " ".join(given)

    handler.__doc__ = declared.setting.help
    return handler


for _declared in settings():
    if _declared.setting.repeatable:
        handler_name = "opt_" + _declared.option.replace("-", "_")
        setattr(Options, handler_name, _repeatable_handler(_declared))


@implementer(IStreamServerEndpoint)
class AnnouncedEndpoint:
    """An endpoint that logs the address it really bound (``tcp:0`` names its port) and
    keeps the listening port for the demo publisher's URL."""

    def __init__(
        self, endpoint: IStreamServerEndpoint, description: str, serves: str = ""
    ) -> None:
        self._endpoint = endpoint
        self.description = description
        # What the port serves when it is not the relay itself (e.g. "metrics").
        self.serves = serves
        self.port: IListeningPort | None = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen on the wrapped endpoint and announce the bound address."""
        listening: Deferred[IListeningPort] = self._endpoint.listen(protocolFactory)
        return listening.addCallback(self._announce)

    def _announce(self, port: IListeningPort) -> IListeningPort:
        """Keep the port and log where it listens, as the test launcher parses it."""
        self.port = port
        address = port.getHost()
        host = getattr(address, "host", None)
        port_number = getattr(address, "port", None)
        # The test launcher reads the relay's own address from "streamrelay listening on".
        what = f"streamrelay {self.serves} on" if self.serves else "streamrelay listening on"
        if host is None:
            _log.info("{what} {address}", what=what, address=address)
            return port
        scheme = "https" if self.is_tls else "http"
        shown = f"[{host}]" if ":" in host else host
        path = self.serves if self.serves else ""
        _log.info(
            "{what} {description}: {url}",
            what=what,
            description=f"{self.description.split(':', 1)[0]}:{port_number}",
            url=f"{scheme}://{shown}:{port_number}/{path}",
        )
        return port

    @property
    def is_tls(self) -> bool:
        """True for ``ssl:`` endpoints."""
        return self.description.startswith("ssl:")

    def publish_url(self, stream: str) -> str | None:
        """The loopback WebSocket URL to publish ``stream`` here, once bound to an IP
        address."""
        address = self.port.getHost() if self.port is not None else None
        host = getattr(address, "host", None)
        if host is None:
            return None
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        scheme = "wss" if self.is_tls else "ws"
        return f"{scheme}://{shown}:{getattr(address, 'port', 0)}/publish/{stream}"


# The kernel's queue of connections not yet accepted.  Twisted's default (50) turns an F5
# or reconnect storm of a few thousand viewers into SYN retries of seconds; the kernel
# caps what is asked at net.core.somaxconn.
LISTEN_BACKLOG = 4096
_BACKLOG_KINDS = ("tcp", "tcp6", "ssl", "unix")


def with_backlog(description: str) -> str:
    """``description`` with ``backlog=LISTEN_BACKLOG`` where it names none."""
    kind = description.split(":", 1)[0]
    if kind not in _BACKLOG_KINDS or "backlog=" in description:
        return description
    return f"{description}:backlog={LISTEN_BACKLOG}"


def listener(
    reactor: Any, description: str, factory: IProtocolFactory, serves: str = ""
) -> StreamServerEndpointService:
    """The service listening on ``description`` (with a backlog of ``LISTEN_BACKLOG``
    unless it says otherwise).  It binds in privilegedStartService and, as
    ``strports.service`` arranges, a failure to bind raises there: twistd reports it and
    exits instead of running without the listener."""
    listening = strports.service(with_backlog(description), factory, reactor)
    listening.endpoint = AnnouncedEndpoint(listening.endpoint, description, serves)
    return listening


class RelayService(service.MultiService):
    """The relay: on stop, drains every connection before it stops listening, so
    handshakes that arrive meanwhile get 503.

    With ``--json-logs`` it gives the application it joins a JSON log observer (the
    ``ILogObserver`` component twistd and the console script log to)."""

    def __init__(self, context: RelayContext) -> None:
        super().__init__()
        self.context = context

    def setServiceParent(self, parent: Any) -> None:
        """Join ``parent``; with ``--json-logs``, set its log observer."""
        if self.context.config.json_logs and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, logs.json_observer())
        super().setServiceParent(parent)

    def stopService(self) -> Deferred[None]:
        """Close connections (1001), abort stragglers, then stop the listeners."""
        _log.info("Shutting down: closing {count} connections", count=len(self.context.connections))
        drained = self.context.drain()
        drained.addCallback(lambda _: service.MultiService.stopService(self))
        return drained


def _fit_descriptor_limit(reactor: Any, wanted: int) -> int:
    """Raise the soft descriptor limit towards ``wanted`` and cap the connection limit
    to what the reactor and the process can hold."""
    allowed = wanted
    try:
        if rlimit is None:
            raise ImportError("no resource module")
        soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
        target = wanted + FD_RESERVE
        if soft != rlimit.RLIM_INFINITY and soft < target:
            new_soft = target if hard == rlimit.RLIM_INFINITY else min(target, hard)
            rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        if soft != rlimit.RLIM_INFINITY and soft - FD_RESERVE < allowed:
            allowed = max(1, soft - FD_RESERVE)
            _log.warn(
                "--max-connections lowered to {allowed}: the descriptor limit is {soft}",
                allowed=allowed,
                soft=soft,
            )
    except (ImportError, ValueError, OSError, AttributeError):
        pass
    if type(reactor).__name__ == "SelectReactor" and allowed > SELECT_FD_LIMIT - FD_RESERVE:
        allowed = SELECT_FD_LIMIT - FD_RESERVE
        _log.warn(
            "--max-connections capped at {allowed}: the select reactor cannot watch more "
            "than {limit} descriptors",
            allowed=allowed,
            limit=SELECT_FD_LIMIT,
        )
    return allowed


def masking_accelerated() -> bool:
    """True when Autobahn unmasks frames natively (NVX, or a native masker of an older
    release), as it decides at import from its build and ``AUTOBAHN_USE_NVX``; its
    pure-Python maskers live in ``autobahn.websocket.xormasker``."""
    from autobahn.websocket import protocol as websocket_protocol

    masker = websocket_protocol.create_xor_masker(b"\x00" * 4, 1 << 16)
    return not type(masker).__module__.startswith("autobahn.websocket.")


def warn_unless_masking_accelerated() -> bool:
    """Log a warning when publisher frames would be unmasked in pure Python (each
    100 KiB costs milliseconds of the reactor thread); True when accelerated."""
    if masking_accelerated():
        return True
    _log.warn(
        "Autobahn's NVX acceleration is not active (AUTOBAHN_USE_NVX=0, or autobahn was "
        "installed without it): publisher frames are unmasked in pure Python, which costs "
        "milliseconds per 100 KiB message. Install an autobahn wheel built with NVX (or "
        "build it with cffi and a C compiler) and leave AUTOBAHN_USE_NVX unset."
    )
    return False


def makeService(options: Options) -> RelayService:
    """Build the relay service from parsed options (with ``--workers``, the supervisor of
    the worker processes; in a worker, the relay on the sockets it inherited)."""
    from twisted.internet import reactor

    warn_unless_masking_accelerated()
    config = options.config()
    worker = workers.WorkerEnvironment.from_environment()
    if config.workers and worker is None:
        supervising = RelayService(RelayContext.create(config, reactor))
        workers.supervisor(
            reactor,
            config,
            options.arguments,
            options["listen"],
            listener,
            supervising,
            options["demo"],
        )
        return supervising
    capped = _fit_descriptor_limit(reactor, config.max_connections)
    if capped != config.max_connections:
        config = replace(config, max_connections=capped)
    if config.publish_secret is None and not config.auth_url:
        _log.warn(
            "No publish secret configured: publishing is allowed only from loopback "
            "peers whose requests carry no X-Forwarded-For or Forwarded header."
        )
    if config.trust_proxy:
        _log.info(
            "Trusting the last {hops} X-Forwarded-For hop(s): only the reverse proxies "
            "must be able to reach the relay's port",
            hops=config.trust_proxy,
        )
    context = RelayContext.create(config, reactor)
    site = RelaySite(context, Root(context))
    relay = RelayService(context)
    announced: list[AnnouncedEndpoint] = []
    node = None
    if worker is not None:
        if config.cluster:
            node = worker_node(options.advertise(), config.worker_relay_ports, worker.number)
        for adopted in workers.adopted_listeners(reactor, worker, site):
            adopted.setServiceParent(relay)
        workers.WorkerService(context, reactor, worker, site, node).setServiceParent(relay)
    for description in options["listen"] if worker is None else ():
        listening = listener(reactor, description, site)
        announced.append(listening.endpoint)
        listening.setServiceParent(relay)
    if options["metrics-listen"]:
        metrics = metrics_site(context)
        for description in options["metrics-listen"]:
            listener(reactor, description, metrics, "metrics").setServiceParent(relay)
    TimerService(10.0, context.handshake_rate.sweep).setServiceParent(relay)
    if config.upstream and worker is None:
        UpstreamService(context, reactor).setServiceParent(relay)
    if config.cluster:
        advertised = node.url if node is not None else options.advertise()
        ClusterService(context, reactor, advertised).setServiceParent(relay)
    logs.LogLimitService(config.log_rate, config.log_burst, reactor).setServiceParent(relay)
    if options["demo"] and worker is None:
        # Imported here: twisted.runner.procmon imports the reactor, which the console
        # script's --reactor must be able to choose first.
        from streamrelay.demo import DEMO_STREAM, DemoPublisherService

        def demo_url() -> str | None:
            urls = (endpoint.publish_url(DEMO_STREAM) for endpoint in announced)
            return next((url for url in urls if url is not None), None)

        DemoPublisherService(
            reactor, demo_url, sys.executable, dict(os.environ), config.publish_secret
        ).setServiceParent(relay)
    return relay
