"""twistd wiring: ``twistd -n streamrelay [options]``.

:class:`Options` is derived from the declarations in :mod:`streamrelay.config` (one option
per :class:`~streamrelay.config.RelayConfig` setting, a bad value is a usage error naming
it) plus the two options that wire the process: ``--listen`` and ``--demo``.
:func:`makeService` returns a :class:`RelayService` (a ``MultiService``) holding one
``StreamServerEndpointService`` per ``--listen`` endpoint, the rate-limit sweeper and,
with ``--demo``, the supervised test-pattern publisher.
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
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from streamrelay.config import RelayConfig, derivations, settings
from streamrelay.demo import DEMO_STREAM, DemoPublisherService
from streamrelay.tokens import secret_from_environment
from streamrelay.web import RelayContext, RelaySite, Root

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


def _check_port(description: str) -> None:
    """TCP and TLS endpoints name their port first: it must be 0-65535."""
    kind, _, rest = description.partition(":")
    if kind.lower() not in ("tcp", "ssl", "tcp6", "ssl6"):
        return
    parts = rest.split(":")
    positional = [part for part in parts if "=" not in part]
    named = [part.split("=", 1)[1] for part in parts if part.startswith("port=")]
    port = positional[0] if positional else (named[0] if named else "")
    if not (port.isascii() and port.isdigit() and 0 <= int(port) <= 65535):
        raise usage.UsageError(f"--listen: {description!r}: port must be 0-65535")


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
        self._config = RelayConfig()

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint to listen on, repeatable (default tcp:8080), e.g.
        tcp:0:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem, unix:/path."""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        """Check and convert every value; the error names the option."""
        self._config = self._parse_settings()
        self._check_listen()
        if self["demo"] and not _publisher_installed():
            raise usage.UsageError(
                f"--demo runs the test-pattern publisher, which needs PyAV: {PUBLISHER_EXTRA_HINT}"
            )

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

        for description in self["listen"]:
            _check_port(description)
            try:
                endpoints.serverFromString(reactor, description)
            except Exception as error:  # a bad key file raises OSError or an SSL error
                raise usage.UsageError(f"--listen: {description!r}: {error}") from None

    def config(self) -> RelayConfig:
        """The :class:`RelayConfig` these options describe."""
        return self._config


@implementer(IStreamServerEndpoint)
class AnnouncedEndpoint:
    """An endpoint that logs the address it really bound (``tcp:0`` names its port) and
    keeps the listening port for the demo publisher's URL."""

    def __init__(self, endpoint: IStreamServerEndpoint, description: str) -> None:
        self._endpoint = endpoint
        self.description = description
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
        if host is None:
            _log.info("streamrelay listening on {address}", address=address)
            return port
        scheme = "https" if self.is_tls else "http"
        shown = f"[{host}]" if ":" in host else host
        _log.info(
            "streamrelay listening on {description}: {url}",
            description=f"{self.description.split(':', 1)[0]}:{port_number}",
            url=f"{scheme}://{shown}:{port_number}/",
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


def listener(
    reactor: Any, description: str, factory: IProtocolFactory
) -> StreamServerEndpointService:
    """The service listening on ``description``.  It binds in privilegedStartService and,
    as ``strports.service`` arranges, a failure to bind raises there: twistd reports it
    and exits instead of running without the listener."""
    listening = strports.service(description, factory, reactor)
    listening.endpoint = AnnouncedEndpoint(listening.endpoint, description)
    return listening


class RelayService(service.MultiService):
    """The relay: on stop, drains every connection before it stops listening, so
    handshakes that arrive meanwhile get 503."""

    def __init__(self, context: RelayContext) -> None:
        super().__init__()
        self.context = context

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
    """Build the relay service from parsed options."""
    from twisted.internet import reactor

    warn_unless_masking_accelerated()
    config = options.config()
    capped = _fit_descriptor_limit(reactor, config.max_connections)
    if capped != config.max_connections:
        config = replace(config, max_connections=capped)
    if config.publish_secret is None:
        _log.warn(
            "No publish secret configured: publishing is allowed only from loopback "
            "peers whose requests carry no X-Forwarded-For or Forwarded header."
        )
    context = RelayContext.create(config, reactor)
    site = RelaySite(context, Root(context))
    relay = RelayService(context)
    announced: list[AnnouncedEndpoint] = []
    for description in options["listen"]:
        listening = listener(reactor, description, site)
        announced.append(listening.endpoint)
        listening.setServiceParent(relay)
    TimerService(10.0, context.handshake_rate.sweep).setServiceParent(relay)
    if options["demo"]:

        def demo_url() -> str | None:
            urls = (endpoint.publish_url(DEMO_STREAM) for endpoint in announced)
            return next((url for url in urls if url is not None), None)

        DemoPublisherService(
            reactor, demo_url, sys.executable, dict(os.environ), config.publish_secret
        ).setServiceParent(relay)
    return relay
