"""The twisted.web side of the one port: the relay's ``Site`` and its resource tree.

The web layer, by concern (imports run one way: tap -> web -> protocols -> core):

- :mod:`streamrelay.channel` -- the HTTP channel: limits, head bounds (431), bodies
  (413), the handshake deadline, the WebSocket upgrade;
- :mod:`streamrelay.admission` -- the WebSocket endpoints and their ordered checks
  (404, 400, 426, 503, 403, 401, 409), then the hand-over to Autobahn;
- :mod:`streamrelay.upgrade` -- the same checks and hand-over straight from a
  connection's first read, without twisted.web (:mod:`streamrelay.opening` opens the
  WebSocket without Autobahn's parser; :mod:`streamrelay.answers` holds the refusals'
  bytes; :mod:`streamrelay.deadlines` the one timer of every handshake deadline);
- :mod:`streamrelay.resources` -- ``/healthz``, ``/metrics``, ``/api/*``, the pages;
- this module -- routing (:class:`Root`), the ``Site``, the client address behind
  trusted proxies (:class:`RelayRequest`) and the access log; and the site of
  ``--metrics-listen`` (:func:`metrics_site`).

The shared state is :class:`~streamrelay.context.RelayContext`, re-exported here.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.python import log as legacy_log
from twisted.web import http, resource, server

from streamrelay.addresses import describe_address, forwarded_client
from streamrelay.admission import StreamGate, endpoints
from streamrelay.channel import RelayChannel, channel_of
from streamrelay.context import RelayContext
from streamrelay.deadlines import Deadlines
from streamrelay.logs import limited, relay_logger
from streamrelay.resources import (
    Health,
    Internals,
    Metrics,
    NotFound,
    PlayerPage,
    StaticPage,
    StreamsApi,
    ThumbnailApi,
    load_static_files,
    postpath,
)
from streamrelay.upgrade import HeadUpgrader

__all__ = [
    "RelayContext",
    "RelayRequest",
    "RelaySite",
    "Root",
    "load_static_files",
    "metrics_site",
]

_log = relay_logger(__name__)

_ACCESS_LINE = '"{client}" - - "{method} {path} {version}" {status} {length} "{referer}" "{agent}"'


class Root(resource.Resource):
    """Routes the first path segment to its resource."""

    def __init__(self, context: RelayContext, files: dict[str, bytes] | None = None) -> None:
        super().__init__()
        self.context = context
        context.metrics.watch(context)
        files = load_static_files() if files is None else files
        self._not_found = NotFound(context)
        self.endpoints = endpoints(context)
        self._routes: dict[bytes, resource.Resource] = {
            b"": StaticPage(context, files, "index.html"),
            b"healthz": Health(context),
            b"metrics": Metrics(context),
            b"static": StaticPage(context, files, None),
            b"view": PlayerPage(context, files),
        }
        viewer_authorizer = None
        for endpoint in self.endpoints:
            self._routes[endpoint.path] = StreamGate(context, endpoint)
            if endpoint.path == b"watch":
                viewer_authorizer = endpoint.authorizer
        self._api = _ApiFolder(context, viewer_authorizer)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.Resource:
        """Pick the resource for the first segment; 404 for anything unknown."""
        if path == b"api":
            return self._api
        return self._routes.get(path, self._not_found)

    def render(self, request: server.Request) -> bytes:  # type: ignore[override]
        """Requests for ``/`` are routed by ``getChildWithDefault``; this is a fallback."""
        return self._not_found.render(request)


class _ApiFolder(resource.Resource):
    def __init__(self, context: RelayContext, viewer_authorizer: Any = None) -> None:
        super().__init__()
        self._children: dict[bytes, resource.Resource] = {b"streams": StreamsApi(context)}
        # /api/streams/{stream}/thumbnail.jpg, admitted as a viewer of the stream.
        self._thumbnails = ThumbnailApi(context, viewer_authorizer)
        if context.config.api_internals:
            self._children[b"internals"] = Internals(context)
        self._not_found = NotFound(context)

    def render(self, request: server.Request) -> bytes:  # type: ignore[override]
        """``/api`` itself is not a resource."""
        return self._not_found.render(request)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.Resource:
        child = self._children.get(path)
        if child is not None and postpath(request) in ([], [b""]):
            return child
        if path == b"streams" and len(postpath(request)) == 2:
            return self._thumbnails
        return self._not_found


# -- the site and its access log ---------------------------------------------------------


def _redacted_path(uri: bytes) -> str:
    # Tokens travel in the query string: the access log keeps only the path.
    return uri.split(b"?", 1)[0].split(b"#", 1)[0].decode("utf-8", "replace")


def access_log_line(timestamp: str, request: server.Request) -> str:
    """Combined log format with the query strings of the URI and the Referer removed."""
    referer = request.getHeader("referer")
    agent = request.getHeader("user-agent") or ""
    client = request.getClientAddress()
    host = getattr(client, "host", "-")
    method = request.method.decode("ascii", "replace")
    path = _redacted_path(request.uri)
    version = request.clientproto.decode("ascii", "replace")
    shown_referer = _redacted_path(referer.encode()) if referer else "-"
    shown_agent = agent.replace('"', "'")[:200]
    return (
        f'"{host}" - - {timestamp} "{method} {path} {version}" {request.code} '
        f'{request.sentLength or "-"} "{shown_referer}" "{shown_agent}"'
    )


def access_fields(request: http.Request) -> dict[str, Any]:
    """The access log's fields for ``request``: no query string, no token."""
    referer = request.getHeader("referer")
    client = request.getClientAddress()
    peer = request.client
    return {
        "client": getattr(client, "host", "-"),
        "via": describe_address(peer) if client != peer else None,
        "method": request.method.decode("ascii", "replace"),
        "path": _redacted_path(request.uri),
        "version": request.clientproto.decode("ascii", "replace"),
        "status": request.code,
        "length": request.sentLength or "-",
        "referer": _redacted_path(referer.encode()) if referer else "-",
        "agent": (request.getHeader("user-agent") or "").replace('"', "'")[:200],
    }


class RelayRequest(server.Request):
    """A request whose description in log lines never shows the query (tokens), and
    whose client, behind ``--trust-proxy N`` proxies, is the one they forwarded."""

    def getClientAddress(self) -> IAddress:
        """The TCP peer, or with ``--trust-proxy N`` the client named by the last N
        ``X-Forwarded-For`` hops (see :func:`~streamrelay.addresses.forwarded_client`)."""
        peer: IAddress = self.client
        channel = channel_of(self)
        trusted = channel.context.config.trust_proxy if channel is not None else 0
        if not trusted:
            return peer
        values = self.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
        return forwarded_client(peer, values, trusted)

    def __repr__(self) -> str:
        """Method and path only."""
        method = self.method.decode("ascii", "replace") if self.method else "?"
        path = _redacted_path(self.uri) if self.uri else "?"
        return f"<RelayRequest method={method} path={path}>"


class RelaySite(server.Site):
    """The relay's ``Site``: its channels share the :class:`RelayContext`."""

    protocol = RelayChannel  # type: ignore[assignment]
    requestFactory = RelayRequest

    def __init__(self, context: RelayContext, root: resource.Resource) -> None:
        # The reactor given here times every channel (HTTPFactory sets channel.callLater).
        super().__init__(
            root,
            logFormatter=access_log_line,
            reactor=context.clock,
            timeout=max(30, int(context.config.handshake_timeout)),
        )
        self.context = context
        # The WebSocket handshakes answered from the request head (RelayChannel calls
        # it with a connection's first read); None: all go through twisted.web.
        self.handshake_deadlines = Deadlines(context.clock, context.config.handshake_timeout)
        self.upgrade_from_head: HeadUpgrader | None = None
        if isinstance(root, Root):
            self.upgrade_from_head = HeadUpgrader(context, root.endpoints)

    def buildProtocol(self, addr: Any) -> Any:
        """Every channel knows the shared context, and is counted for leak accounting."""
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.context = self.context
            self.context.track(channel)
        return channel

    def log(self, request: http.Request) -> None:
        """Into the relay's own log (structured fields, rate-limited like every line of
        the relay); into a file of its own, when one is set, in full."""
        if self.logPath is None and self._logFile is legacy_log.logfile:
            # Over --log-rate (a refusal storm), the line is counted, never built.
            if limited.over_rate(__name__, _ACCESS_LINE):
                return
            _log.info(_ACCESS_LINE, kind="http.access", **access_fields(request))
        else:
            super().log(request)


class _MetricsRoot(resource.Resource):
    """The tree of the ``--metrics-listen`` port: ``/metrics`` alone."""

    def __init__(self, context: RelayContext) -> None:
        super().__init__()
        context.metrics.watch(context)
        self._metrics = Metrics(context, loopback_only=False)
        self._not_found = NotFound(context)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.Resource:
        """``/metrics``; 404 for anything else."""
        if path == b"metrics" and postpath(request) in ([], [b""]):
            return self._metrics
        return self._not_found

    def render(self, request: server.Request) -> bytes:  # type: ignore[override]
        """``/`` itself is not a resource."""
        return self._not_found.render(request)


class MetricsSite(server.Site):
    """A site that writes no access log: scrapes every few seconds are noise."""

    def log(self, request: http.Request) -> None:
        """Nothing."""


def metrics_site(context: RelayContext) -> server.Site:
    """The site ``--metrics-listen`` serves: ``/metrics`` to whoever reaches its port,
    kept apart from the relay's port, its limits and its access log."""
    return MetricsSite(_MetricsRoot(context), reactor=context.clock, timeout=30)
