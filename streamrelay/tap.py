"""twistd wiring: ``twistd -n streamrelay [options]``.

:class:`Options` parses and checks every option (a bad value is a usage error naming
it); :func:`makeService` returns a :class:`RelayService` (a ``MultiService``) holding one
listener per ``--listen`` endpoint, the rate-limit sweeper and, with ``--demo``, the
supervised test-pattern publisher.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from streamrelay.config import RelayConfig
from streamrelay.tokens import read_secret_file, secret_from_environment
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


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be zero or a positive integer")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return number


def _origin_list(value: str) -> tuple[str, ...]:
    origins = tuple(item.strip() for item in value.split(",") if item.strip())
    for origin in origins:
        if any(character.isspace() for character in origin):
            raise ValueError(f"invalid origin pattern {origin!r}")
    return origins


_PARAMETERS: list[tuple[str, Any, Callable[[str], Any], str]] = [
    ("max-connections", 10000, _positive_int, "Most open connections in all (10000)."),
    ("max-connections-per-ip", 100, _positive_int, "Most open connections per address (100)."),
    ("max-handshakes-per-ip", 50.0, _positive_float,
     "WebSocket handshakes per second per address, burst of twice this (50)."),
    ("max-streams", 1000, _positive_int, "Most streams at once (1000)."),
    ("max-viewers-per-stream", 0, _non_negative_int, "Most viewers per stream; 0 = no limit."),
    ("max-message-bytes", 8 * 1024 * 1024, _positive_int,
     "Largest publisher message in bytes (8 MiB); viewers may send 4 KiB."),
    ("max-fragments-per-message", 4096, _positive_int,
     "Most WebSocket fragments in one incoming message (4096)."),
    ("viewer-queue-bytes", 4 * 1024 * 1024, _positive_int,
     "Bytes pending towards one viewer before it skips to the next keyframe (4 MiB)."),
    ("gop-cache-bytes", 8 * 1024 * 1024, _non_negative_int,
     "GOP cache per stream in bytes (8 MiB); 0 turns it off."),
    ("max-buffered-bytes", 512 * 1024 * 1024, _positive_int,
     "All GOP caches plus everything pending towards viewers (512 MiB)."),
    ("ping-interval", 10.0, _positive_float, "Seconds between WebSocket pings (10)."),
    ("ping-timeout", 10.0, _positive_float, "Seconds to wait for a sign of life (10)."),
    ("handshake-timeout", 5.0, _positive_float,
     "Seconds from TCP accept to a complete opening handshake (5)."),
    ("close-timeout", 2.0, _positive_float,
     "Seconds a closing handshake may take before the TCP connection is aborted (2)."),
    ("publisher-idle-timeout", 20.0, _positive_float,
     "Seconds without a media message before a publisher is closed (20)."),
    ("viewer-stall-timeout", 15.0, _positive_float,
     "Seconds without write progress before a viewer is closed (15)."),
    ("keyframe-request-interval", 1.0, _positive_float,
     "Least seconds between keyframe requests to a publisher (1)."),
]


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


class Options(usage.Options):
    """Command-line options of ``twistd streamrelay``."""

    synopsis = "[options]"
    longdesc = (
        "Relay live video from desktop publishers (WebSocket /publish/NAME) to browser "
        "viewers (WebSocket /watch/NAME; player at /view/NAME)."
    )
    optFlags = [
        ["no-takeover", None, "Refuse (409) a second publisher instead of replacing the first."],
        ["echo", None, "Enable the /echo WebSocket endpoint (for conformance runs)."],
        ["demo", None, "Also run the test-pattern publisher on stream 'demo'."],
    ]
    optParameters = [
        ["publish-secret-file", None, None,
         "File holding the HMAC secret for publisher tokens "
         "(or env STREAMRELAY_PUBLISH_SECRET). Without one, only loopback may publish."],
        ["view-secret-file", None, None,
         "File holding the HMAC secret for viewer tokens (or env STREAMRELAY_VIEW_SECRET). "
         "Without one, viewing is open."],
        ["view-origins", None, "*", "Comma list of Origin patterns allowed to watch (*)."],
        ["publish-origins", None, "",
         "Comma list of Origin patterns allowed to publish (none: requests with an "
         "Origin header are refused)."],
    ] + [[name, None, default, help_text] for name, default, _, help_text in _PARAMETERS]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint to listen on, repeatable (default tcp:8080), e.g.
        tcp:0:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem, unix:/path."""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        """Check and convert every value; the error names the option."""
        for name, _default, convert, _help in _PARAMETERS:
            value = self[name]
            if isinstance(value, str):
                try:
                    self[name] = convert(value)
                except ValueError as error:
                    raise usage.UsageError(f"--{name}: {value!r} {error}") from None
        for name in ("view-origins", "publish-origins"):
            try:
                self[name] = _origin_list(self[name])
            except ValueError as error:
                raise usage.UsageError(f"--{name}: {error}") from None
        if not self["listen"]:
            self["listen"] = ["tcp:8080"]
        from twisted.internet import reactor

        for description in self["listen"]:
            _check_port(description)
            try:
                endpoints.serverFromString(reactor, description)
            except Exception as error:  # a bad key file raises OSError or an SSL error
                raise usage.UsageError(f"--listen: {description!r}: {error}") from None
        for option, variable in (
            ("publish-secret-file", "STREAMRELAY_PUBLISH_SECRET"),
            ("view-secret-file", "STREAMRELAY_VIEW_SECRET"),
        ):
            key = option.replace("-file", "")
            if self[option]:
                try:
                    self[key] = read_secret_file(self[option])
                except (OSError, ValueError) as error:
                    raise usage.UsageError(f"--{option}: {error}") from None
            else:
                self[key] = secret_from_environment(variable)

    def config(self) -> RelayConfig:
        """The :class:`RelayConfig` these options describe."""
        return RelayConfig(
            publish_secret=self["publish-secret"],
            view_secret=self["view-secret"],
            view_origins=self["view-origins"],
            publish_origins=self["publish-origins"],
            max_connections=self["max-connections"],
            max_connections_per_ip=self["max-connections-per-ip"],
            max_handshakes_per_ip=self["max-handshakes-per-ip"],
            handshake_burst=max(1, int(self["max-handshakes-per-ip"] * 2)),
            max_streams=self["max-streams"],
            max_viewers_per_stream=self["max-viewers-per-stream"],
            max_message_bytes=self["max-message-bytes"],
            max_fragments_per_message=self["max-fragments-per-message"],
            viewer_queue_bytes=self["viewer-queue-bytes"],
            gop_cache_bytes=self["gop-cache-bytes"],
            max_buffered_bytes=self["max-buffered-bytes"],
            ping_interval=self["ping-interval"],
            ping_timeout=self["ping-timeout"],
            handshake_timeout=self["handshake-timeout"],
            close_timeout=self["close-timeout"],
            publisher_idle_timeout=self["publisher-idle-timeout"],
            viewer_stall_timeout=self["viewer-stall-timeout"],
            keyframe_request_interval=self["keyframe-request-interval"],
            takeover=not self["no-takeover"],
            echo=bool(self["echo"]),
        )


class ListenerService(service.Service):
    """Listens on one endpoint and logs the address it really bound (``tcp:0`` works)."""

    def __init__(self, reactor: Any, description: str, site: RelaySite) -> None:
        self._reactor = reactor
        self.description = description
        self._site = site
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        """Bind now, before privileges are dropped; fail start-up when it cannot."""
        endpoint = endpoints.serverFromString(self._reactor, self.description)
        outcome: list[Any] = []
        listening = endpoint.listen(self._site)
        listening.addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        if outcome:
            self._listening(outcome[0])
        else:
            listening.addCallback(self._listening)
        super().privilegedStartService()

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        scheme = "https" if self.description.startswith("ssl:") else "http"
        host = getattr(address, "host", None)
        port_number = getattr(address, "port", None)
        if host is not None:
            shown = f"[{host}]" if ":" in host else host
            _log.info(
                "streamrelay listening on {description}: {url}",
                description=self.description.split(":", 2)[0] + ":" + str(port_number),
                url=f"{scheme}://{shown}:{port_number}/",
            )
        else:
            _log.info("streamrelay listening on {address}", address=address)
        return port

    def stopService(self) -> Deferred[None] | None:
        """Stop listening."""
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            stopping: Any = port.stopListening
            stopped: Deferred[None] = maybeDeferred(stopping)
            return stopped
        return None


class RelayService(service.MultiService):
    """The relay: on stop, drains every connection before it stops listening, so
    handshakes that arrive meanwhile get 503."""

    def __init__(self, context: RelayContext) -> None:
        super().__init__()
        self.context = context

    def stopService(self) -> Deferred[None]:
        """Close connections (1001), abort stragglers, then stop the listeners."""
        _log.info(
            "Shutting down: closing {count} connections", count=len(self.context.connections)
        )
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


def makeService(options: Options) -> RelayService:
    """Build the relay service from parsed options."""
    from twisted.internet import reactor

    config = options.config()
    capped = _fit_descriptor_limit(reactor, config.max_connections)
    if capped != config.max_connections:
        from dataclasses import replace

        config = replace(config, max_connections=capped)
    if config.publish_secret is None:
        _log.warn(
            "No publish secret configured: publishing is allowed only from loopback "
            "peers whose requests carry no X-Forwarded-For or Forwarded header."
        )
    context = RelayContext.create(config, reactor)
    site = RelaySite(context, Root(context))
    relay = RelayService(context)
    listeners = [ListenerService(reactor, description, site) for description in options["listen"]]
    for listener in listeners:
        listener.setServiceParent(relay)
    TimerService(10.0, context.handshake_rate.sweep).setServiceParent(relay)
    if options["demo"]:
        from streamrelay.demo import DEMO_STREAM, DemoPublisherService

        def demo_url() -> str | None:
            for listener in listeners:
                address = listener.port.getHost() if listener.port is not None else None
                if address is not None and hasattr(address, "port"):
                    scheme = "wss" if listener.description.startswith("ssl:") else "ws"
                    host = getattr(address, "host", "127.0.0.1")
                    if host in ("0.0.0.0", "::", ""):
                        host = "127.0.0.1"
                    shown = f"[{host}]" if ":" in host else host
                    return f"{scheme}://{shown}:{address.port}/publish/{DEMO_STREAM}"
            return None

        DemoPublisherService(
            reactor, demo_url, sys.executable, dict(os.environ), config.publish_secret
        ).setServiceParent(relay)
    return relay
